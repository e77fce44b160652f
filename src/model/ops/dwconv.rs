//! Depthwise 3x3 convolution (stride 1, padding 1) on channel-last maps, as in the Mix-FFN.
//! One pass over all channels at once, instead of candle's one convolution per group.

use super::{as_f32, fold_rows, output_buffer, ColumnSum, MIN_CHUNK};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `x`: [B, H, W, C] channel-last, `w`: [C, 1, 3, 3] (HF/PyTorch layout), `b`: [C]. Returns
/// [B, H, W, C].
pub fn depthwise3x3(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (.., c) = check_shapes(x, w)?;
    if b.dims() != [c] {
        bail!("depthwise3x3: bias {:?} for {c} channels", b.dims());
    }
    if super::cpu_f32(x) {
        x.contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, DwConvBias)
    } else {
        depthwise3x3_generic(x, w)?.broadcast_add(b)
    }
}

/// The same convolution, without bias, as nine shifted, weighted copies: differentiable through
/// plain ops.
pub fn depthwise3x3_generic(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (_, h, wd, c) = check_shapes(x, w)?;
    let xp = x.pad_with_zeros(1, 1, 1)?.pad_with_zeros(2, 1, 1)?;
    let w9 = w.reshape((c, 9))?.t()?.contiguous()?; // [9, C]
    let mut acc: Option<Tensor> = None;
    for k in 0..9 {
        let (ky, kx) = (k / 3, k % 3);
        let tap = xp
            .narrow(1, ky, h)?
            .narrow(2, kx, wd)?
            .broadcast_mul(&w9.get(k)?)?;
        acc = Some(match acc {
            None => tap,
            Some(a) => (a + tap)?,
        });
    }
    Ok(acc.expect("nine taps"))
}

fn check_shapes(x: &Tensor, w: &Tensor) -> Result<(usize, usize, usize, usize)> {
    let (b, h, wd, c) = x.dims4()?;
    if w.dims() != [c, 1, 3, 3] {
        bail!(
            "depthwise3x3: weight {:?} does not match {c} channels (want [{c}, 1, 3, 3])",
            w.dims()
        );
    }
    Ok((b, h, wd, c))
}

/// The forward op: convolution plus bias.
struct DwConvBias;

/// The input gradient: the correlation with the kernel rotated 180 degrees, no bias.
struct DwConvFlipped;

/// Weights as [9][C] so the inner loop runs over contiguous channels.
fn taps_by_channel(w: &[f32], c: usize, flip: bool) -> Vec<f32> {
    let mut t = vec![0f32; 9 * c];
    for ch in 0..c {
        for k in 0..9 {
            let src = if flip { 8 - k } else { k };
            t[k * c + ch] = w[ch * 9 + src];
        }
    }
    t
}

/// `bias` (or zero) plus the 3x3 taps over each output row.
fn conv_rows(
    x: &[f32],
    taps: &[f32],
    bias: Option<&[f32]>,
    (h, wd, c): (usize, usize, usize),
    out: &mut [f32],
) {
    out.par_chunks_mut(wd * c)
        .with_min_len(MIN_CHUNK)
        .enumerate()
        .for_each(|(row, o)| {
            // Initialised here rather than up front, while the row is in cache.
            match bias {
                Some(b) => o.chunks_exact_mut(c).for_each(|px| px.copy_from_slice(b)),
                None => o.fill(0.0),
            }
            let (bi, i) = (row / h, row % h);
            for ky in 0..3 {
                let ii = i + ky;
                if ii < 1 || ii > h {
                    continue;
                }
                let xrow = &x[(bi * h + ii - 1) * wd * c..][..wd * c];
                for kx in 0..3 {
                    let ws = &taps[(ky * 3 + kx) * c..][..c];
                    for j in 0..wd {
                        let jj = j + kx;
                        if jj < 1 || jj > wd {
                            continue;
                        }
                        let xs = &xrow[(jj - 1) * c..][..c];
                        let os = &mut o[j * c..][..c];
                        for t in 0..c {
                            os[t] += xs[t] * ws[t];
                        }
                    }
                }
            }
        });
}

impl CustomOp3 for DwConvBias {
    fn name(&self) -> &'static str {
        "depthwise3x3"
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
        let (_, h, wd, c) = l1.shape().dims4()?;
        let mut out = output_buffer(x.len());
        conv_rows(
            x,
            &taps_by_channel(w, c, false),
            Some(b),
            (h, wd, c),
            &mut out,
        );
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
        let dx = g.apply_op2_no_bwd(w, &DwConvFlipped)?;
        let dw = x.apply_op2_no_bwd(&g, &DwConvWeightGrad)?;
        let db = g.apply_op1_no_bwd(&ColumnSum)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

impl CustomOp2 for DwConvFlipped {
    fn name(&self) -> &'static str {
        "depthwise3x3-dx"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let g = as_f32(s1, l1, self.name())?;
        let w = as_f32(s2, l2, self.name())?;
        let (_, h, wd, c) = l1.shape().dims4()?;
        let mut out = output_buffer(g.len());
        conv_rows(g, &taps_by_channel(w, c, true), None, (h, wd, c), &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// dW[c, ky, kx] = sum over b, i, j of grad[b, i, j, c] * x[b, i + ky - 1, j + kx - 1, c].
struct DwConvWeightGrad;

impl CustomOp2 for DwConvWeightGrad {
    fn name(&self) -> &'static str {
        "depthwise3x3-wgrad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let x = as_f32(s1, l1, "depthwise3x3-wgrad")?;
        let g = as_f32(s2, l2, "depthwise3x3-wgrad")?;
        let (b, h, wd, c) = l1.shape().dims4()?;
        // Image rows in blocks of 4: fold_rows keeps the sum's order fixed.
        let acc = fold_rows(b * h, 9 * c, 4, |acc, row| {
            let (bi, i) = (row / h, row % h);
            let grow = &g[row * wd * c..][..wd * c];
            for ky in 0..3 {
                let ii = i + ky;
                if ii < 1 || ii > h {
                    continue;
                }
                let xrow = &x[(bi * h + ii - 1) * wd * c..][..wd * c];
                for kx in 0..3 {
                    let a = &mut acc[(ky * 3 + kx) * c..][..c];
                    for j in 0..wd {
                        let jj = j + kx;
                        if jj < 1 || jj > wd {
                            continue;
                        }
                        let xs = &xrow[(jj - 1) * c..][..c];
                        let gs = &grow[j * c..][..c];
                        for t in 0..c {
                            a[t] += xs[t] * gs[t];
                        }
                    }
                }
            }
        });
        let mut out = vec![0f32; 9 * c];
        for ch in 0..c {
            for k in 0..9 {
                out[ch * 9 + k] = acc[k * c + ch];
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((c, 1, 3, 3))))
    }
}
