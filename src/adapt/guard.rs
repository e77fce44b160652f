//! Guards against a run that goes wrong: a collapse monitor on the teacher's predicted class
//! distribution and confidence, and CoTTA's stochastic restore towards the source weights.

use super::component::{Component, Flow, Step};
use crate::model::Student;
use crate::SeededRng;
use candle_core::{Result, Tensor, Var};
use rand::Rng;

/// The collapse monitor as a step component. It watches the student (the model that collapses
/// first; the EMA teacher lags it by about 1 / (1 - momentum) steps): the class shares and mean
/// confidence of its predictions on the pixels both views share, before any loss is taken.
pub struct CollapseGuard(pub CollapseMonitor);

impl Component for CollapseGuard {
    fn name(&self) -> &'static str {
        "guard"
    }

    /// A new condition changes the class shares and confidence by design: the band starts
    /// over (with its warm-up) instead of rolling the adaptation back.
    fn shift(&mut self) {
        self.0.restart();
    }

    fn inspect(&mut self, step: &Step) -> Result<Flow> {
        let out = step.out();
        let probs = candle_nn::ops::softmax_last_dim(&out.logits.detach())?;
        let c = probs.dim(1)?;
        let pred: Vec<u32> = probs.argmax(candle_core::D::Minus1)?.to_vec1()?;
        let conf: Vec<f32> = probs.max(candle_core::D::Minus1)?.to_vec1()?;
        let same: Vec<u8> = out.same.to_vec1()?;
        let mut shares = vec![0f64; c];
        let (mut n, mut sum) = (0f64, 0f64);
        for ((&p, &q), &s) in pred.iter().zip(&conf).zip(&same) {
            if s != 0 {
                shares[p as usize] += 1.0;
                sum += q as f64;
                n += 1.0;
            }
        }
        if n == 0.0 {
            return Ok(Flow::Go);
        }
        shares.iter_mut().for_each(|v| *v /= n);
        Ok(match self.0.observe(&shares, sum / n) {
            true => Flow::Collapse,
            false => Flow::Go,
        })
    }
}

/// CoTTA's stochastic restore as a step component: after each update, every trainable weight
/// element goes back to its source value with probability `p`.
pub struct Restore {
    p: f64,
    /// Names and source values of the trainable weights, in the student's order. They are part
    /// of the checkpoint: a resumed or rolled-back run restores towards the source model, not
    /// towards the weights it resumed from.
    source: Vec<(String, Tensor)>,
}

impl Restore {
    /// `weights`: the source model's tensors by HF name; the ones `cfg` trains are kept, in
    /// the student's order.
    pub fn new(
        cfg: &super::AdaptConfig,
        model: &crate::config::SegformerConfig,
        weights: &crate::model::TensorMap,
    ) -> Result<Self> {
        let source = crate::model::param_specs(model)
            .into_iter()
            .filter(|s| s.trainable && cfg.trains(&s.name))
            .map(|s| match weights.get(&s.name) {
                Some(t) => Ok((s.name, t.clone())),
                None => candle_core::bail!("restore: missing source tensor {}", s.name),
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            p: cfg.guard.restore,
            source,
        })
    }
}

impl Component for Restore {
    fn name(&self) -> &'static str {
        "restore"
    }

    fn update(&mut self, _step: &Step, student: &Student, rng: &mut SeededRng) -> Result<()> {
        let vars: Vec<Var> = student.vars.iter().map(|(_, v)| v.clone()).collect();
        let source: Vec<Tensor> = self.source.iter().map(|(_, t)| t.clone()).collect();
        stochastic_restore(&vars, &source, self.p, rng)
    }

    fn bytes(&self, _g: &super::component::Geometry) -> (usize, String) {
        let n: usize = self.source.iter().map(|(_, t)| t.elem_count()).sum();
        (n * 4, "source weights".into())
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self
            .source
            .iter()
            .map(|(n, t)| (format!("source.{n}"), t.clone()))
            .collect())
    }

    fn load(&mut self, get: &dyn Fn(&str) -> Option<Tensor>) -> Result<()> {
        for (n, t) in &mut self.source {
            *t = super::component::need(get, "restore", &format!("source.{n}"))?;
        }
        Ok(())
    }
}

/// Running mean and variance (EMA) of a scalar, with the band it is expected to stay in.
#[derive(Debug, Clone, Default)]
struct Band {
    mean: f64,
    var: f64,
}

impl Band {
    fn outside(&self, x: f64, width: f64) -> bool {
        // A floor on the spread: on a steady stream the variance can shrink towards zero.
        let sd = self.var.sqrt().max(0.02);
        (x - self.mean).abs() > width * sd
    }

    fn update(&mut self, x: f64, m: f64) {
        let d = x - self.mean;
        self.mean += (1.0 - m) * d;
        self.var = m * (self.var + (1.0 - m) * d * d);
    }
}

/// Watches each step's predicted class histogram (its distance to the running histogram) and
/// mean confidence; `observe` says when either leaves its band.
#[derive(Debug, Clone)]
pub struct CollapseMonitor {
    hist: Vec<f64>,
    shift: Band,
    conf: Band,
    seen: u64,
    warmup: u64,
    width: f64,
    /// Consecutive flagged steps, and after how many the level is accepted.
    flagged: u64,
    patience: u64,
}

impl CollapseMonitor {
    pub fn new(classes: usize, width: f64, warmup: u64, patience: u64) -> Self {
        Self {
            hist: vec![0.0; classes],
            shift: Band::default(),
            conf: Band::default(),
            seen: 0,
            warmup,
            width,
            flagged: 0,
            patience,
        }
    }

