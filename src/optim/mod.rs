//! Optimisation: AdamW with saveable state, the poly schedule with linear warm-up, and
//! gradient-norm clipping.

mod adamw;
mod schedule;

pub use adamw::{AdamW, AdamWConfig, ParamGroup, StepOutcome};
pub use schedule::PolySchedule;
