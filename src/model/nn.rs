//! The layers SegFormer is made of, as plain structs over named tensors: linear, layer norm,
//! strided patch convolution, batch norm + ReLU with running statistics, dropout and drop path.

use super::class_norm::ClassNorm;
use super::ops;
use crate::SeededRng;
use candle_core::{Result, Storage, Tensor};
use rand::Rng;
use std::sync::atomic::{AtomicI64, Ordering};

/// `y = x W^T + b` over the last dimension; `w`: [out, in].
#[derive(Clone)]
pub struct Linear {
    pub w: Tensor,
    pub b: Option<Tensor>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inner = dims[dims.len() - 1];
        // Flattening to 2-D keeps clear of candle's batched-matmul bug with broadcast operands.
        let x2 = x.contiguous()?.reshape(((), inner))?;
        let y = match &self.b {
            Some(b) => ops::linear(&x2, &self.w, b)?,
            None => x2.matmul(&self.w.t()?)?,
        };
        let mut out = dims;
        *out.last_mut().expect("rank >= 1") = self.w.dim(0)?;
        y.reshape(out)
    }
}

#[derive(Clone)]
pub struct LayerNorm {
    pub w: Tensor,
    pub b: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.w, &self.b, self.eps)
    }
}

/// A strided convolution on channel-last maps as im2col + matmul; `w`: [O, C, k, k] (HF layout).
#[derive(Clone)]
pub struct PatchConv {
    pub w: Tensor,
    pub b: Tensor,
    pub stride: usize,
    pub padding: usize,
}

impl PatchConv {
    /// `x`: [B, H, W, C] -> ([B, Ho * Wo, O], (Ho, Wo)).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, (usize, usize))> {
        let (o, c, k, _) = self.w.dims4()?;
        let (patches, hw) = ops::im2col(x, k, self.stride, self.padding)?;
        // [O, C, k, k] -> [O, k, k, C] to match the (ky, kx, c) patch order.
        let w = self.w.permute((0, 2, 3, 1))?.reshape((o, k * k * c))?;
        let b = patches.dim(0)?;
        let y = ops::linear(&patches.reshape(((), k * k * c))?, &w, &self.b)?;
        Ok((y.reshape((b, hw.0 * hw.1, o))?, hw))
    }
}

/// BatchNorm then ReLU over the rows of [P, C] (the decode head's fuse unit): batch statistics
/// and a running update in training, the running statistics in eval.
pub struct BatchNormRelu {
    pub w: Tensor,
    pub b: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub num_batches: AtomicI64,
    pub eps: f64,
    pub momentum: f64,
}

/// Per-column mean and biased variance of `x` ([P, C]), each [1, C].
fn batch_stats(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let mean = x.mean_keepdim(0)?;
    let var = x.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)?;
    Ok((mean, var))
}

impl BatchNormRelu {
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !(ops::cpu_f32(x) && x.rank() == 2) {
            return self.forward_generic(x, train);
        }
        let x = x.contiguous()?;
        let (p, c) = x.dims2()?;
        let (mean, var) = if train {
            let (mean, var) = {
                let (st, l) = x.storage_and_layout();
                match &*st {
                    Storage::Cpu(s) => ops::column_stats(ops::as_f32(s, l, "batch-norm")?, c),
                    _ => unreachable!("checked CPU above"),
                }
            };
            let dev = x.device();
            self.update_running(
                &Tensor::from_slice(&mean, (1, c), dev)?,
                &Tensor::from_slice(&var, (1, c), dev)?,
                p,
            )?;
            (mean, var)
        } else {
            (
                self.running_mean.to_vec1::<f32>()?,
                self.running_var.to_vec1::<f32>()?,
            )
        };
        ops::batch_norm_relu_rows(&x, &self.w, &self.b, &mean, &var, self.eps)
    }

    /// The same from candle's broadcast ops: other devices and the test reference.
    pub fn forward_generic(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (mean, var) = if train {
            let (mean, var) = batch_stats(x)?;
            self.update_running(&mean.detach(), &var.detach(), x.dim(0)?)?;
            (mean, var)
        } else {
            (
                self.running_mean.unsqueeze(0)?,
                self.running_var.unsqueeze(0)?,
            )
        };
        let xhat = x
            .broadcast_sub(&mean)?
            .broadcast_div(&(var + self.eps)?.sqrt()?)?;
        xhat.broadcast_mul(&self.w)?.broadcast_add(&self.b)?.relu()
    }

    /// Moves the running statistics towards the batch statistics of `x` ([P, C]) without
    /// normalising it.
    pub fn track(&self, x: &Tensor) -> Result<()> {
        let (mean, var) = batch_stats(&x.detach().to_dtype(self.running_mean.dtype())?)?;
        self.update_running(&mean, &var, x.dim(0)?)
    }

    /// The same towards the statistics `x` would have with the source's class shares
    /// ([`ClassNorm::batch_stats`]); `labels`: [P] the classes of `x`'s rows.
    pub fn track_by_class(&self, x: &Tensor, labels: &Tensor, norm: &ClassNorm) -> Result<()> {
        let (mean, var) = norm.batch_stats(&x.detach(), labels)?;
        let dt = self.running_mean.dtype();
        let (mean, var) = (mean.to_dtype(dt)?, var.to_dtype(dt)?);
        self.update_running(&mean, &var, x.dim(0)?)
    }

    /// The same towards `x`'s statistics taken a share of the way from `source`'s ([C] running
    /// mean and variance): `share`, or more where `norm` finds the batch's features further
    /// from the source's than its own frames' spread ([`ClassNorm::feature_share`]).
    pub fn track_anchored(
        &self,
        x: &Tensor,
        share: f64,
        source: (&Tensor, &Tensor),
        norm: Option<&ClassNorm>,
    ) -> Result<()> {
        let dt = self.running_mean.dtype();
        let x = x.detach().to_dtype(dt)?;
        let (mean, var) = batch_stats(&x)?;
        let share = match norm {
            Some(n) => share.max(n.feature_share(&mean)?),
            None => share,
        }
        .clamp(0.0, 1.0);
        let p = x.dim(0)?;
        // The source's variance is a running (unbiased) one: biased like the batch's here, as
        // the blend corrects it back.
        let bias = (p.max(2) - 1) as f64 / p as f64;
        let (src_mean, src_var) = (
            source.0.to_dtype(dt)?.unsqueeze(0)?,
            (source.1.to_dtype(dt)?.unsqueeze(0)? * bias)?,
        );
        let towards = |src: &Tensor, batch: Tensor| src + ((batch - src)? * share)?;
        let (mean, var) = (towards(&src_mean, mean)?, towards(&src_var, var)?);
        self.update_running(&mean, &var, p)
    }

    fn update_running(&self, mean: &Tensor, var: &Tensor, p: usize) -> Result<()> {
        self.blend_running(mean, var, p, self.momentum)
    }

    fn blend_running(&self, mean: &Tensor, var: &Tensor, p: usize, m: f64) -> Result<()> {
        let unbiased = (var.squeeze(0)? * (p as f64 / (p.max(2) - 1) as f64))?;
        let rm = ((&self.running_mean * (1.0 - m))? + (mean.squeeze(0)? * m)?)?;
        let rv = ((&self.running_var * (1.0 - m))? + (unbiased * m)?)?;
        // In place, so every holder of these tensors (the weight map, the EMA teacher) sees them.
        self.running_mean.slice_set(&rm, 0, 0)?;
        self.running_var.slice_set(&rv, 0, 0)?;
        self.num_batches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub fn num_batches_tensor(&self) -> Result<Tensor> {
        Tensor::new(self.num_batches.load(Ordering::Relaxed), self.w.device())
    }
}