    /// Forgets the band (a new condition); the next steps warm it up again.
    pub fn restart(&mut self) {
        *self = Self::new(self.hist.len(), self.width, self.warmup, self.patience);
    }

    /// Feeds one step's class shares (summing to 1) and mean confidence; true when the step
    /// looks like a collapse. A flagged step does not enter the running band, unless it is the
    /// `patience`-th in a row: a level that persists through that many rollbacks is the
    /// stream's own (a new domain), and the band moves to it.
    pub fn observe(&mut self, shares: &[f64], confidence: f64) -> bool {
        let tv = 0.5
            * shares
                .iter()
                .zip(&self.hist)
                .map(|(a, b)| (a - b).abs())
                .sum::<f64>();
        if self.seen == 0 {
            self.hist = shares.to_vec();
            self.conf.mean = confidence;
            self.seen = 1;
            return false;
        }
        let bad = self.seen > self.warmup
            && (self.shift.outside(tv, self.width) || self.conf.outside(confidence, self.width));
        if bad && self.flagged < self.patience {
            self.flagged += 1;
            return true;
        }
        self.flagged = 0;
        if bad {
            // Accepted: the band starts again from this level.
            self.hist = shares.to_vec();
            self.conf.mean = confidence;
            return false;
        }
        let m = 1.0 - 1.0 / (self.seen as f64 + 1.0).min(50.0);
        self.shift.update(tv, m);
        self.conf.update(confidence, m);
        self.hist
            .iter_mut()
            .zip(shares)
            .for_each(|(h, s)| *h = m * *h + (1.0 - m) * s);
        self.seen += 1;
        false
    }
}

/// CoTTA: each element of each trainable weight goes back to its source value with probability
/// `p`. `source` holds the source tensors in the same order as `vars`.
pub fn stochastic_restore(
    vars: &[Var],
    source: &[Tensor],
    p: f64,
    rng: &mut SeededRng,
) -> Result<()> {
    if p <= 0.0 {
        return Ok(());
    }
    for (v, s) in vars.iter().zip(source) {
        let n = v.elem_count();
        let mask: Vec<f32> = (0..n).map(|_| rng.random_bool(p) as u8 as f32).collect();
        let mask = Tensor::from_vec(mask, v.shape(), v.device())?;
        let keep = (1.0 - &mask)?;
        v.set(&((v.as_tensor() * keep)? + (s * mask)?)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::SeedableRng;

    #[test]
    fn a_steady_stream_passes_and_a_collapse_is_caught() {
        let mut m = CollapseMonitor::new(3, 6.0, 10, 100);
        let mut rng = SeededRng::seed_from_u64(0);
        for _ in 0..100 {
            let j: f64 = rng.random_range(-0.02..0.02);
            assert!(!m.observe(&[0.5 + j, 0.3 - j, 0.2], 0.85 + j));
        }
        // Everything predicted as one class.
        assert!(m.observe(&[1.0, 0.0, 0.0], 0.85));
        // Confidence falling off a cliff with the same classes.
        assert!(m.observe(&[0.5, 0.3, 0.2], 0.3));
        // Still flagged: a collapsed step does not widen the band.
        assert!(m.observe(&[1.0, 0.0, 0.0], 0.85));
        assert!(!m.observe(&[0.5, 0.3, 0.2], 0.85));
    }

    #[test]
    fn a_new_condition_restarts_the_band() {
        let mut m = CollapseMonitor::new(2, 6.0, 5, 3);
        for i in 0..50 {
            let j = if i % 2 == 0 { 0.01 } else { -0.01 };
            assert!(!m.observe(&[0.7 + j, 0.3 - j], 0.9));
        }
        m.restart();
        // The stream's new level is learned from scratch, not judged against the old one.
        assert!(!m.observe(&[0.3, 0.7], 0.6));
        assert!(!m.observe(&[0.31, 0.69], 0.61));
    }

    #[test]
    fn a_persistent_new_level_is_accepted_after_patience() {
        let mut m = CollapseMonitor::new(2, 6.0, 5, 3);
        for i in 0..50 {
            let j = if i % 2 == 0 { 0.01 } else { -0.01 };
            assert!(!m.observe(&[0.7 + j, 0.3 - j], 0.9));
        }
        // The stream moves to a new level and stays: flagged three times, then accepted.
        let flags: Vec<bool> = (0..5).map(|_| m.observe(&[0.3, 0.7], 0.6)).collect();
        assert_eq!(flags, vec![true, true, true, false, false]);
        // A single outlier after an in-band step is flagged again.
        assert!(m.observe(&[1.0, 0.0], 0.6));
    }

    #[test]
    fn restore_resets_about_p_of_the_elements_to_source() {
        let dev = Device::Cpu;
        let v = Var::from_tensor(&Tensor::ones(10_000, candle_core::DType::F32, &dev).unwrap())
            .unwrap();
        let src = Tensor::zeros(10_000, candle_core::DType::F32, &dev).unwrap();
        let mut rng = SeededRng::seed_from_u64(1);
        stochastic_restore(std::slice::from_ref(&v), &[src], 0.1, &mut rng).unwrap();
        let vals: Vec<f32> = v.as_tensor().to_vec1().unwrap();
        assert!(vals.iter().all(|&x| x == 0.0 || x == 1.0));
        let reset = vals.iter().filter(|&&x| x == 0.0).count();
        assert!((800..1200).contains(&reset), "{reset} of 10000 reset");
    }
}
