//! Row-wise normalisations over the last dimension with analytic backward passes: layer norm
//! (fused with its affine, see `affine.rs`), softmax, log-softmax and L2 normalisation.
//! candle-nn's fast softmax and layer norm drop the gradient without an error.

use super::{as_f32, cpu_f32, last_dim, map_rows, map_rows2, max_lanes, sum_lanes, sum_zip};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};

/// Layer norm over the last dimension with affine `w`, `b` (each [D]).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if !cpu_f32(x) {
        return layer_norm_generic(x, w, b, eps);
    }
    super::affine::layer_norm_affine(x, w, b, eps)
}

/// Layer norm from plain differentiable ops (mean, variance, divide). A half-precision input
/// is normalised in f32, as PyTorch's autocast does: its mean and variance need the mantissa.
pub fn layer_norm_generic(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    if dtype != candle_core::DType::F32 {
        let f32 = |t: &Tensor| t.to_dtype(candle_core::DType::F32);
        return layer_norm_generic(&f32(x)?, &f32(w)?, &f32(b)?, eps)?.to_dtype(dtype);
    }
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xhat = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xhat.broadcast_mul(w)?.broadcast_add(b)
}

/// Softmax of `scale * x` over the last dimension (attention's scores with their 1/sqrt(d)
/// scale: folded in, the scaling is not a pass of its own forward and backward).
pub fn softmax_last_dim(x: &Tensor, scale: f64) -> Result<Tensor> {
    if cpu_f32(x) {
        x.contiguous()?.apply_op1(Softmax {
            scale: scale as f32,
        })
    } else {
        candle_nn::ops::softmax(&(x * scale)?, D::Minus1)
    }
}

struct Softmax {
    scale: f32,
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let x = as_f32(st, l, "softmax-last-dim")?;
        let out = map_rows(x, last_dim(l), |o, row| {
            o.iter_mut().zip(row).for_each(|(o, v)| *o = v * self.scale);
            let max = max_lanes(o);
            // Exponentials first so the loop vectorises; the sum after.
            o.iter_mut()
                .for_each(|o| *o = super::fused::exp_neg(*o - max));
            let sum = sum_lanes(o);
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|o| *o *= inv);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(
            &grad.contiguous()?,
            &SoftmaxGrad { scale: self.scale },
        )?))
    }
}

/// dx = (g - sum(g * y)) * y * scale per row, y the softmax output.
struct SoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-last-dim-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let y = as_f32(s1, l1, self.name())?;
        let g = as_f32(s2, l2, self.name())?;
        let dx = map_rows2(y, g, last_dim(l1), |o, yr, gr| {
            let s = sum_zip(gr, yr, |g, y| g * y);
            for ((o, y), g) in o.iter_mut().zip(yr).zip(gr) {
                *o = (g - s) * y * self.scale;
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Log-softmax over the last dimension from differentiable ops (the generic twin).
pub fn log_softmax_generic(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Log-softmax over the last dimension: one pass forward, dx = g - softmax * sum(g) backward.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if cpu_f32(x) {
        x.contiguous()?.apply_op1(LogSoftmax)
    } else {
        log_softmax_generic(x)
    }
}

struct LogSoftmax;

impl CustomOp1 for LogSoftmax {
    fn name(&self) -> &'static str {
        "log-softmax-last-dim"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let x = as_f32(st, l, self.name())?;
        let out = map_rows(x, last_dim(l), |o, row| {
            let max = max_lanes(row);
            for (o, v) in o.iter_mut().zip(row) {
                *o = super::fused::exp_neg(v - max);
            }
            let lse = max + sum_lanes(o).ln();
            for (o, v) in o.iter_mut().zip(row) {
                *o = v - lse;
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            res.apply_op2_no_bwd(&grad.contiguous()?, &LogSoftmaxGrad)?,
        ))
    }
}

/// dx = g - exp(y) * sum(g) per row, y the log-softmax output.
struct LogSoftmaxGrad;

impl CustomOp2 for LogSoftmaxGrad {
    fn name(&self) -> &'static str {
        "log-softmax-last-dim-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let y = as_f32(s1, l1, self.name())?;
        let g = as_f32(s2, l2, self.name())?;
        let dx = map_rows2(y, g, last_dim(l1), |o, yr, gr| {
            let s = sum_lanes(gr);
            for ((o, y), g) in o.iter_mut().zip(yr).zip(gr) {
                // y <= 0 up to rounding; exp_neg clamps the rest to exp(0).
                *o = g - super::fused::exp_neg(*y) * s;
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Rows of the last dimension divided by their L2 norm plus `eps`, generic twin.
pub fn l2_normalize_generic(x: &Tensor, eps: f64) -> Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(eps)?)
}

/// y = x / max(|x|, eps) per row of the last dimension (PyTorch's `F.normalize`), with the
/// analytic backward dx = g / r - x (g.x) / r^3 for r = |x| > eps, and g / eps below it: rows
/// shorter than eps are scaled, not normalised, so their gradient stays bounded by |g| / eps.
pub fn l2_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    if cpu_f32(x) {
        x.contiguous()?.apply_op1(L2Normalize { eps: eps as f32 })
    } else {
        l2_normalize_generic(x, eps)
    }
}

#[derive(Clone, Copy)]
struct L2Normalize {
    eps: f32,
}

impl CustomOp1 for L2Normalize {
    fn name(&self) -> &'static str {
        "l2-normalize"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let x = as_f32(st, l, self.name())?;
        let out = map_rows(x, last_dim(l), |o, row| {
            let inv = 1.0 / sum_zip(row, row, |a, b| a * b).sqrt().max(self.eps);
            o.iter_mut().zip(row).for_each(|(o, v)| *o = v * inv);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &grad.contiguous()?,
            &L2NormalizeGrad(*self),
        )?))
    }
}

struct L2NormalizeGrad(L2Normalize);

impl CustomOp2 for L2NormalizeGrad {
    fn name(&self) -> &'static str {
        "l2-normalize-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let x = as_f32(s1, l1, self.name())?;
        let g = as_f32(s2, l2, self.name())?;
        let dx = map_rows2(x, g, last_dim(l1), |o, xr, gr| {
            let r = sum_zip(xr, xr, |a, b| a * b).sqrt();
            let n = r.max(self.0.eps);
            let k = if r > self.0.eps {
                sum_zip(gr, xr, |a, b| a * b) / (r * r * r)
            } else {
                0.0
            };
            for ((o, x), g) in o.iter_mut().zip(xr).zip(gr) {
                *o = g / n - x * k;
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}
