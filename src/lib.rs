//! segadapt: a SegFormer teacher-student runtime that keeps adapting on the vehicle.
//! Data flows frames -> model -> pseudo labels -> losses -> optimizer -> checkpoints.

pub mod ablation;
pub mod adapt;
pub mod bench;
pub mod budget;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod fuzz;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod profile;
pub mod report;
pub mod runtime;
pub mod source;
pub mod stats;
pub mod suite;
pub mod train;

pub use error::{Error, Result};

/// The random stream of training and adaptation: ChaCha12, the same stream `rand`'s `StdRng`
/// draws for a seed, whose position a checkpoint can save and a resumed run restore.
pub type SeededRng = rand_chacha::ChaCha12Rng;
