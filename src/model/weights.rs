//! HF model folders in and out: `config.json`, `model.safetensors` (HF tensor names, so the same
//! files load in `transformers`) and the optional `preprocessor_config.json`.

use super::segformer::{param_specs, TensorMap};
use crate::checkpoint::write_atomic;
use crate::config::{PreprocessConfig, SegformerConfig};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// A model folder as read from disk.
pub struct ModelFiles {
    pub config: SegformerConfig,
    pub preprocess: PreprocessConfig,
    pub tensors: TensorMap,
}

/// Reads `model.safetensors` into f32 tensors (counters stay i64), checking every expected name
/// and shape; extra tensors are reported and left out.
pub fn load_safetensors(path: &Path, cfg: &SegformerConfig, device: &Device) -> Result<TensorMap> {
    let raw = candle_core::safetensors::load(path, device).map_err(|e| Error::Weights {
        path: path.to_path_buf(),
        name: "*".into(),
        msg: e.to_string(),
    })?;
    let specs = param_specs(cfg);
    let mut out = TensorMap::new();
    for s in &specs {
        let t = raw.get(&s.name).ok_or_else(|| Error::Weights {
            path: path.to_path_buf(),
            name: s.name.clone(),
            msg: "missing".into(),
        })?;
        if t.dims() != s.shape.as_slice() {
            return Err(Error::Weights {
                path: path.to_path_buf(),
                name: s.name.clone(),
                msg: format!("shape {:?}, config wants {:?}", t.dims(), s.shape),
            });
        }
        let t =
            if s.trainable || s.name.ends_with("running_mean") || s.name.ends_with("running_var") {
                t.to_dtype(DType::F32)?
            } else {
                t.to_dtype(DType::I64)?
            };
        out.insert(s.name.clone(), t);
    }
    let extra: Vec<&String> = raw.keys().filter(|k| !out.contains_key(*k)).collect();
    if !extra.is_empty() {
        log::warn!(
            "{}: ignoring {} unknown tensors, e.g. {}",
            path.display(),
            extra.len(),
            extra[0]
        );
    }
    Ok(out)
}

pub fn load_model_dir(dir: &Path, device: &Device) -> Result<ModelFiles> {
    let config = SegformerConfig::load(&dir.join("config.json"))?;
    let preprocess = PreprocessConfig::load_or_default(&dir.join("preprocessor_config.json"))?;
    let st = dir.join("model.safetensors");
    if !st.exists() {
        return Err(Error::data(
            dir,
            "no model.safetensors (only safetensors weights are read)",
        ));
    }
    let tensors = load_safetensors(&st, &config, device)?;
    check_finite(&st, &tensors)?;
    Ok(ModelFiles {
        config,
        preprocess,
        tensors,
    })
}

/// Refuses tensors holding NaN or infinite values, naming the first such tensor (in name order)
/// and how many of its values are bad: weights like that load without a word otherwise, then
/// serve garbage and make every adaptation step non-finite.
pub fn check_finite(path: &Path, tensors: &TensorMap) -> Result<()> {
    for (name, t) in tensors {
        if !t.dtype().is_float() {
            continue;
        }
        let v: Vec<f32> = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let bad = v.iter().filter(|x| !x.is_finite()).count();
        if bad > 0 {
            return Err(Error::Weights {
                path: path.to_path_buf(),
                name: name.clone(),
                msg: format!(
                    "{bad} of {} values are not finite (NaN or infinite)",
                    v.len()
                ),
            });
        }
    }
    Ok(())
}

/// Serialises tensors with PyTorch's `format` metadata, as `save_pretrained` writes them.
pub fn safetensors_bytes(
    tensors: &TensorMap,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut meta = metadata.unwrap_or_default();
    meta.entry("format".into()).or_insert_with(|| "pt".into());
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    safetensors::tensor::serialize(cpu, Some(meta))
        .map_err(|e| Error::Invalid(format!("safetensors: {e}")))
}

pub fn save_model_dir(dir: &Path, files: &ModelFiles) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    files.config.save(&dir.join("config.json"))?;
    files
        .preprocess
        .save(&dir.join("preprocessor_config.json"))?;
    write_atomic(
        &dir.join("model.safetensors"),
        &safetensors_bytes(&files.tensors, None)?,
    )
}
