//! segadapt: a SegFormer teacher-student runtime that keeps adapting on the vehicle.
//! Data flows frames -> model -> pseudo labels -> losses -> optimizer -> checkpoints.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod loss;
pub mod model;

pub use error::{Error, Result};
