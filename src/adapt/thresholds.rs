//! Which pixels become pseudo labels: plain self-training's fixed confidence threshold, or
//! HIAST's Instance Adaptive Selector: one confidence threshold per class, moved by each frame's
//! own confidence quantile (theta_c <- beta theta_c + (1 - beta) psi_c,
//! psi_c = quantile(conf_c + [theta_c], 1 - alpha theta_c^gamma)).

use super::component::{need, Component, Flow, Labels};
use candle_core::{Device, Result, Tensor};

/// The selection rule as a step component.
pub enum Selection {
    Fixed(f32),
    Adaptive(InstanceThresholds),
}

impl Component for Selection {
    fn name(&self) -> &'static str {
        match self {
            Selection::Fixed(_) => "threshold",
            Selection::Adaptive(_) => "ias",
        }
    }

    /// Keeps a pixel when the confidence of its label clears the threshold of that label's
    /// class; IAS first folds each frame of the batch into its thresholds.
    fn label(&mut self, l: &mut Labels, _t: u64) -> Result<Flow> {
        let pred: Vec<u8> = l.pred.iter().map(|&p| p as u8).collect();
        let keep = match self {
            Selection::Fixed(t) => l.conf.iter().map(|&p| p >= *t).collect(),
            Selection::Adaptive(th) => {
                let per = l.grid.1 * l.grid.2;
                for i in 0..l.grid.0 {
                    th.update(
                        &l.conf[i * per..(i + 1) * per],
                        &pred[i * per..(i + 1) * per],
                    );
                }
                th.select(&l.conf, &pred)
            }
        };
        l.keep.iter_mut().zip(keep).for_each(|(k, s)| *k &= s);
        Ok(Flow::Go)
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        match self {
            Selection::Fixed(_) => Ok(Vec::new()),
            Selection::Adaptive(th) => Ok(vec![(
                "theta".into(),
                Tensor::new(th.theta.as_slice(), &Device::Cpu)?,
            )]),
        }
    }

    fn load(&mut self, get: &dyn Fn(&str) -> Option<Tensor>) -> Result<()> {
        if let Selection::Adaptive(th) = self {
            th.theta = need(get, "ias", "theta")?.to_vec1()?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct InstanceThresholds {
    pub theta: Vec<f32>,
    pub alpha: f32,
    pub beta: f32,
    pub gamma: f32,
}

/// numpy's default (linear) quantile of an ascending slice.
fn quantile(sorted: &[f32], q: f32) -> f32 {
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f32;
    let (i, frac) = (pos.floor() as usize, pos - pos.floor());
    if i + 1 < sorted.len() {
        sorted[i] + frac * (sorted[i + 1] - sorted[i])
    } else {
        sorted[i]
    }
}

impl InstanceThresholds {
    /// HIAST's defaults are theta 0.9, alpha 0.5, beta 0.9, gamma 8.
    pub fn new(classes: usize, init: f32, alpha: f32, beta: f32, gamma: f32) -> Self {
        Self {
            theta: vec![init; classes],
            alpha,
            beta,
            gamma,
        }
    }

    /// Folds one frame in: `conf` is each pixel's max probability, `pred` its argmax class.
    pub fn update(&mut self, conf: &[f32], pred: &[u8]) {
        let c = self.theta.len();
        let mut per: Vec<Vec<f32>> = vec![Vec::new(); c];
        for (&p, &k) in conf.iter().zip(pred) {
            if (k as usize) < c {
                per[k as usize].push(p);
            }
        }
        for (k, mut v) in per.into_iter().enumerate() {
            let t = self.theta[k];
            v.push(t);
            v.sort_by(|a, b| a.total_cmp(b));
            let psi = quantile(&v, 1.0 - self.alpha * t.powf(self.gamma));
            self.theta[k] = (self.beta * t + (1.0 - self.beta) * psi).min(0.999);
        }
    }

    /// Which pixels are confident: max probability at least the threshold of their class.
    pub fn select(&self, conf: &[f32], pred: &[u8]) -> Vec<bool> {
        conf.iter()
            .zip(pred)
            .map(|(&p, &k)| self.theta.get(k as usize).is_some_and(|&t| p >= t))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_follow_the_ias_update() {
        let mut t = InstanceThresholds::new(3, 0.9, 0.5, 0.9, 8.0);
        // Class 0: 99 pixels with confidences 0.01..0.99; class 1 absent; class 2 all at 0.95.
        let mut conf: Vec<f32> = (1..100).map(|i| i as f32 / 100.0).collect();
        let mut pred = vec![0u8; 99];
        conf.extend([0.95; 10]);
        pred.extend([2u8; 10]);
        t.update(&conf, &pred);
        // Class 0 by hand: keep the top alpha * 0.9^8 = 21.52% -> the 78.48% quantile of the
        // 100 values (0.01..0.99 and the old 0.9).
        let mut v: Vec<f32> = (1..100).map(|i| i as f32 / 100.0).collect();
        v.push(0.9);
        v.sort_by(|a, b| a.total_cmp(b));
        let q = 1.0 - 0.5 * 0.9f32.powf(8.0);
        let pos = q * 99.0;
        let psi = v[pos as usize] + (pos - pos.floor()) * (v[pos as usize + 1] - v[pos as usize]);
        assert!(
            (t.theta[0] - (0.9 * 0.9 + 0.1 * psi)).abs() < 1e-6,
            "{:?}",
            t.theta
        );
        // An absent class keeps its threshold; a class seen only at 0.95 moves towards it.
        assert_eq!(t.theta[1], 0.9);
        assert!(t.theta[2] > 0.9 && t.theta[2] <= 0.905);
        // Selection uses the threshold of the predicted class.
        let sel = t.select(&[0.99, 0.5, 0.91], &[0, 0, 1]);
        assert_eq!(sel, vec![true, false, true]);
    }

    #[test]
    fn low_thresholds_keep_a_smaller_share() {
        // gamma = 8 makes alpha * theta^gamma tiny for a hard (low-threshold) class.
        let easy = 0.5 * 0.95f32.powf(8.0);
        let hard = 0.5 * 0.6f32.powf(8.0);
        assert!(hard < 0.01 && easy > 0.3);
        let mut t = InstanceThresholds::new(1, 0.999, 0.5, 0.0, 8.0);
        t.update(&[0.5, 0.6, 0.7], &[0, 0, 0]);
        assert!(t.theta[0] <= 0.999);
    }
}
