//! Configuration read from files: the HF SegFormer `config.json` and `preprocessor_config.json`.

mod model;
mod preprocess;
mod profile;

pub use model::SegformerConfig;
pub use preprocess::{PreprocessConfig, Size};
pub use profile::{
    built_in_names, open_device, DeviceSection, InputSection, MemorySection, Precision, Profile,
    SizeFrom, TrainSection, BUILT_IN,
};
