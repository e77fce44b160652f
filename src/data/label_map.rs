//! Scoring a model on a dataset with other classes: a TOML map from model classes to the
//! dataset's classes (`classes`, `ignore`, `[model_to_eval]`). `classes = "cityscapes"` names
//! the built-in Cityscapes class set (its 19 classes, ignore 255).

use crate::error::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelMapFile {
    classes: ClassSet,
    #[serde(default)]
    ignore: Vec<u8>,
    model_to_eval: BTreeMap<String, String>,
}

/// A dataset's classes: listed, or a built-in set by name.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ClassSet {
    Listed(Vec<String>),
    Named(String),
}

impl ClassSet {
    fn resolve(self, path: &Path) -> Result<(Vec<String>, Option<u8>)> {
        match self {
            ClassSet::Listed(v) => Ok((v, None)),
            ClassSet::Named(n) if n == "cityscapes" => Ok((
                super::cityscapes::CLASSES
                    .iter()
                    .map(|c| c.to_string())
                    .collect(),
                Some(super::cityscapes::IGNORE),
            )),
            ClassSet::Named(n) => Err(Error::data(
                path,
                format!("classes = {n:?}: a list of names or \"cityscapes\""),
            )),
        }
    }
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
        let (classes, set_ignore) = f.classes.resolve(path)?;
        let mut ignore = f.ignore;
        ignore.extend(set_ignore.filter(|i| !ignore.contains(i)));
        let mut model_to_eval = Vec::with_capacity(model_classes.len());
        for m in model_classes {
            let target = f.model_to_eval.get(m).ok_or_else(|| {
                Error::data(
                    path,
                    format!("[model_to_eval] has no entry for model class {m:?}"),
                )
            })?;
            let idx = classes.iter().position(|c| c == target).ok_or_else(|| {
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
            classes,
            ignore,
            model_to_eval,
        })
    }

    /// Model classes scored as the dataset's classes of the same name (case, `_` and `-`
    /// against spaces aside), for a dataset whose layout fixes its classes. Where the names do
    /// not pair, the error names the first model class without a partner.
    pub fn by_name(model_classes: &[String], dataset: &[&str], ignore: u8) -> Result<Self> {
        let key = |s: &str| s.to_lowercase().replace(['_', '-'], " ");
        let model_to_eval = model_classes
            .iter()
            .map(|m| {
                dataset
                    .iter()
                    .position(|d| key(d) == key(m))
                    .ok_or_else(|| {
                        Error::Invalid(format!(
                            "model class {m:?} is not one of the dataset's classes ({}): give a \
                         --label-map",
                            dataset.join(", ")
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            classes: dataset.iter().map(|c| c.to_string()).collect(),
            ignore: vec![ignore],
            model_to_eval,
        })
    }

    /// The map for scoring a model on `data`: `file` where given, by name where the layout fixes
    /// the dataset's classes, the identity otherwise.
    pub fn for_dataset(
        file: Option<&Path>,
        data: &super::Dataset,
        model_classes: &[String],
        model_ignore: u8,
    ) -> Result<Self> {
        match (file, data.classes) {
            (Some(p), _) => Self::load(p, model_classes),
            (None, Some(set)) => Self::by_name(model_classes, set, super::cityscapes::IGNORE),
            (None, None) => Ok(Self::identity(model_classes, model_ignore)),
        }
    }
}
