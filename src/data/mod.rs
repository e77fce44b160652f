//! Labelled image folders: listing and filtering by manifest, decoding with per-file errors,
//! training augmentations, HF preprocessing, and label maps for cross-dataset scoring.

pub mod augment;
pub mod cityscapes;
mod content;
mod dataset;
mod label_map;
mod preprocess;

pub use augment::{AugmentConfig, Augmenter};
pub use content::has_content;
pub use dataset::{load_label, load_rgb, Dataset, Example, LabelEncoding, Sample};
pub use label_map::LabelMap;
pub use preprocess::{image_to_tensor, normalize_into, resize_rgb};
