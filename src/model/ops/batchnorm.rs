//! BatchNorm followed by ReLU over the rows of [P, C] as one op (the decode head's fuse unit):
//! given per-column statistics, one pass forward and two backward, the ReLU mask recomputed.

use super::{as_f32, fold_rows, map_rows, map_rows2};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// Per-column mean and biased variance of a [P, C] slice, two parallel passes.
pub fn column_stats(x: &[f32], c: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = x.len() / c;
    let p = rows.max(1) as f32;
    let row = |r: usize| &x[r * c..(r + 1) * c];
    let mean: Vec<f32> = fold_rows(rows, c, 64, |acc, r| {
        acc.iter_mut().zip(row(r)).for_each(|(a, v)| *a += v)
    })
    .into_iter()
    .map(|s| s / p)
    .collect();
    let var = fold_rows(rows, c, 64, |acc, r| {
        for ((a, v), m) in acc.iter_mut().zip(row(r)).zip(&mean) {
            *a += (v - m) * (v - m);
        }
    })
    .into_iter()
    .map(|s| s / p)
    .collect();
    (mean, var)
}

/// y = relu((x - mean) * rstd * w + b) with the given statistics (the batch's own from
/// [`column_stats`] in training, the running ones in eval); x: [P, C] contiguous f32 on CPU.
/// The gradient treats `mean` and `var` as the batch's own, as training does.
pub fn batch_norm_relu_rows(
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
        BatchNormRelu {
            mean: mean.to_vec(),
            rstd,
        },
    )
}

struct BatchNormRelu {
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

impl BatchNormRelu {
    /// The per-column affine y = x * k + m that the normalisation folds to.
    fn folded(&self, w: &[f32], b: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let k: Vec<f32> = self.rstd.iter().zip(w).map(|(r, w)| r * w).collect();
        let m = (0..k.len()).map(|j| b[j] - self.mean[j] * k[j]).collect();
        (k, m)
    }
}

impl CustomOp3 for BatchNormRelu {
    fn name(&self) -> &'static str {
        "batch-norm-relu"
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
        let (k, m) = self.folded(as_f32(s2, l2, self.name())?, as_f32(s3, l3, self.name())?);
        let out = map_rows(x, k.len(), |o, row| {
            for (((o, v), k), m) in o.iter_mut().zip(row).zip(&k).zip(&m) {
                *o = (v * k + m).max(0.0);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (wv, bv) = (w.to_vec1::<f32>()?, b.to_vec1::<f32>()?);
        let (k, m) = self.folded(&wv, &bv);
        let g = grad.contiguous()?;
        let sums = x.apply_op2_no_bwd(
            &g,
            &GradSums {
                mean: &self.mean,
                rstd: &self.rstd,
                k: &k,
                m: &m,
            },
        )?; // [2, C]: db, dw
        let (db, dw) = (sums.get(0)?, sums.get(1)?);
        let dx = x.apply_op2_no_bwd(
            &g,
            &GradX {
                mean: &self.mean,
                rstd: &self.rstd,
                k: &k,
                m: &m,
                w: &wv,
                db: &db.to_vec1()?,
                dw: &dw.to_vec1()?,
            },
        )?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The ReLU's gate: the incoming gradient where the output was positive.
fn gated(g: f32, x: f32, k: f32, m: f32) -> f32 {
    if x * k + m > 0.0 {
        g
    } else {
        0.0
    }
}

/// [db; dw] = [sum g'; sum g' * xhat] over rows, g' the gated gradient.
struct GradSums<'a> {
    mean: &'a [f32],
    rstd: &'a [f32],
    k: &'a [f32],
    m: &'a [f32],
}

impl CustomOp2 for GradSums<'_> {
    fn name(&self) -> &'static str {
        "batch-norm-relu-dwb"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let (x, g) = (as_f32(s1, l1, self.name())?, as_f32(s2, l2, self.name())?);
        let c = self.k.len();
        let acc = fold_rows(x.len() / c, 2 * c, 64, |acc, r| {
            let (xr, gr) = (&x[r * c..(r + 1) * c], &g[r * c..(r + 1) * c]);
            for j in 0..c {
                let gj = gated(gr[j], xr[j], self.k[j], self.m[j]);
                acc[j] += gj;
                acc[c + j] += gj * (xr[j] - self.mean[j]) * self.rstd[j];
            }
        });
        Ok((CpuStorage::F32(acc), Shape::from((2, c))))
    }
}

/// dx = w * rstd / P * (P * g' - db - xhat * dw).
struct GradX<'a> {
    mean: &'a [f32],
    rstd: &'a [f32],
    k: &'a [f32],
    m: &'a [f32],
    w: &'a [f32],
    db: &'a [f32],
    dw: &'a [f32],
}

impl CustomOp2 for GradX<'_> {
    fn name(&self) -> &'static str {
        "batch-norm-relu-dx"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let (x, g) = (as_f32(s1, l1, self.name())?, as_f32(s2, l2, self.name())?);
        let c = self.k.len();
        let n = (x.len() / c) as f32;
        let scale: Vec<f32> = (0..c).map(|j| self.w[j] * self.rstd[j] / n).collect();
        let dx = map_rows2(x, g, c, |o, xr, gr| {
            for j in 0..c {
                let gj = gated(gr[j], xr[j], self.k[j], self.m[j]);
                let xhat = (xr[j] - self.mean[j]) * self.rstd[j];
                o[j] = scale[j] * (n * gj - self.db[j] - xhat * self.dw[j]);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}