/// Inverted dropout; identity outside training or when `p` is 0.
pub fn dropout(x: &Tensor, p: f64, rng: Option<&mut SeededRng>) -> Result<Tensor> {
    let Some(rng) = rng else {
        return Ok(x.clone());
    };
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let _t = crate::profile::scope("dropout mask");
    let keep = 1.0 - p as f32;
    // Bulk draws of 64 words: the same numbers, in the same order, as `rng.random::<f32>()` per
    // element (its top 24 bits as a fraction), so runs repeat, at a fraction of the per-call cost
    // (10 ms for the decode head's 2M elements).
    let n = x.elem_count();
    let mut kept = vec![0u64; n.div_ceil(64)];
    let mut draws = [0u32; 64];
    for (w, word) in kept.iter_mut().enumerate() {
        let m = (n - w * 64).min(64);
        rng.fill(&mut draws[..m]);
        for (b, u) in draws[..m].iter().enumerate() {
            if (u >> 8) as f32 * (1.0 / 16_777_216.0) < keep {
                *word |= 1 << b;
            }
        }
    }
    ops::dropout_bits(x, kept, 1.0 / keep)
}

/// Stochastic depth on [B, ...]: whole samples of a residual branch are dropped (HF's drop_path).
pub fn drop_path(x: &Tensor, p: f64, rng: Option<&mut SeededRng>) -> Result<Tensor> {
    let Some(rng) = rng else {
        return Ok(x.clone());
    };
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let keep = 1.0 - p;
    let b = x.dim(0)?;
    let mask: Vec<f32> = (0..b)
        .map(|_| ((keep + rng.random::<f64>()).floor() / keep) as f32)
        .collect();
    ops::scale_by(x, mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn dropout_keeps_the_per_element_draws() {
        // 130 elements: two full mask words and a partial one.
        let x = Tensor::arange(1f32, 131.0, &candle_core::Device::Cpu).unwrap();
        let mut a = SeededRng::seed_from_u64(4);
        let y = dropout(&x, 0.3, Some(&mut a))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut b = SeededRng::seed_from_u64(4);
        for (i, v) in y.iter().enumerate() {
            let kept = b.random::<f32>() < 0.7;
            let want = if kept { (i + 1) as f32 / 0.7 } else { 0.0 };
            assert!((v - want).abs() < 1e-4, "{i}: {v} vs {want}");
        }
        assert_eq!(a.random::<u64>(), b.random::<u64>());
    }

    #[test]
    fn bulk_draw_is_the_per_call_stream() {
        // The dropout mask's bulk fill must keep the draws `random::<f32>()` would make.
        let (mut a, mut b) = (SeededRng::seed_from_u64(3), SeededRng::seed_from_u64(3));
        let mut bits = vec![0u32; 1001];
        a.fill(&mut bits[..]);
        for u in bits {
            assert_eq!((u >> 8) as f32 * (1.0 / 16_777_216.0), b.random::<f32>());
        }
        assert_eq!(a.random::<u64>(), b.random::<u64>());
    }
}
