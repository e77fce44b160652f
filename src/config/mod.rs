//! Configuration read from files: the HF SegFormer `config.json` and `preprocessor_config.json`.

mod model;
mod preprocess;

pub use model::SegformerConfig;
pub use preprocess::PreprocessConfig;
