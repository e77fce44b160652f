//! Per-channel bias add and the layer-norm affine as single ops whose backward computes the
//! parameter gradients as parallel column sums: candle's broadcast ops reduce these through its
//! generic strided sum, one of the slowest parts of a training step.

use super::{as_f32, fold_rows, last_dim, output_buffer, sum_lanes, sum_zip, MIN_CHUNK};
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;
use std::sync::Mutex;

/// Sums rows of a [N, D] slice into [D].
fn column_sums(x: &[f32], d: usize) -> Vec<f32> {
    fold_rows(x.len() / d, d, 64, |acc, r| {
        acc.iter_mut()
            .zip(&x[r * d..(r + 1) * d])
            .for_each(|(a, v)| *a += v)
    })
}

/// `x + b` with `b` [D] broadcast over the rows of `x` [..., D].
pub fn add_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    if super::cpu_f32(x) {
        x.contiguous()?.apply_op2(&b.contiguous()?, AddBias)
    } else {
        x.broadcast_add(b)
    }
}

struct AddBias;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "add-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let x = as_f32(s1, l1, "add-bias")?;
        let b = as_f32(s2, l2, "add-bias")?;
        let d = last_dim(l1);
        if b.len() != d {
            bail!("add-bias: bias of {} for rows of {d}", b.len());
        }
        let mut out = x.to_vec();
        out.par_chunks_mut(d * 64).for_each(|block| {
            for row in block.chunks_exact_mut(d) {
                row.iter_mut().zip(b).for_each(|(o, v)| *o += v);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = grad
            .contiguous()?
            .apply_op1_no_bwd(&ColumnSum)?
            .reshape(b.shape())?;
        Ok((Some(grad.clone()), Some(db)))
    }
}

/// Column sums of a contiguous [..., D] tensor: [D].
pub(crate) struct ColumnSum;

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "column-sum"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let x = as_f32(st, l, "column-sum")?;
        let d = last_dim(l);
        Ok((CpuStorage::F32(column_sums(x, d)), Shape::from(d)))
    }
}

fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = sum_lanes(row) / n;
    let var = sum_zip(row, row, |v, _| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Layer norm over the last dimension with its affine, as one op.
pub fn layer_norm_affine(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        LayerNorm {
            eps: eps as f32,
            stats: Mutex::new(Vec::new()),
        },
    )
}

/// The forward keeps each row's (mean, 1 / std) for the backward, as PyTorch's kernel does.
struct LayerNorm {
    eps: f32,
    stats: Mutex<Vec<(f32, f32)>>,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm-affine"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let x = as_f32(s1, l1, "layer-norm-affine")?;
        let w = as_f32(s2, l2, "layer-norm-affine")?;
        let b = as_f32(s3, l3, "layer-norm-affine")?;
        let d = last_dim(l1);
        let mut out = output_buffer(x.len());
        let mut stats = vec![(0f32, 0f32); x.len() / d.max(1)];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(stats.par_iter_mut()))
            .with_min_len(MIN_CHUNK * 16)
            .for_each(|(o, (row, st))| {
                let (mean, rstd) = row_stats(row, self.eps);
                *st = (mean, rstd);
                for (((o, v), w), b) in o.iter_mut().zip(row).zip(w).zip(b) {
                    *o = (v - mean) * rstd * w + b;
                }
            });
        *self.stats.lock().expect("layer-norm stats") = stats;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let stats = self.stats.lock().expect("layer-norm stats");
        if stats.len() * x.dim(candle_core::D::Minus1)? != x.elem_count() {
            bail!("layer-norm-affine: backward before the forward");
        }
        let dx = x.apply_op3_no_bwd(w, &g, &LayerNormInputGrad { stats: &stats })?;
        let dwb = x.apply_op2_no_bwd(&g, &LayerNormParamGrad { stats: &stats })?; // [2, D]
        Ok((Some(dx), Some(dwb.get(0)?), Some(dwb.get(1)?)))
    }
}

/// dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat)) with gw = g * w.
struct LayerNormInputGrad<'a> {
    stats: &'a [(f32, f32)],
}

impl CustomOp3 for LayerNormInputGrad<'_> {
    fn name(&self) -> &'static str {
        "layer-norm-affine-dx"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let x = as_f32(s1, l1, "layer-norm-affine-dx")?;
        let w = as_f32(s2, l2, "layer-norm-affine-dx")?;
        let g = as_f32(s3, l3, "layer-norm-affine-dx")?;
        let d = last_dim(l1);
        let n = d as f32;
        let mut dx = output_buffer(x.len());
        dx.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(g.par_chunks(d)).zip(self.stats))
            .with_min_len(MIN_CHUNK * 16)
            .for_each(|(o, ((row, gr), &(mean, rstd)))| {
                // o <- g * w first, so both sums below are plain vectorised reductions.
                o.iter_mut()
                    .zip(gr.iter().zip(w))
                    .for_each(|(o, (gv, wv))| *o = gv * wv);
                let mg = sum_lanes(o) / n;
                let mgx = sum_zip(o, row, |gw, v| gw * (v - mean)) * rstd / n;
                for (o, v) in o.iter_mut().zip(row) {
                    *o = rstd * (*o - mg - (v - mean) * rstd * mgx);
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// [dw; db] = [sum g * xhat; sum g] over rows.
struct LayerNormParamGrad<'a> {
    stats: &'a [(f32, f32)],
}

impl CustomOp2 for LayerNormParamGrad<'_> {
    fn name(&self) -> &'static str {
        "layer-norm-affine-dwb"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let x = as_f32(s1, l1, "layer-norm-affine-dwb")?;
        let g = as_f32(s2, l2, "layer-norm-affine-dwb")?;
        let d = last_dim(l1);
        let acc = fold_rows(x.len() / d, 2 * d, 64, |acc, r| {
            let (row, gr) = (&x[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
            let (mean, rstd) = self.stats[r];
            let (dw, db) = acc.split_at_mut(d);
            for (((dw, db), v), gv) in dw.iter_mut().zip(db).zip(row).zip(gr) {
                *dw += gv * (v - mean) * rstd;
                *db += gv;
            }
        });
        Ok((CpuStorage::F32(acc), Shape::from((2, d))))
    }
}
