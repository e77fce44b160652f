//! Fused elementwise work that candle would spread over many passes and temporaries:
//! exact (erf) GELU, softmax cross-entropy with an ignore label and constant (dropout, drop
//! path) scaling, each with its backward.

use super::{as_f32, cpu_f32, max_lanes, output_buffer, sum_lanes};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// erf in f32 as a rational function on [-4, 4] (Eigen's `generic_fast_erf_float`; outside it
/// erf is +-1 in f32). Branch-free, so the GELU loops vectorise; within 1e-6 of libm's erff
/// (checked in the tests).
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_6e-3;
    p = x2 * p + -1.609_603_3e-2;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329e-3;
    q = x2 * q + -1.426_473_9e-2;
    x * p / q
}

/// exp(x) for x <= 0 in f32, branch-free so the GELU gradient loop vectorises: 2^n times a
/// degree-6 polynomial on [-ln2/2, ln2/2] (Cephes' expf), within 2e-7 relative of libm above
/// -87; below, exp(-87) ~ 1.6e-38 (checked in the tests).
#[inline(always)]
pub(crate) fn exp_neg(x: f32) -> f32 {
    let x = x.clamp(-87.0, 0.0);
    // Round to nearest by adding and removing 1.5 * 2^23: plain SSE2, where `round` is a call.
    const MAGIC: f32 = 12_582_912.0;
    let n = (x * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4 * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127).max(0) as u32) << 23)
}

/// GELU with the exact erf form, as HF's `"gelu"`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if super::cpu_f32(x) {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        x.gelu_erf()
    }
}

const CHUNK: usize = 4096;

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let x = as_f32(st, l, "gelu-erf")?;
        let mut out = output_buffer(x.len());
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(o, x)| {
                for (o, &v) in o.iter_mut().zip(x) {
                    *o = 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluGrad)?))
    }
}

