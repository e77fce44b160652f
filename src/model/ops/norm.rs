//! Layer norm and softmax over the last dimension with analytic backward passes: candle-nn's fast
//! versions of both drop the gradient without an error.

use super::{as_f32, MIN_CHUNK};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Layer norm over the last dimension with affine `w`, `b` (each [D]).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return layer_norm_generic(x, w, b, eps);
    }
    let xhat = x.contiguous()?.apply_op1(Normalize { eps: eps as f32 })?;
    xhat.broadcast_mul(w)?.broadcast_add(b)
}

/// Layer norm from plain differentiable ops (mean, variance, divide).
pub fn layer_norm_generic(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xhat = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xhat.broadcast_mul(w)?.broadcast_add(b)
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

struct Normalize {
    eps: f32,
}

impl CustomOp1 for Normalize {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = as_f32(st, l, "layer-norm")?;
        let d = l.shape().dims()[l.shape().rank() - 1];
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .with_min_len(MIN_CHUNK * 16)
            .for_each(|(o, row)| {
                let (mean, rstd) = row_stats(row, self.eps);
                o.iter_mut()
                    .zip(row)
                    .for_each(|(o, v)| *o = (v - mean) * rstd);
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = x.apply_op2_no_bwd(&grad.contiguous()?, &NormalizeGrad { eps: self.eps })?;
        Ok(Some(dx))
    }
}

/// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), row by row.
struct NormalizeGrad {
    eps: f32,
}

impl CustomOp2 for NormalizeGrad {
    fn name(&self) -> &'static str {
        "layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = as_f32(s1, l1, "layer-norm-grad")?;
        let g = as_f32(s2, l2, "layer-norm-grad")?;
        let d = l1.shape().dims()[l1.shape().rank() - 1];
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(g.par_chunks(d)))
            .with_min_len(MIN_CHUNK * 16)
            .for_each(|(o, (row, gr))| {
                let (mean, rstd) = row_stats(row, self.eps);
                let n = d as f32;
                let (mut sg, mut sgx) = (0f32, 0f32);
                for (v, gv) in row.iter().zip(gr) {
                    sg += gv;
                    sgx += gv * (v - mean) * rstd;
                }
                let (mg, mgx) = (sg / n, sgx / n);
                for ((o, v), gv) in o.iter_mut().zip(row).zip(gr) {
                    *o = rstd * (gv - mg - (v - mean) * rstd * mgx);
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = as_f32(st, l, "softmax-last-dim")?;
        let d = l.shape().dims()[l.shape().rank() - 1];
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .with_min_len(MIN_CHUNK * 16)
            .for_each(|(o, row)| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (o, v) in o.iter_mut().zip(row) {
                    *o = (v - max).exp();
                    sum += *o;
                }
                let inv = 1.0 / sum;
                o.iter_mut().for_each(|o| *o *= inv);
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let y = res.detach();
        let s = (grad * &y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((grad.broadcast_sub(&s)? * y)?))
    }
}
