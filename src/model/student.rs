//! The trainable side of the pair: a SegFormer whose parameters are candle `Var`s, so gradients
//! reach each one by name; BatchNorm statistics stay plain tensors.

use super::segformer::{param_specs, Segformer, TensorMap};
use crate::config::SegformerConfig;
use candle_core::{Result, Var};

pub struct Student {
    pub model: Segformer,
    /// Trainable parameters in HF names, in `param_specs` order.
    pub vars: Vec<(String, Var)>,
}

impl Student {
    /// Takes ownership of copies of `tensors`; the caller's map is left untouched.
    pub fn new(cfg: &SegformerConfig, tensors: &TensorMap) -> Result<Self> {
        Self::with_trainable(cfg, tensors, |_| true)
    }

    /// As [`Student::new`], with only the parameters `train` accepts as `Var`s: the others stay
    /// plain tensors, so backward computes no gradient for them and no optimizer state exists.
    pub fn with_trainable(
        cfg: &SegformerConfig,
        tensors: &TensorMap,
        train: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        let mut vars = Vec::new();
        let mut map = TensorMap::new();
        for spec in param_specs(cfg) {
            let t = tensors
                .get(&spec.name)
                .ok_or_else(|| candle_core::Error::Msg(format!("missing tensor {}", spec.name)))?;
            if spec.trainable && train(&spec.name) {
                let v = Var::from_tensor(&t.detach().copy()?)?;
                map.insert(spec.name.clone(), v.as_tensor().clone());
                vars.push((spec.name, v));
            } else {
                map.insert(spec.name, t.detach().copy()?);
            }
        }
        Ok(Self {
            model: Segformer::new(cfg, map)?,
            vars,
        })
    }
}
