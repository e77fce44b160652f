//! One online adaptation step and its parts, one file per idea (see `design/methods.md`):
//! pseudo-label selection (fixed threshold or HIAST/IAST's instance-adaptive thresholds),
//! class-balanced self-labeling (CPSL), distribution-aware pixel contrast (SePiCo),
//! bidirectional pixel-prototype contrast with label transfer and bias calibration (BiDA), the
//! labeled instance bank (DIDA), HIAST's region-adaptive regularisers and hard-class
//! copy-paste (HPLA), source replay (DAFormer RCS, DACS ClassMix), and the guards (collapse
//! monitor, CoTTA restore). Each is a [`component::Component`]; [`step::Adapter`] runs the
//! switched-on ones as a pipeline.

pub mod bank;
pub mod bidirectional;
pub mod choose;
pub mod component;
pub mod config;
pub mod contrast;
pub mod controller;
pub mod cpsl;
pub mod guard;
pub mod hpla;
pub mod region;
pub mod replay;
pub mod signals;
pub mod sinkhorn;
pub mod step;
pub mod thresholds;
pub mod views;

pub use component::{Component, Geometry, IGNORE};
pub use config::{AdaptConfig, Method};

use crate::config::SegformerConfig;
use crate::model::TensorMap;
use crate::stats::SourceStats;

/// The switched-on components in pipeline order. The order is the order of every hook: CPSL
/// rectifies and DIDA blends in its instance level before the selection keeps and BiDA checks;
/// copy-paste pastes before ClassMix; the loss terms add up in this order.
pub fn components(
    cfg: &AdaptConfig,
    model: &SegformerConfig,
    stats: &SourceStats,
    source_weights: &TensorMap,
) -> candle_core::Result<Vec<Box<dyn Component>>> {
    let classes = model.num_labels();
    let mut v: Vec<Box<dyn Component>> = Vec::new();
    if cfg.hpla.on {
        v.push(Box::new(hpla::Hpla::new(&cfg.hpla, classes)));
    }
    if cfg.replay.on {
        v.push(Box::new(replay::SourceReplay::new(&cfg.replay)));
    }
    if cfg.region.on {
        v.push(Box::new(region::RegionTerms(cfg.region.clone())));
    }
    if cfg.sepico.on {
        v.push(Box::new(contrast::Sepico::new(cfg, stats)?));
    }
    if cfg.cpsl.on {
        v.push(Box::new(cpsl::Cpsl::new(&cfg.cpsl, stats)?));
    }
    if cfg.dida.on {
        v.push(Box::new(bank::Dida::new(&cfg.dida, classes, stats)?));
    }
    if cfg.guard.collapse {
        v.push(Box::new(guard::CollapseGuard(guard::CollapseMonitor::new(
            classes,
            cfg.guard.band,
            cfg.guard.warmup,
            cfg.guard.patience,
        ))));
    }
    v.push(Box::new(match cfg.ias.on {
        true => thresholds::Selection::Adaptive(thresholds::InstanceThresholds::new(
            classes,
            0.9,
            cfg.ias.alpha,
            cfg.ias.beta,
            cfg.ias.gamma,
        )),
        false => thresholds::Selection::Fixed(cfg.threshold),
    }));
    if cfg.bida.on {
        v.push(Box::new(bidirectional::Bida::new(&cfg.bida, stats)?));
    }
    if cfg.guard.restore > 0.0 {
        v.push(Box::new(guard::Restore::new(cfg, model, source_weights)?));
    }
    Ok(v)
}

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
