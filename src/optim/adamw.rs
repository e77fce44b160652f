//! AdamW (PyTorch's update, decoupled weight decay) whose moments and step count are plain
//! tensors, so they can be checkpointed and restored exactly. On CPU the update runs in place.

use crate::model::ops::as_f32;
use crate::model::TensorMap;
use candle_core::{bail, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor, Var};

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Gradients are rescaled so their global L2 norm is at most this (None: no clipping).
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: None,
        }
    }
}

/// Per-parameter learning-rate multiplier and weight-decay switch.
#[derive(Debug, Clone, Copy)]
pub struct ParamGroup {
    pub lr_mult: f64,
    pub decay: bool,
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    group: ParamGroup,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    slots: Vec<Slot>,
    step: u64,
}

/// What a call to [`AdamW::step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepOutcome {
    /// Parameters updated; the global gradient norm before clipping.
    Applied { grad_norm: f64 },
    /// Skipped because the gradient norm was not finite; nothing changed.
    NonFinite,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var, ParamGroup)>, cfg: AdamWConfig) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var, group)| {
                let m = var.as_tensor().zeros_like()?.detach();
                let v = var.as_tensor().zeros_like()?.detach();
                Ok(Slot {
                    name,
                    var,
                    m,
                    v,
                    group,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg,
            slots,
            step: 0,
        })
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Counts a step that was skipped (non-finite), so schedules and data move on.
    pub fn skip_step(&mut self) {
        self.step += 1;
    }

    /// One update at learning rate `lr` (before each group's multiplier). Parameters without a
    /// gradient are left alone.
    pub fn step(
        &mut self,
        grads: &candle_core::backprop::GradStore,
        lr: f64,
    ) -> Result<StepOutcome> {
        let mut sq = 0f64;
        for s in &self.slots {
            if let Some(g) = grads.get(s.var.as_tensor()) {
                sq += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
            }
        }
        let norm = sq.sqrt();
        if !norm.is_finite() {
            return Ok(StepOutcome::NonFinite);
        }
        let clip = match self.cfg.max_grad_norm {
            Some(max) if norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        self.step += 1;
        let t = self.step as f64;
        let c = self.cfg;
        for s in &self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let lr = lr * s.group.lr_mult;
            let wd = if s.group.decay { c.weight_decay } else { 0.0 };
            let k = Update {
                lr: lr as f32,
                wd: wd as f32,
                eps: c.eps as f32,
                bc1: (1.0 - c.beta1.powf(t)) as f32,
                bc2: (1.0 - c.beta2.powf(t)) as f32,
                beta1: c.beta1 as f32,
                beta2: c.beta2 as f32,
                clip: clip as f32,
            };
            let p = s.var.as_tensor();
            if crate::model::ops::fast_cpu(p.device()) {
                let g = g.contiguous()?;
                s.m.inplace_op2(&g, &Moment { k, second: false })?;
                s.v.inplace_op2(&g, &Moment { k, second: true })?;
                p.inplace_op3(&s.m, &s.v, &k)?;
            } else {
                let g = (g * clip)?;
                let m = ((&s.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
                let v = ((&s.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                s.m.slice_set(&m, 0, 0)?;
                s.v.slice_set(&v, 0, 0)?;
                let mhat = (m / k.bc1 as f64)?;
                let denom = ((v / k.bc2 as f64)?.sqrt()? + c.eps)?;
                let decayed = (p * (1.0 - lr * wd))?;
                s.var.set(&(decayed - (mhat / denom)? * lr)?)?;
            }
        }
        Ok(StepOutcome::Applied { grad_norm: norm })
    }

    /// Moments under `adamw.m.<name>` / `adamw.v.<name>` and the step under `adamw.step`.
    pub fn state(&self) -> Result<TensorMap> {
        let mut out = TensorMap::new();
        for s in &self.slots {
            out.insert(format!("adamw.m.{}", s.name), s.m.copy()?);
            out.insert(format!("adamw.v.{}", s.name), s.v.copy()?);
        }
        out.insert(
            "adamw.step".into(),
            Tensor::new(self.step as i64, &candle_core::Device::Cpu)?,
        );
        Ok(out)
    }

    /// Restores what [`AdamW::state`] saved; every parameter must be present with its shape.
    pub fn load_state(&mut self, state: &TensorMap) -> Result<()> {
        for s in &mut self.slots {
            for (key, dst) in [("m", &s.m), ("v", &s.v)] {
                let name = format!("adamw.{key}.{}", s.name);
                let Some(t) = state.get(&name) else {
                    bail!("optimizer state lacks {name}");
                };
                if t.dims() != dst.dims() {
                    bail!(
                        "optimizer state {name}: shape {:?}, parameter has {:?}",
                        t.dims(),
                        dst.dims()
                    );
                }
                dst.slice_set(&t.to_device(dst.device())?.to_dtype(DType::F32)?, 0, 0)?;
            }
        }
        let Some(step) = state.get("adamw.step") else {
            bail!("optimizer state lacks adamw.step");
        };
        self.step = step.to_dtype(DType::I64)?.to_scalar::<i64>()? as u64;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
struct Update {
    lr: f32,
    wd: f32,
    eps: f32,
    bc1: f32,
    bc2: f32,
    beta1: f32,
    beta2: f32,
    clip: f32,
}

fn dst_f32<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{op}: destination must be contiguous");
    };
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        _ => bail!("{op}: destination must be f32"),
    }
}

/// m <- b1 m + (1 - b1) c g, or v <- b2 v + (1 - b2) (c g)^2.
struct Moment {
    k: Update,
    second: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let g = as_f32(s2, l2, "adamw-moment")?;
        let d = dst_f32(s1, l1, "adamw-moment")?;
        let c = self.k.clip;
        if self.second {
            let b = self.k.beta2;
            d.iter_mut()
                .zip(g)
                .for_each(|(v, g)| *v = b * *v + (1.0 - b) * (c * g) * (c * g));
        } else {
            let b = self.k.beta1;
            d.iter_mut()
                .zip(g)
                .for_each(|(m, g)| *m = b * *m + (1.0 - b) * c * g);
        }
        Ok(())
    }
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let m = as_f32(s2, l2, "adamw-update")?;
        let v = as_f32(s3, l3, "adamw-update")?;
        let p = dst_f32(s1, l1, "adamw-update")?;
        let decay = 1.0 - self.lr * self.wd;
        for ((p, m), v) in p.iter_mut().zip(m).zip(v) {
            let mhat = m / self.bc1;
            let denom = (v / self.bc2).sqrt() + self.eps;
            *p = *p * decay - self.lr * mhat / denom;
        }
        Ok(())
    }
}
