//! The SegFormer student/teacher pair: the network, its ops, HF weight files and the EMA update.

pub mod class_norm;
pub mod ema;
pub mod nn;
pub mod ops;
mod recompute;
mod segformer;
mod student;
pub mod weights;

pub use class_norm::{ClassMoments, ClassNorm};
pub use recompute::Recompute;
pub use segformer::{
    init_tensors, param_specs, prefixed, with_prefix, Init, ParamSpec, SegOutput, Segformer,
    TensorMap, Tracking, TRACKED_STATISTICS,
};
pub use student::Student;
