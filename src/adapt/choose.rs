//! Where a new condition starts, weighed on its first frames: the weights in place, the
//! source's, or a kept condition's, by a label-free signal (`adapt.budget.judge`). Frame
//! statistics alone pick the kept condition that looked nearest, and nothing checked that its
//! weights suit the new condition better than the source model does.

use super::config::Judge;
use super::signals::{judge, Signals};
use crate::model::{Segformer, TensorMap};
use candle_core::{Result, Tensor};

/// A candidate start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The weights in place (the frame statistics' choice).
    InPlace,
    /// The source model.
    Source,
    /// A kept condition's weights.
    Kept(usize),
}

impl std::fmt::Display for Start {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Start::InPlace => f.write_str("the weights in place"),
            Start::Source => f.write_str("the source weights"),
            Start::Kept(i) => write!(f, "condition {i}'s weights"),
        }
    }
}

/// A kept condition's adapted tensors laid over the source weights: a whole model's.
pub fn laid_over(source: &TensorMap, adapted: &TensorMap) -> TensorMap {
    let mut w = source.clone();
    w.extend(adapted.iter().map(|(k, v)| (k.clone(), v.clone())));
    w
}

/// The candidate `signal` rates highest on `frames`, and each candidate with its signals, in
/// the order the weights in place, the source's, the kept conditions'. `kept` are the kept
/// conditions' adapted tensors; ties go to the earlier candidate.
pub fn weigh(
    signal: Judge,
    in_place: &Segformer,
    source: &TensorMap,
    kept: &[(usize, &TensorMap)],
    frames: &[Tensor],
    prior: &[f32],
) -> Result<(Start, Vec<(Start, Signals)>)> {
    let cfg = &in_place.cfg;
    let mut others = vec![(Start::Source, Segformer::new(cfg, source.clone())?)];
    for &(i, adapted) in kept {
        others.push((
            Start::Kept(i),
            Segformer::new(cfg, laid_over(source, adapted))?,
        ));
    }
    // The source first: the signals' `source` agreement is with the first model.
    let mut models: Vec<&Segformer> = others.iter().map(|(_, m)| m).collect();
    models.insert(1, in_place);
    let mut starts: Vec<Start> = others.iter().map(|(s, _)| *s).collect();
    starts.insert(1, Start::InPlace);
    let mut rated: Vec<(Start, Signals)> = starts
        .into_iter()
        .zip(judge(&models, frames, prior)?)
        .collect();
    rated.swap(0, 1);
    let best = rated
        .iter()
        .enumerate()
        .max_by(|(ia, a), (ib, b)| signal.of(&a.1).total_cmp(&signal.of(&b.1)).then(ib.cmp(ia)))
        .map(|(_, r)| r.0)
        .expect("two candidates at least");
    Ok((best, rated))
}
