//! Differentiable ops that candle lacks, runs one-channel-at-a-time, or silently drops gradients
//! for. Each has a fast CPU kernel (a candle custom op with an analytic backward) and a generic
//! twin built from differentiable tensor ops, used on other devices and as the test reference.
//! The helpers below the re-exports keep the kernels' row loops, sums and thread use in one place.

mod affine;
mod batchnorm;
mod bilinear;
mod dwconv;
mod fused;
mod im2col;
mod linear;
mod norm;

pub use affine::add_bias;
pub(crate) use affine::ColumnSum;
pub use batchnorm::{batch_norm_relu_rows, column_stats};
pub use bilinear::{resize_add, resize_bilinear, resize_bilinear_generic};
pub use dwconv::{depthwise3x3, depthwise3x3_generic};
pub use fused::{dropout_bits, gelu, scale_by, softmax_cross_entropy};
pub use im2col::{im2col, im2col_generic};
pub use linear::linear;
pub use norm::{
    l2_normalize, l2_normalize_generic, layer_norm, layer_norm_generic, log_softmax_generic,
    log_softmax_last_dim, softmax_last_dim,
};

use candle_core::{backend::BackendStorage, bail, CpuStorage, Layout, Result};

/// The contiguous f32 slice behind a CPU storage; the custom kernels need nothing else.
pub(crate) fn as_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => match l.contiguous_offsets() {
            Some((a, b)) => Ok(&v[a..b]),
            None => bail!("{op}: input must be contiguous"),
        },
        other => bail!(
            "{op}: only f32 is supported on CPU, got {:?}",
            other.dtype()
        ),
    }
}

static GENERIC: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs every op, the optimizer and the EMA update through their generic twins on the CPU too:
/// the arithmetic a GPU runs, checked against the CPU kernels (process-wide; for tests).
pub fn force_generic(on: bool) {
    GENERIC.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the CPU kernels serve tensors on `dev`.
pub(crate) fn fast_cpu(dev: &candle_core::Device) -> bool {
    dev.is_cpu() && !GENERIC.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether the CPU kernels (f32 on the CPU) serve `x`; the generic twins serve the rest.
pub(crate) fn cpu_f32(x: &candle_core::Tensor) -> bool {
    fast_cpu(x.device()) && x.dtype() == candle_core::DType::F32
}

/// An output buffer of `n` floats for a kernel that writes every element before anything reads
/// it. `vec![0.0; n]` would zero it first: a pass over memory that was 5% of a training step.
pub(crate) fn output_buffer(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: f32 has no invalid bit patterns, and the callers overwrite all `n` elements.
    #[allow(clippy::uninit_vec)]
    unsafe {
        v.set_len(n)
    };
    v
}

/// The last dimension of a layout (1 for a scalar): the row width of the row-wise kernels.
pub(crate) fn last_dim(l: &Layout) -> usize {
    l.shape().dims().last().copied().unwrap_or(1)
}

/// Rows of width `d` in parallel: each output row filled by `f(out, row)` from `x`'s row.
pub(crate) fn map_rows(x: &[f32], d: usize, f: impl Fn(&mut [f32], &[f32]) + Sync) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = output_buffer(x.len());
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .with_min_len(MIN_CHUNK * 16)
        .for_each(|(o, row)| f(o, row));
    out
}

/// As [`map_rows`] over the matching rows of two inputs: `f(out, a_row, b_row)`.
pub(crate) fn map_rows2(
    a: &[f32],
    b: &[f32],
    d: usize,
    f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync,
) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = output_buffer(a.len());
    out.par_chunks_mut(d)
        .zip(a.par_chunks(d).zip(b.par_chunks(d)))
        .with_min_len(MIN_CHUNK * 16)
        .for_each(|(o, (a, b))| f(o, a, b));
    out
}

/// Accumulators in [`sum_zip`] and [`max_lanes`].
const LANES: usize = 8;

/// `sum f(a[i], b[i])` with eight interleaved accumulators, so the loop vectorises: one running
/// sum is a chain of dependent adds that the compiler may not reorder.
#[inline(always)]
pub(crate) fn sum_zip(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let n = a.len().min(b.len());
    let (ca, cb) = (a[..n].chunks_exact(LANES), b[..n].chunks_exact(LANES));
    let mut rest = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        rest += f(*x, *y);
    }
    let mut acc = [0f32; LANES];
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += f(x[l], y[l]);
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + rest
}

/// `sum a[i]`, vectorised as [`sum_zip`].
#[inline(always)]
pub(crate) fn sum_lanes(a: &[f32]) -> f32 {
    sum_zip(a, a, |x, _| x)
}

/// The largest element (-inf for an empty slice), with eight running maxima.
#[inline(always)]
pub(crate) fn max_lanes(a: &[f32]) -> f32 {
    let c = a.chunks_exact(LANES);
    let mut m = c
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let mut acc = [f32::NEG_INFINITY; LANES];
    for x in c {
        for l in 0..LANES {
            acc[l] = if x[l] > acc[l] { x[l] } else { acc[l] };
        }
    }
    for v in acc {
        m = m.max(v);
    }
    m
}

/// Runs `f` on a worker of rayon's global pool (directly when already on one). The kernels'
/// parallel loops then start from inside the pool: called from outside, every one of a step's
/// thousand-odd loops is injected into the pool and waited for, which cost ~8% of a 2x256x256
/// training step on 2 cores.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Rows of work per rayon task: big enough that scheduling stays cheap on a 2-core machine.
pub(crate) const MIN_CHUNK: usize = 4;

/// Sums per-row contributions into `width` accumulators: `add(acc, r)` adds row `r`'s share.
/// Rows go in fixed blocks of `block`, each block into its own accumulators in parallel, and the
/// blocks' sums are added in block order: the same bits for any thread count and schedule
/// (rayon's `fold` splits wherever work is stolen, so its sums changed from run to run). The
/// column sums of the bias, norm, BatchNorm and depthwise-kernel gradients all have this shape.
pub(crate) fn fold_rows(
    rows: usize,
    width: usize,
    block: usize,
    add: impl Fn(&mut [f32], usize) + Sync,
) -> Vec<f32> {
    use rayon::prelude::*;
    let partials: Vec<Vec<f32>> = (0..rows.div_ceil(block))
        .into_par_iter()
        .map(|k| {
            let mut acc = vec![0f32; width];
            for r in k * block..((k + 1) * block).min(rows) {
                add(&mut acc, r);
            }
            acc
        })
        .collect();
    let mut total = vec![0f32; width];
    for p in partials {
        total.iter_mut().zip(p).for_each(|(t, v)| *t += v);
    }
    total
}
