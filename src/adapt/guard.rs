//! Guards against a run that goes wrong: a collapse monitor on the teacher's predicted class
//! distribution and confidence, and CoTTA's stochastic restore towards the source weights.

use super::component::{Component, Flow, Labels, Step};
use crate::model::Student;
use candle_core::{Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::Rng;

/// The collapse monitor as a step component: it watches the labels' class shares and mean
/// confidence and stops a step that leaves the band.
pub struct CollapseGuard(pub CollapseMonitor);

impl Component for CollapseGuard {
    fn name(&self) -> &'static str {
        "guard"
    }

    fn label(&mut self, l: &mut Labels, _t: u64) -> Result<Flow> {
        let c = l.probs.dim(1)?;
        let n = l.len();
        let mut shares = vec![0f64; c];
        l.pred
            .iter()
            .for_each(|&p| shares[p as usize] += 1.0 / n as f64);
        let mean_conf = l.conf.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        Ok(match self.0.observe(&shares, mean_conf) {
            true => Flow::Collapse,
            false => Flow::Go,
        })
    }
}

/// CoTTA's stochastic restore as a step component: after each update, every trainable weight
/// element goes back to its source value with probability `p`.
pub struct Restore {
    p: f64,
    /// Source values of the trainable weights, in the student's order.
    source: Vec<Tensor>,
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
            .map(|s| {
                weights.get(&s.name).cloned().ok_or_else(|| {
                    candle_core::Error::Msg(format!("restore: missing source tensor {}", s.name))
                })
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

    fn update(&mut self, _step: &Step, student: &Student, rng: &mut StdRng) -> Result<()> {
        let vars: Vec<Var> = student.vars.iter().map(|(_, v)| v.clone()).collect();
        stochastic_restore(&vars, &self.source, self.p, rng)
    }

    fn bytes(&self, _g: &super::component::Geometry) -> (usize, String) {
        let n: usize = self.source.iter().map(|t| t.elem_count()).sum();
        (n * 4, "source weights".into())
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
}

impl CollapseMonitor {
    pub fn new(classes: usize, width: f64, warmup: u64) -> Self {
        Self {
            hist: vec![0.0; classes],
            shift: Band::default(),
            conf: Band::default(),
            seen: 0,
            warmup,
            width,
        }
    }

    /// Feeds one step's class shares (summing to 1) and mean confidence; true when the step
    /// looks like a collapse. A collapsed step does not enter the running band.
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
        if bad {
            return true;
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
pub fn stochastic_restore(vars: &[Var], source: &[Tensor], p: f64, rng: &mut StdRng) -> Result<()> {
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
        let mut m = CollapseMonitor::new(3, 6.0, 10);
        let mut rng = StdRng::seed_from_u64(0);
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
    fn restore_resets_about_p_of_the_elements_to_source() {
        let dev = Device::Cpu;
        let v = Var::from_tensor(&Tensor::ones(10_000, candle_core::DType::F32, &dev).unwrap())
            .unwrap();
        let src = Tensor::zeros(10_000, candle_core::DType::F32, &dev).unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        stochastic_restore(std::slice::from_ref(&v), &[src], 0.1, &mut rng).unwrap();
        let vals: Vec<f32> = v.as_tensor().to_vec1().unwrap();
        assert!(vals.iter().all(|&x| x == 0.0 || x == 1.0));
        let reset = vals.iter().filter(|&&x| x == 0.0).count();
        assert!((800..1200).contains(&reset), "{reset} of 10000 reset");
    }
}
