//! Patch extraction (im2col) on channel-last maps, so a strided convolution becomes one matmul
//! whose backward is a gather: the overlapping patch embeddings and the attention's reduction.

use super::{as_f32, MIN_CHUNK};
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug)]
struct Geometry {
    k: usize,
    s: usize,
    p: usize,
}

impl Geometry {
    fn out(&self, n: usize) -> Result<usize> {
        if n + 2 * self.p < self.k {
            bail!(
                "im2col: input size {n} is smaller than kernel {} with padding {}",
                self.k,
                self.p
            );
        }
        Ok((n + 2 * self.p - self.k) / self.s + 1)
    }
}

/// `x`: [B, H, W, C] -> patches [B, Ho * Wo, k * k * C], entries ordered (ky, kx, c).
/// Returns the patches and (Ho, Wo).
pub fn im2col(x: &Tensor, k: usize, s: usize, p: usize) -> Result<(Tensor, (usize, usize))> {
    let g = Geometry { k, s, p };
    let (_, h, w, _) = x.dims4()?;
    let hw = (g.out(h)?, g.out(w)?);
    if super::cpu_f32(x) {
        Ok((x.contiguous()?.apply_op1(Im2Col(g))?, hw))
    } else {
        im2col_generic(x, k, s, p)
    }
}

/// The same patches from index selections: differentiable through plain ops.
pub fn im2col_generic(
    x: &Tensor,
    k: usize,
    s: usize,
    p: usize,
) -> Result<(Tensor, (usize, usize))> {
    let g = Geometry { k, s, p };
    let (b, h, w, c) = x.dims4()?;
    let (ho, wo) = (g.out(h)?, g.out(w)?);
    let xp = x.pad_with_zeros(1, p, p)?.pad_with_zeros(2, p, p)?;
    let mut taps = Vec::with_capacity(k * k);
    for ky in 0..k {
        let rows: Vec<u32> = (0..ho).map(|o| (o * s + ky) as u32).collect();
        let rows = Tensor::new(rows, x.device())?;
        let xr = xp.index_select(&rows, 1)?;
        for kx in 0..k {
            let cols: Vec<u32> = (0..wo).map(|o| (o * s + kx) as u32).collect();
            let cols = Tensor::new(cols, x.device())?;
            taps.push(xr.index_select(&cols, 2)?);
        }
    }
    let patches = Tensor::stack(&taps, 3)?.reshape((b, ho * wo, k * k * c))?;
    Ok((patches, (ho, wo)))
}

struct Im2Col(Geometry);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let x = as_f32(st, l, "im2col")?;
        let (b, h, w, c) = l.shape().dims4()?;
        let Geometry { k, s, p } = self.0;
        let (ho, wo) = (self.0.out(h)?, self.0.out(w)?);
        let row = wo * k * k * c;
        let mut out = vec![0f32; b * ho * row];
        out.par_chunks_mut(row)
            .with_min_len(MIN_CHUNK)
            .enumerate()
            .for_each(|(r, o)| {
                let (bi, oy) = (r / ho, r % ho);
                for ky in 0..k {
                    let iy = oy * s + ky;
                    if iy < p || iy - p >= h {
                        continue;
                    }
                    let xrow = &x[(bi * h + iy - p) * w * c..][..w * c];
                    for ox in 0..wo {
                        for kx in 0..k {
                            let ix = ox * s + kx;
                            if ix < p || ix - p >= w {
                                continue;
                            }
                            let dst = &mut o[(ox * k * k + ky * k + kx) * c..][..c];
                            dst.copy_from_slice(&xrow[(ix - p) * c..][..c]);
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, ho * wo, k * k * c))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        let dx = g.apply_op1_no_bwd(&Col2Im {
            geo: self.0,
            dims: x.dims4()?,
        })?;
        Ok(Some(dx))
    }
}

/// The adjoint of [`Im2Col`]: each input pixel gathers the patch entries it was copied into.
struct Col2Im {
    geo: Geometry,
    dims: (usize, usize, usize, usize),
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let g = as_f32(st, l, "col2im")?;
        let (b, h, w, c) = self.dims;
        let Geometry { k, s, p } = self.geo;
        let (ho, wo) = (self.geo.out(h)?, self.geo.out(w)?);
        let kkc = k * k * c;
        let mut dx = vec![0f32; b * h * w * c];
        dx.par_chunks_mut(w * c)
            .with_min_len(MIN_CHUNK)
            .enumerate()
            .for_each(|(r, drow)| {
                let (bi, iy) = (r / h, r % h);
                for ky in 0..k {
                    let t = iy + p;
                    if t < ky || (t - ky) % s != 0 || (t - ky) / s >= ho {
                        continue;
                    }
                    let oy = (t - ky) / s;
                    for ix in 0..w {
                        let d = &mut drow[ix * c..][..c];
                        for kx in 0..k {
                            let t2 = ix + p;
                            if t2 < kx || (t2 - kx) % s != 0 || (t2 - kx) / s >= wo {
                                continue;
                            }
                            let ox = (t2 - kx) / s;
                            let src =
                                &g[((bi * ho + oy) * wo + ox) * kkc + (ky * k + kx) * c..][..c];
                            d.iter_mut().zip(src).for_each(|(a, v)| *a += v);
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(dx), Shape::from(self.dims)))
    }
}
