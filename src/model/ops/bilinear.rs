//! Bilinear resize with PyTorch's `align_corners = False` semantics (what HF SegFormer uses for
//! the decoder and the loss), on channel-last maps, with a gradient.

use super::{as_f32, output_buffer, MIN_CHUNK};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Source taps for one axis: (i0, i1, w0, w1) for every output index.
fn axis_taps(input: usize, output: usize) -> Vec<(usize, usize, f32, f32)> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src as usize).min(input - 1);
            let i1 = if i0 + 1 < input { i0 + 1 } else { i0 };
            let w1 = src - i0 as f32;
            (i0, i1, 1.0 - w1, w1)
        })
        .collect()
}

/// `x`: [N, H, W, C] -> [N, out_h, out_w, C].
pub fn resize_bilinear(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, h, w, _) = x.dims4()?;
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    if super::cpu_f32(x) {
        x.contiguous()?.apply_op1(Bilinear { out_h, out_w })
    } else {
        resize_bilinear_generic(x, out_h, out_w)
    }
}

/// Interpolation matrix [input, output] for one axis.
fn axis_matrix(input: usize, output: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let mut m = vec![0f32; input * output];
    for (o, (i0, i1, w0, w1)) in axis_taps(input, output).into_iter().enumerate() {
        m[i0 * output + o] += w0;
        m[i1 * output + o] += w1;
    }
    Tensor::from_vec(m, (input, output), dev)
}

/// The same resize as two plain 2-D matmuls with interpolation matrices.
pub fn resize_bilinear_generic(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (n, h, w, c) = x.dims4()?;
    let dev = x.device();
    // Along W: [N, H, C, W] x [W, Wo].
    let t = x
        .permute((0, 1, 3, 2))?
        .contiguous()?
        .reshape((n * h * c, w))?;
    let t = t
        .matmul(&axis_matrix(w, out_w, dev)?.to_dtype(x.dtype())?)?
        .reshape((n, h, c, out_w))?;
    // Along H: [N, Wo, C, H] x [H, Ho].
    let t = t
        .permute((0, 3, 2, 1))?
        .contiguous()?
        .reshape((n * out_w * c, h))?;
    let t = t
        .matmul(&axis_matrix(h, out_h, dev)?.to_dtype(x.dtype())?)?
        .reshape((n, out_w, c, out_h))?;
    t.permute((0, 3, 1, 2))?.contiguous()
}

struct Bilinear {
    out_h: usize,
    out_w: usize,
}

impl CustomOp1 for Bilinear {
    fn name(&self) -> &'static str {
        "resize-bilinear"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let x = as_f32(st, l, "resize-bilinear")?;
        let (n, _, _, c) = l.shape().dims4()?;
        let mut out = output_buffer(n * self.out_h * self.out_w * c);
        resize_into(
            x,
            l.shape().dims4()?,
            &mut out,
            (self.out_h, self.out_w),
            false,
        );
        Ok((
            CpuStorage::F32(out),
            Shape::from((n, self.out_h, self.out_w, c)),
        ))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, h, w, _) = x.dims4()?;
        let op = BilinearGrad { h, w };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// Resizes `x` ([n, h, w, c]) into `out` ([n, out_h, out_w, c]), or adds the resized map to it.
fn resize_into(
    x: &[f32],
    (n, h, w, c): (usize, usize, usize, usize),
    out: &mut [f32],
    (out_h, out_w): (usize, usize),
    add: bool,
) {
    let (ty, tx) = (axis_taps(h, out_h), axis_taps(w, out_w));
    debug_assert_eq!(out.len(), n * out_h * out_w * c);
    out.par_chunks_mut(out_w * c)
        .with_min_len(MIN_CHUNK)
        .enumerate()
        .for_each(|(r, o)| {
            let (ni, oy) = (r / out_h, r % out_h);
            let (y0, y1, wy0, wy1) = ty[oy];
            let r0 = &x[(ni * h + y0) * w * c..][..w * c];
            let r1 = &x[(ni * h + y1) * w * c..][..w * c];
            for (ox, &(x0, x1, wx0, wx1)) in tx.iter().enumerate() {
                let d = &mut o[ox * c..][..c];
                let (a, b) = (&r0[x0 * c..][..c], &r0[x1 * c..][..c]);
                let (e, f) = (&r1[x0 * c..][..c], &r1[x1 * c..][..c]);
                for t in 0..c {
                    let v = wy0 * (wx0 * a[t] + wx1 * b[t]) + wy1 * (wx0 * e[t] + wx1 * f[t]);
                    d[t] = if add { d[t] + v } else { v };
                }
            }
        });
}

