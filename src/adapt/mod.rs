//! The parts of one online adaptation step, one file per idea (see `design/methods.md`):
//! instance-adaptive thresholds (HIAST/IAST), class-balanced Sinkhorn assignment (CPSL),
//! distribution-aware pixel contrast (SePiCo), bidirectional pixel-prototype contrast with label
//! transfer and bias calibration (BiDA), the labeled instance bank (DIDA), HIAST's
//! region-adaptive regularisers, and the optional source replay buffer (DAFormer RCS, DACS
//! ClassMix). The step that wires them to the pipeline builds on these.

pub mod bank;
pub mod bidirectional;
pub mod config;
pub mod contrast;
pub mod guard;
pub mod hpla;
pub mod region;
pub mod replay;
pub mod sinkhorn;
pub mod step;
pub mod thresholds;
pub mod views;

pub use config::AdaptConfig;

/// Per-class means of the rows of `f` [N, D] under `labels` (values >= `classes` skipped):
/// the flattened [classes, D] means and each class's row count (0: absent, mean left at 0).
pub(crate) fn class_means(
    f: &candle_core::Tensor,
    labels: &[u32],
    classes: usize,
) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
    let d = f.dim(1)?;
    let fv: Vec<f32> = f.detach().flatten_all()?.to_vec1()?;
    let mut sum = vec![0f32; classes * d];
    let mut n = vec![0f32; classes];
    for (i, &l) in labels.iter().enumerate() {
        let l = l as usize;
        if l >= classes {
            continue;
        }
        n[l] += 1.0;
        sum[l * d..(l + 1) * d]
            .iter_mut()
            .zip(&fv[i * d..(i + 1) * d])
            .for_each(|(a, b)| *a += b);
    }
    for (k, &cnt) in n.iter().enumerate() {
        if cnt > 0.0 {
            sum[k * d..(k + 1) * d].iter_mut().for_each(|v| *v /= cnt);
        }
    }
    Ok((sum, n))
}
