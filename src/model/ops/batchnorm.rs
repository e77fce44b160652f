//! Training-mode BatchNorm over the rows of [P, C] as one op: batch statistics by parallel
//! column sums, and an analytic backward. Composed from candle's broadcast ops, each of its
//! reductions over rows went through the slow strided sum.

use super::{as_f32, fold_rows};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Per-column mean and biased variance of a [P, C] slice, two parallel passes.
pub fn column_stats(x: &[f32], c: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = x.len() / c;
    let p = rows.max(1) as f32;
    let row = |r: usize| &x[r * c..(r + 1) * c];
    let mean: Vec<f32> = fold_rows(rows, c, |acc, r| {
        acc.iter_mut().zip(row(r)).for_each(|(a, v)| *a += v)
    })
    .into_iter()
    .map(|s| s / p)
    .collect();
    let var = fold_rows(rows, c, |acc, r| {
        for ((a, v), m) in acc.iter_mut().zip(row(r)).zip(&mean) {
            *a += (v - m) * (v - m);
        }
    })
    .into_iter()
    .map(|s| s / p)
    .collect();
    (mean, var)
}

/// y = (x - mean) * rstd * w + b with the batch's own `mean` and `var` (from
/// [`column_stats`]); x: [P, C] contiguous f32 on CPU.
pub fn batch_norm_rows(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    mean: &[f32],
    var: &[f32],
    eps: f64,
) -> Result<Tensor> {
    let rstd = var.iter().map(|v| 1.0 / (v + eps as f32).sqrt()).collect();
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        BatchNormRows {
            mean: mean.to_vec(),
            rstd,
        },
    )
}

struct BatchNormRows {
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

impl CustomOp3 for BatchNormRows {
    fn name(&self) -> &'static str {
        "batch-norm-rows"
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
        let x = as_f32(s1, l1, self.name())?;
        let w = as_f32(s2, l2, self.name())?;
        let b = as_f32(s3, l3, self.name())?;
        let c = self.mean.len();
        // Folded: y = x * k + m per column.
        let k: Vec<f32> = (0..c).map(|j| self.rstd[j] * w[j]).collect();
        let m: Vec<f32> = (0..c).map(|j| b[j] - self.mean[j] * k[j]).collect();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(c * 64)
            .zip(x.par_chunks(c * 64))
            .for_each(|(o, xs)| {
                for (orow, xrow) in o.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
                    for j in 0..c {
                        orow[j] = xrow[j] * k[j] + m[j];
                    }
                }
            });
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
        let (xv, gv) = (
            x.flatten_all()?.to_vec1::<f32>()?,
            g.flatten_all()?.to_vec1::<f32>()?,
        );
        let wv = w.flatten_all()?.to_vec1::<f32>()?;
        let c = self.mean.len();
        let p = xv.len() / c;
        // [db; dw] = [sum g; sum g * xhat].
        let acc = fold_rows(p, 2 * c, |acc, r| {
            let (xr, gr) = (&xv[r * c..(r + 1) * c], &gv[r * c..(r + 1) * c]);
            for j in 0..c {
                acc[j] += gr[j];
                acc[c + j] += gr[j] * (xr[j] - self.mean[j]) * self.rstd[j];
            }
        });
        let (db, dw) = acc.split_at(c);
        let (db, dw) = (db.to_vec(), dw.to_vec());
        // dx = w * rstd / P * (P * g - db - xhat * dw).
        let n = p as f32;
        let mut dx = vec![0f32; xv.len()];
        dx.par_chunks_mut(c * 64)
            .zip(xv.par_chunks(c * 64).zip(gv.par_chunks(c * 64)))
            .for_each(|(o, (xs, gs))| {
                for ((orow, xr), gr) in o
                    .chunks_exact_mut(c)
                    .zip(xs.chunks_exact(c))
                    .zip(gs.chunks_exact(c))
                {
                    for j in 0..c {
                        let xhat = (xr[j] - self.mean[j]) * self.rstd[j];
                        orow[j] = wv[j] * self.rstd[j] / n * (n * gr[j] - db[j] - xhat * dw[j]);
                    }
                }
            });
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
            Some(Tensor::from_vec(db, w.shape(), dev)?),
        ))
    }
}
