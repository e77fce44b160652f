//! Scoring a model on a dataset with other classes: a TOML map from model classes to the
//! dataset's classes (`classes`, `ignore`, `[model_to_eval]`).

use crate::error::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelMapFile {
    classes: Vec<String>,
    #[serde(default)]
    ignore: Vec<u8>,
    model_to_eval: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct LabelMap {
    /// The dataset's class names in label-value order.
    pub classes: Vec<String>,
    /// Label values that are not scored.
    pub ignore: Vec<u8>,
    /// For each model class index, the dataset class index it counts as.
    pub model_to_eval: Vec<usize>,
}

impl LabelMap {
    /// The identity map: the dataset uses the model's classes, `ignore` is skipped.
    pub fn identity(model_classes: &[String], ignore: u8) -> Self {
        Self {
            classes: model_classes.to_vec(),
            ignore: vec![ignore],
            model_to_eval: (0..model_classes.len()).collect(),
        }
    }

    pub fn load(path: &Path, model_classes: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let f: LabelMapFile =
            toml::from_str(&text).map_err(|e| Error::data(path, e.to_string()))?;
        let mut model_to_eval = Vec::with_capacity(model_classes.len());
        for m in model_classes {
            let target = f.model_to_eval.get(m).ok_or_else(|| {
                Error::data(
                    path,
                    format!("[model_to_eval] has no entry for model class {m:?}"),
                )
            })?;
            let idx = f.classes.iter().position(|c| c == target).ok_or_else(|| {
                Error::data(
                    path,
                    format!("model class {m:?} maps to {target:?}, which is not in classes"),
                )
            })?;
            model_to_eval.push(idx);
        }
        if let Some(k) = f.model_to_eval.keys().find(|k| !model_classes.contains(k)) {
            return Err(Error::data(
                path,
                format!("[model_to_eval] names {k:?}, not a model class"),
            ));
        }
        Ok(Self {
            classes: f.classes,
            ignore: f.ignore,
            model_to_eval,
        })
    }
}
