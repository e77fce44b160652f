//! The parts of one online adaptation step, one file per idea (see `design/methods.md`):
//! instance-adaptive thresholds (HIAST/IAST), class-balanced Sinkhorn assignment (CPSL),
//! distribution-aware pixel contrast (SePiCo), bidirectional pixel-prototype contrast with label
//! transfer and bias calibration (BiDA), the labeled instance bank (DIDA), and HIAST's
//! region-adaptive regularisers. The step that wires them to the pipeline builds on these.

pub mod bank;
pub mod bidirectional;
pub mod contrast;
pub mod region;
pub mod sinkhorn;
pub mod step;
pub mod thresholds;
pub mod views;