/// d/dx GELU = Phi(x) + x phi(x).
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "gelu-erf-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let x = as_f32(s1, l1, "gelu-erf-grad")?;
        let g = as_f32(s2, l2, "gelu-erf-grad")?;
        let mut out = output_buffer(x.len());
        let inv_sqrt_2pi = 0.398_942_3_f32;
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
            .for_each(|(o, (x, g))| {
                for ((o, &v), &gv) in o.iter_mut().zip(x).zip(g) {
                    let cdf = 0.5 * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
                    let pdf = inv_sqrt_2pi * exp_neg(-0.5 * v * v);
                    *o = gv * (cdf + v * pdf);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Per-pixel -log softmax(logits)[label] (0 where label == ignore). `logits`: [P, C] f32,
/// `labels`: u32 [P]. The gradient flows to the logits only.
pub fn softmax_cross_entropy(logits: &Tensor, labels: &Tensor, ignore: u32) -> Result<Tensor> {
    logits.contiguous()?.apply_op2(
        &labels.contiguous()?,
        SoftmaxXent {
            ignore,
            dlogits: Mutex::new(Vec::new()),
        },
    )
}

/// The forward keeps d nll / d logits = softmax - onehot (PyTorch keeps the log-softmax), so the
/// backward is one scaling pass instead of a second round of exponentials.
struct SoftmaxXent {
    ignore: u32,
    dlogits: Mutex<Vec<f32>>,
}

fn labels_u32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::U32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => bail!("softmax-xent: labels must be contiguous u32"),
    }
}

/// Rows per task: the exponentials of a block go through one flat loop, which vectorises.
const XENT_ROWS: usize = 256;

impl CustomOp2 for SoftmaxXent {
    fn name(&self) -> &'static str {
        "softmax-xent"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let x = as_f32(s1, l1, "softmax-xent")?;
        let y = labels_u32(s2, l2)?;
        let (p, c) = l1.shape().dims2()?;
        if y.len() != p {
            bail!("softmax-xent: {} labels for {p} rows", y.len());
        }
        let mut out = vec![0f32; p];
        let mut d = output_buffer(x.len());
        out.par_chunks_mut(XENT_ROWS)
            .zip(d.par_chunks_mut(XENT_ROWS * c))
            .zip(x.par_chunks(XENT_ROWS * c).zip(y.par_chunks(XENT_ROWS)))
            .for_each(|((out, d), (x, y))| {
                // d <- x - rowmax, then exp over the whole block, then normalise per row.
                let mut maxes = [0f32; XENT_ROWS];
                for ((drow, xrow), m) in
                    d.chunks_exact_mut(c).zip(x.chunks_exact(c)).zip(&mut maxes)
                {
                    *m = max_lanes(xrow);
                    drow.iter_mut().zip(xrow).for_each(|(d, v)| *d = v - *m);
                }
                d.iter_mut().for_each(|v| *v = exp_neg(*v));
                for (((o, drow), (xrow, &lab)), max) in out
                    .iter_mut()
                    .zip(d.chunks_exact_mut(c))
                    .zip(x.chunks_exact(c).zip(y))
                    .zip(maxes)
                {
                    if lab == self.ignore || lab as usize >= c {
                        drow.fill(0.0);
                        continue;
                    }
                    let sum = sum_lanes(drow);
                    *o = max + sum.ln() - xrow[lab as usize];
                    let inv = 1.0 / sum;
                    drow.iter_mut().for_each(|v| *v *= inv);
                    drow[lab as usize] -= 1.0;
                }
            });
        *self.dlogits.lock().expect("softmax-xent stash") = d;
        Ok((CpuStorage::F32(out), Shape::from(p)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (p, c) = x.dims2()?;
        let g = grad.contiguous()?.to_vec1::<f32>()?;
        let stash = self.dlogits.lock().expect("softmax-xent stash");
        if stash.len() != p * c {
            bail!("softmax-xent: backward before the forward");
        }
        let mut d = output_buffer(p * c);
        d.par_chunks_mut(XENT_ROWS * c)
            .zip(stash.par_chunks(XENT_ROWS * c).zip(g.par_chunks(XENT_ROWS)))
            .for_each(|(d, (s, g))| {
                for ((drow, srow), g) in d.chunks_exact_mut(c).zip(s.chunks_exact(c)).zip(g) {
                    drow.iter_mut().zip(srow).for_each(|(d, s)| *d = s * g);
                }
            });
        Ok((Some(Tensor::from_vec(d, (p, c), x.device())?), None))
    }
}

/// `x` times constant factors, one per block of `x.len() / factors.len()` consecutive elements:
/// per element for a dropout mask, per sample for drop path. As an op the backward scales the
/// gradient alike and spends nothing on a gradient for the constants (candle's multiply computes
/// one: a full extra pass).
pub fn scale_by(x: &Tensor, factors: Vec<f32>) -> Result<Tensor> {
    let n = x.elem_count();
    if factors.is_empty() || n % factors.len() != 0 {
        bail!("scale-by: {} factors for {n} elements", factors.len());
    }
    if cpu_f32(x) {
        x.contiguous()?.apply_op1(ScaleBy(factors))
    } else {
        let block = n / factors.len();
        let f = Tensor::from_vec(factors, (n / block, 1), x.device())?.to_dtype(x.dtype())?;
        x.reshape((n / block, block))?
            .broadcast_mul(&f)?
            .reshape(x.shape())
    }
}

/// Inverted dropout of `x` by a kept-element bitmap (bit `i % 64` of word `i / 64` for element
/// `i`): kept elements scaled by `scale`, the others zero. The bitmap is what the graph keeps for
/// the backward pass: an eighth of a byte per element, where a mask of factors takes four.
pub fn dropout_bits(x: &Tensor, kept: Vec<u64>, scale: f32) -> Result<Tensor> {
    let n = x.elem_count();
    if kept.len() != n.div_ceil(64) {
        bail!("dropout: {} mask words for {n} elements", kept.len());
    }
    if cpu_f32(x) {
        x.contiguous()?.apply_op1(DropoutBits { kept, scale })
    } else {
        let factors: Vec<f32> = (0..n)
            .map(|i| match kept[i / 64] >> (i % 64) & 1 {
                1 => scale,
                _ => 0.0,
            })
            .collect();
        let f = Tensor::from_vec(factors, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * f
    }
}

struct DropoutBits {
    kept: Vec<u64>,
    scale: f32,
}

impl CustomOp1 for DropoutBits {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let x = as_f32(s, l, self.name())?;
        let mut out = output_buffer(x.len());
        // Chunks of whole mask words, so each chunk starts at bit 0 of its first word.
        let words = CHUNK / 64;
        out.par_chunks_mut(words * 64)
            .zip(x.par_chunks(words * 64).zip(self.kept.par_chunks(words)))
            .for_each(|(o, (x, kept))| {
                for (i, (o, v)) in o.iter_mut().zip(x).enumerate() {
                    *o = match kept[i / 64] >> (i % 64) & 1 {
                        1 => v * self.scale,
                        _ => 0.0,
                    };
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

struct ScaleBy(Vec<f32>);

impl CustomOp1 for ScaleBy {
    fn name(&self) -> &'static str {
        "scale-by"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let x = as_f32(s, l, self.name())?;
        let f = &self.0;
        let block = x.len() / f.len();
        let mut out = output_buffer(x.len());
        if block == 1 {
            out.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK).zip(f.par_chunks(CHUNK)))
                .for_each(|(o, (x, f))| {
                    for ((o, v), k) in o.iter_mut().zip(x).zip(f) {
                        *o = v * k;
                    }
                });
        } else {
            for ((o, x), &k) in out.chunks_mut(block).zip(x.chunks(block)).zip(f.iter()) {
                o.par_chunks_mut(CHUNK)
                    .zip(x.par_chunks(CHUNK))
                    .for_each(|(o, x)| o.iter_mut().zip(x).for_each(|(o, v)| *o = v * k));
            }
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fast_erf_matches_libm() {
        let worst = (-60_000..=60_000)
            .map(|i| i as f32 / 10_000.0)
            .map(|x| (super::erf(x) - libm::erff(x)).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-6, "max error {worst}");
    }

    #[test]
    fn fast_exp_matches_libm_below_zero() {
        let worst = (0..=870_000)
            .map(|i| -(i as f32) / 10_000.0)
            .map(|x| {
                let want = x.exp();
                (super::exp_neg(x) - want).abs() / want.max(f32::MIN_POSITIVE)
            })
            .fold(0f32, f32::max);
        assert!(worst < 2e-7, "max relative error {worst}");
        assert!(super::exp_neg(-200.0) < 2e-38);
        assert_eq!(super::exp_neg(0.0), 1.0);
    }
}
