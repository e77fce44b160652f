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

/// The candidate `signal` rates highest on `frames`, and each candidate with its signals.
/// `kept` are the kept conditions' adapted tensors (laid over `source`'s); ties go to the
/// earlier candidate, the weights in place first.
pub fn weigh(
    signal: Judge,
    in_place: &Segformer,
    source: &TensorMap,
    kept: &[(usize, &TensorMap)],
    frames: &[Tensor],
    prior: &[f32],
) -> Result<(Start, Vec<(Start, Signals)>)> {
    let cfg = &in_place.cfg;
    let mut starts = vec![Start::InPlace, Start::Source];
    let mut models = vec![Segformer::new(cfg, source.clone())?];
    for &(i, weights) in kept {
        let mut w = source.clone();
        w.extend(weights.iter().map(|(k, v)| (k.clone(), v.clone())));
        models.push(Segformer::new(cfg, w)?);
        starts.push(Start::Kept(i));
    }
    // The source first: the signals' `source` agreement is with the first model.
    let mut refs: Vec<&Segformer> = models.iter().collect();
    refs.insert(1, in_place);
    let signals = judge(&refs, frames, prior)?;
    // `refs` is source, in place, kept...; `starts` is in place, source, kept...
    let mut rated: Vec<(Start, Signals)> = starts
        .into_iter()
        .map(|s| (s, Signals::default()))
        .collect();
    rated[0].1 = signals[1].clone();
    rated[1].1 = signals[0].clone();
    for (r, s) in rated.iter_mut().skip(2).zip(signals.into_iter().skip(2)) {
        r.1 = s;
    }
    let best = rated
        .iter()
        .enumerate()
        .max_by(|(ia, a), (ib, b)| signal.of(&a.1).total_cmp(&signal.of(&b.1)).then(ib.cmp(ia)))
        .map(|(_, r)| r.0)
        .expect("two candidates at least");
    Ok((best, rated))
}
