//! HF image-processor settings (`preprocessor_config.json`): resize, rescale, normalise.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreprocessConfig {
    #[serde(default = "yes")]
    pub do_resize: bool,
    #[serde(default)]
    pub size: Option<Size>,
    #[serde(default = "yes")]
    pub do_rescale: bool,
    #[serde(default = "d_rescale")]
    pub rescale_factor: f64,
    #[serde(default = "yes")]
    pub do_normalize: bool,
    #[serde(default = "d_mean")]
    pub image_mean: Vec<f64>,
    #[serde(default = "d_std")]
    pub image_std: Vec<f64>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Size {
    pub height: usize,
    pub width: usize,
}

fn yes() -> bool {
    true
}
fn d_rescale() -> f64 {
    1.0 / 255.0
}
fn d_mean() -> Vec<f64> {
    vec![0.485, 0.456, 0.406]
}
fn d_std() -> Vec<f64> {
    vec![0.229, 0.224, 0.225]
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults parse")
    }
}

impl PreprocessConfig {
    /// ImageNet normalisation, resizing to `size` when given (HF's default is 512x512).
    pub fn with_size(size: Option<(usize, usize)>) -> Self {
        Self {
            do_resize: size.is_some(),
            size: size.map(|(width, height)| Size { height, width }),
            ..Self::default()
        }
    }

    /// Reads the file when present; HF's defaults otherwise.
    pub fn load_or_default(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let p: PreprocessConfig = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        if p.image_mean.len() != 3 || p.image_std.len() != 3 || p.image_std.contains(&0.0) {
            return Err(Error::config(
                "image_mean/image_std",
                format!("{:?}/{:?}", p.image_mean, p.image_std),
                "need 3 values each, std non-zero",
            ));
        }
        Ok(p)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut v = serde_json::to_value(self).map_err(|e| Error::Invalid(e.to_string()))?;
        if let Value::Object(m) = &mut v {
            m.entry("image_processor_type")
                .or_insert_with(|| "SegformerImageProcessor".into());
            if self.size.is_none() {
                m.remove("size");
            }
        }
        let text = serde_json::to_string_pretty(&v).map_err(|e| Error::Invalid(e.to_string()))?;
        crate::checkpoint::write_atomic(path, text.as_bytes())
    }

    /// The model input size (width, height) for an image of the given size.
    pub fn input_size(&self, width: usize, height: usize) -> (usize, usize) {
        match (self.do_resize, self.size) {
            (true, Some(s)) => (s.width, s.height),
            (true, None) => (512, 512),
            _ => (width, height),
        }
    }
}