/// `acc + sum_i resize(xs[i])`: `acc` [N, H, W, C], each `xs[i]` [N, h_i, w_i, C] resized to
/// H x W. One output instead of a resized map and a partial sum per input, and the backward
/// needs none of them: the inputs travel as one flat tensor.
pub fn resize_add(acc: &Tensor, xs: &[Tensor]) -> Result<Tensor> {
    let (_, out_h, out_w, _) = acc.dims4()?;
    if !super::cpu_f32(acc) {
        return xs.iter().try_fold(acc.clone(), |y, x| {
            y + resize_bilinear_generic(x, out_h, out_w)?
        });
    }
    let dims = xs.iter().map(|x| x.dims4()).collect::<Result<Vec<_>>>()?;
    let flat = xs
        .iter()
        .map(|x| x.flatten_all())
        .collect::<Result<Vec<_>>>()?;
    acc.contiguous()?
        .apply_op2(&Tensor::cat(&flat, 0)?, ResizeAdd { dims })
}

struct ResizeAdd {
    /// The inputs' [N, h, w, C], in the order of the flat tensor.
    dims: Vec<(usize, usize, usize, usize)>,
}

impl CustomOp2 for ResizeAdd {
    fn name(&self) -> &'static str {
        "resize-add"
    }

    fn cpu_fwd(
        &self,
        sa: &CpuStorage,
        la: &Layout,
        sx: &CpuStorage,
        lx: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let acc = as_f32(sa, la, "resize-add")?;
        let flat = as_f32(sx, lx, "resize-add")?;
        let (_, out_h, out_w, _) = la.shape().dims4()?;
        let mut out = acc.to_vec();
        let mut at = 0;
        for &(n, h, w, c) in &self.dims {
            let x = &flat[at..at + n * h * w * c];
            resize_into(x, (n, h, w, c), &mut out, (out_h, out_w), true);
            at += x.len();
        }
        Ok((CpuStorage::F32(out), la.shape().clone()))
    }

    fn bwd(
        &self,
        _acc: &Tensor,
        _flat: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let parts = self
            .dims
            .iter()
            .map(|&(_, h, w, _)| grad.apply_op1_no_bwd(&BilinearGrad { h, w })?.flatten_all())
            .collect::<Result<Vec<_>>>()?;
        Ok((Some(grad), Some(Tensor::cat(&parts, 0)?)))
    }
}

/// For each input index, the output indices that read it and with what weight.
fn axis_readers(input: usize, output: usize) -> Vec<Vec<(usize, f32)>> {
    let mut readers = vec![Vec::new(); input];
    for (o, (i0, i1, w0, w1)) in axis_taps(input, output).into_iter().enumerate() {
        readers[i0].push((o, w0));
        readers[i1].push((o, w1));
    }
    readers
}

/// The adjoint of [`Bilinear`], as a gather so rows can be computed in parallel.
struct BilinearGrad {
    h: usize,
    w: usize,
}

impl CustomOp1 for BilinearGrad {
    fn name(&self) -> &'static str {
        "resize-bilinear-grad"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let g = as_f32(st, l, "resize-bilinear-grad")?;
        let (n, oh, ow, c) = l.shape().dims4()?;
        let (ry, rx) = (axis_readers(self.h, oh), axis_readers(self.w, ow));
        let mut dx = vec![0f32; n * self.h * self.w * c];
        dx.par_chunks_mut(self.w * c)
            .with_min_len(MIN_CHUNK)
            .enumerate()
            .for_each(|(r, drow)| {
                let (ni, iy) = (r / self.h, r % self.h);
                for &(oy, wy) in &ry[iy] {
                    let grow = &g[(ni * oh + oy) * ow * c..][..ow * c];
                    for (ix, readers) in rx.iter().enumerate() {
                        let d = &mut drow[ix * c..][..c];
                        for &(ox, wx) in readers {
                            let wgt = wy * wx;
                            let src = &grow[ox * c..][..c];
                            d.iter_mut().zip(src).for_each(|(a, v)| *a += wgt * v);
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(dx), Shape::from((n, self.h, self.w, c))))
    }
}
