//! Label-free signals of how well a set of weights suits a stream's frames, for choosing among
//! candidate weights (the source's and those kept for other conditions) without labels.
//! `examples/signal_rank` checks how each ranks weights against the labels' ranking.

use crate::model::Segformer;
use candle_core::{Result, Tensor, D};

/// One candidate's signals on a set of frames, each a mean over their pixels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Signals {
    /// The top class probability.
    pub confidence: f64,
    /// One minus the entropy over log C: 1 where every pixel is certain.
    pub certainty: f64,
    /// The share of pixels whose class the mirrored frame gives back.
    pub flip: f64,
    /// The share of pixels whose class is the candidates' majority class there.
    pub consensus: f64,
    /// The share of pixels whose class is the first candidate's (the source weights').
    pub source: f64,
    /// Minus the KL divergence of the source's class prior from the candidate's predicted
    /// class shares over the frames: 0 where it labels the frames in the source's proportions.
    pub prior: f64,
}

/// Signals of every model on `frames` (each [1, 3, H, W], preprocessed), the first model being
/// the source, whose class prior is `prior`. Each pass runs every model once on each frame and
/// once on its mirror image.
pub fn judge(models: &[&Segformer], frames: &[Tensor], prior: &[f32]) -> Result<Vec<Signals>> {
    let mut sums = vec![Signals::default(); models.len()];
    let mut shares = vec![vec![0f64; prior.len()]; models.len()];
    let mut pixels = 0f64;
    for x in frames {
        let mirrored = mirror(x)?;
        let mut classes = Vec::with_capacity(models.len());
        for (m, s) in models.iter().zip(&mut sums) {
            let probs = candle_nn::ops::softmax_last_dim(&m.forward(x, None)?.logits)?;
            let back = candle_nn::ops::softmax_last_dim(&m.forward(&mirrored, None)?.logits)?;
            let class = probs.argmax(D::Minus1)?;
            let c = probs.dim(D::Minus1)? as f64;
            let top = probs.max(D::Minus1)?;
            let ent = (probs.clone() * probs.clamp(1e-12, 1.0)?.log()?)?
                .sum(D::Minus1)?
                .neg()?;
            s.confidence += top.sum_all()?.to_scalar::<f32>()? as f64;
            s.certainty += (ent / c.ln())?
                .affine(-1.0, 1.0)?
                .sum_all()?
                .to_scalar::<f32>()? as f64;
            // [1, h, w] classes of the mirror image, mirrored back along w.
            let back = mirror_last(&back.argmax(D::Minus1)?)?;
            s.flip += share_equal(&class, &back)?;
            classes.push(class);
        }
        pixels += classes[0].elem_count() as f64;
        let vote = majority(&classes, models.len())?;
        for ((class, s), counts) in classes.iter().zip(&mut sums).zip(&mut shares) {
            s.consensus += share_equal(class, &vote)?;
            s.source += share_equal(class, &classes[0])?;
            for k in class.flatten_all()?.to_vec1::<u32>()? {
                if let Some(c) = counts.get_mut(k as usize) {
                    *c += 1.0;
                }
            }
        }
    }
    let n = pixels.max(1.0);
    Ok(sums
        .into_iter()
        .zip(&shares)
        .map(|(s, counts)| Signals {
            confidence: s.confidence / n,
            certainty: s.certainty / n,
            flip: s.flip / n,
            consensus: s.consensus / n,
            source: s.source / n,
            prior: -kl(prior, counts),
        })
        .collect())
}

/// KL(p || q) of the class prior `p` from the class counts `q` (normalised), each share floored
/// at 1e-4 so a class one of them lacks costs a bounded amount.
fn kl(p: &[f32], counts: &[f64]) -> f64 {
    let total: f64 = counts.iter().sum::<f64>().max(1.0);
    let psum: f64 = p.iter().map(|&v| v as f64).sum::<f64>().max(1e-12);
    p.iter()
        .zip(counts)
        .map(|(&pv, &c)| {
            let p = (pv as f64 / psum).max(1e-4);
            let q = (c / total).max(1e-4);
            p * (p / q).ln()
        })
        .sum()
}

/// The image mirrored left to right: [B, C, H, W] along W.
fn mirror(x: &Tensor) -> Result<Tensor> {
    let w = x.dim(3)?;
    let idx: Vec<u32> = (0..w as u32).rev().collect();
    x.index_select(&Tensor::from_vec(idx, w, x.device())?, 3)
}

/// [B, h, w] class maps mirrored along w.
fn mirror_last(x: &Tensor) -> Result<Tensor> {
    let w = x.dim(2)?;
    let idx: Vec<u32> = (0..w as u32).rev().collect();
    x.index_select(&Tensor::from_vec(idx, w, x.device())?, 2)
}

/// How many pixels two class maps agree on (a count, summed over frames by the caller).
fn share_equal(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok(a.eq(b)?
        .to_dtype(candle_core::DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()? as f64)
}

/// The most frequent class at each pixel over `maps` (ties: the lowest class).
fn majority(maps: &[Tensor], n: usize) -> Result<Tensor> {
    let flat: Vec<Vec<u32>> = maps
        .iter()
        .map(|m| m.flatten_all()?.to_vec1())
        .collect::<Result<_>>()?;
    let len = flat[0].len();
    let mut out = Vec::with_capacity(len);
    let mut votes: Vec<(u32, usize)> = Vec::with_capacity(n);
    for i in 0..len {
        votes.clear();
        for f in &flat {
            match votes.iter_mut().find(|(c, _)| *c == f[i]) {
                Some(v) => v.1 += 1,
                None => votes.push((f[i], 1)),
            }
        }
        let best = votes
            .iter()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
            .expect("at least one map");
        out.push(best.0);
    }
    Tensor::from_vec(out, maps[0].shape(), maps[0].device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_majority_takes_the_most_frequent_class_and_the_lowest_on_ties() {
        let m = |v: &[u32]| Tensor::new(v, &Device::Cpu).unwrap();
        let vote = majority(&[m(&[1, 2, 3]), m(&[1, 5, 4]), m(&[0, 5, 9])], 3).unwrap();
        assert_eq!(vote.to_vec1::<u32>().unwrap(), vec![1, 5, 3]);
    }

    #[test]
    fn the_prior_fit_is_zero_in_the_priors_proportions_and_negative_elsewhere() {
        let p = [0.5f32, 0.25, 0.25];
        assert!(kl(&p, &[200.0, 100.0, 100.0]).abs() < 1e-12);
        let off = kl(&p, &[100.0, 100.0, 200.0]);
        assert!(off > 0.05, "{off}");
        // A class the candidate never predicts costs a bounded amount.
        assert!(kl(&p, &[0.0, 100.0, 100.0]) < 10.0);
    }

    #[test]
    fn mirroring_twice_gives_the_frame_back() {
        let x = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 3, 4))
            .unwrap();
        let once = mirror(&x).unwrap();
        assert_eq!(
            once.flatten_all().unwrap().to_vec1::<f32>().unwrap()[..4],
            [3.0, 2.0, 1.0, 0.0]
        );
        let twice = mirror(&once).unwrap();
        assert_eq!(
            twice.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}
