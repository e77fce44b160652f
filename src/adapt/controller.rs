//! When to train (HAMLET's active training modulation, methods.md section 6.1): training runs on
//! a budget of steps granted when the stream shifts away from what the model has adapted to,
//! with the learning rate decaying linearly to zero over the budget; between budgets the model
//! only serves. A drive that stays in one condition (or loops over the same road) stops changing
//! the model once its budget is spent, so the model cannot drift on it; a new condition grants
//! a new budget, a condition seen before a smaller one.
//!
//! The shift signal is model-free: per frame, each colour channel's mean, spread and mean
//! absolute gradient (brightness, contrast, sharpness: what weather and light change), compared
//! window by window with the statistics of the frames the current budget adapted on. HAMLET
//! measures the shift with a small decoder on the frozen source encoder instead; these
//! statistics cost no forward pass and do not move as the model adapts.

use super::component::need;
use super::config;
use candle_core::{Device, Result, Tensor};
use std::collections::VecDeque;

/// Values per frame: mean, standard deviation and mean absolute gradient of each channel.
const DIMS: usize = 9;

/// Running mean and variance of descriptors (Welford).
#[derive(Debug, Clone)]
struct Stats {
    n: f64,
    mean: Vec<f64>,
    m2: Vec<f64>,
}

impl Stats {
    fn new() -> Self {
        Self {
            n: 0.0,
            mean: vec![0.0; DIMS],
            m2: vec![0.0; DIMS],
        }
    }

    fn add(&mut self, d: &[f64]) {
        self.n += 1.0;
        for ((x, m), m2) in d.iter().zip(&mut self.mean).zip(&mut self.m2) {
            let delta = x - *m;
            *m += delta / self.n;
            *m2 += delta * (x - *m);
        }
    }

    /// Mean squared z-score of a window mean against these statistics, in units of the
    /// per-frame spread: consecutive frames show the same scene, so a window's mean varies
    /// nearly as much as one frame does. The variance has a floor so a very steady stream does
    /// not flag noise.
    fn distance(&self, window_mean: &[f64]) -> f64 {
        (0..DIMS)
            .map(|i| {
                let var = (self.m2[i] / self.n.max(1.0)).max(1e-4);
                (window_mean[i] - self.mean[i]).powi(2) / var
            })
            .sum::<f64>()
            / DIMS as f64
    }
}

pub struct Controller {
    cfg: config::Budget,
    /// Frames of the condition the current budget adapts to.
    current: Stats,
    recent: VecDeque<Vec<f64>>,
    /// Conditions adapted to so far: their statistics and how many budgets each was granted.
    known: Vec<(Stats, u32)>,
    left: u64,
    granted: u64,
    /// A budget was granted and the new condition's statistics are not yet there to tell
    /// whether it is one adapted to before.
    pending: bool,
    /// Frames still to leave the window before the new condition's statistics start: for a
    /// while after a shift, windows (and the ring training samples from) mix both conditions.
    settling: usize,
}

impl Controller {
    pub fn new(cfg: &config::Budget) -> Self {
        Self {
            cfg: cfg.clone(),
            current: Stats::new(),
            recent: VecDeque::new(),
            known: Vec::new(),
            left: 0,
            granted: 0,
            pending: false,
            settling: 0,
        }
    }

    /// Folds in a batch of frames ([B, 3, H, W], normalised) and says how much to train on
    /// it: the learning-rate scale (0 when no budget is left), and whether the stream has just
    /// moved to another condition.
    pub fn observe(&mut self, frames: &Tensor) -> Result<(f64, bool)> {
        // A frame joins the current condition's statistics once it leaves the window, so the
        // window is always compared with frames before it.
        for d in descriptors(frames)? {
            self.recent.push_back(d);
            if self.recent.len() > self.cfg.window {
                let old = self.recent.pop_front().expect("longer than the window");
                match self.settling {
                    0 => self.current.add(&old),
                    _ => self.settling -= 1,
                }
            }
        }
        let settled =
            self.recent.len() >= self.cfg.window && self.current.n >= self.cfg.window as f64;
        let first = self.granted == 0;
        // The first frames are the shift away from the source domain.
        let shifted =
            first || (settled && self.current.distance(&self.window_mean()) > self.cfg.threshold);
        if shifted {
            self.grant();
        } else if settled && self.pending {
            self.pending = false;
            self.rescale_if_known();
        }
        if self.left == 0 {
            return Ok((0.0, shifted && !first));
        }
        let scale = self.left as f64 / self.granted as f64;
        self.left -= 1;
        Ok((scale, shifted && !first))
    }

    fn window_mean(&self) -> Vec<f64> {
        let n = self.recent.len().max(1) as f64;
        (0..DIMS)
            .map(|i| self.recent.iter().map(|d| d[i]).sum::<f64>() / n)
            .collect()
    }

    /// A new budget, in full until the window has filled with the new condition's frames.
    fn grant(&mut self) {
        if self.granted > 0 {
            self.settling = 2 * self.cfg.window;
        }
        if self.current.n > 0.0 {
            let done = std::mem::replace(&mut self.current, Stats::new());
            self.remember(done);
        }
        self.left = self.cfg.steps;
        self.granted = self.cfg.steps.max(1);
        self.pending = true;
        log::info!(
            "training budget: {} steps for a new condition",
            self.cfg.steps
        );
    }

    /// A condition adapted to k times before keeps `revisit`^k of its budget. Being the same
    /// condition takes a quarter of the shift threshold: a near miss is a new condition.
    fn rescale_if_known(&mut self) {
        let window = self.window_mean();
        let Some(&(_, visits)) = self
            .known
            .iter()
            .find(|(s, _)| s.distance(&window) <= self.cfg.threshold / 4.0)
        else {
            return;
        };
        let f = self.cfg.revisit.powi(visits as i32);
        self.left = (self.left as f64 * f).round() as u64;
        self.granted = ((self.granted as f64 * f).round() as u64).max(1);
        log::info!(
            "training budget: a condition adapted to {visits} time(s) before; {} steps left",
            self.left
        );
    }

    fn remember(&mut self, done: Stats) {
        match self
            .known
            .iter_mut()
            .find(|(s, _)| s.distance(&done.mean) <= self.cfg.threshold / 4.0)
        {
            Some((_, visits)) => *visits += 1,
            None => self.known.push((done, 1)),
        }
    }

    /// Steps left in the current budget.
    pub fn left(&self) -> u64 {
        self.left
    }

    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let dev = &Device::Cpu;
        let stats = |s: &Stats| -> Vec<f32> {
            std::iter::once(s.n)
                .chain(s.mean.iter().copied())
                .chain(s.m2.iter().copied())
                .map(|v| v as f32)
                .collect()
        };
        let mut known: Vec<f32> = Vec::new();
        for (s, v) in &self.known {
            known.extend(stats(s));
            known.push(*v as f32);
        }
        let recent: Vec<f32> = self.recent.iter().flatten().map(|&v| v as f32).collect();
        Ok(vec![
            (
                "current".into(),
                Tensor::new(stats(&self.current).as_slice(), dev)?,
            ),
            ("known".into(), Tensor::new(known.as_slice(), dev)?),
            ("recent".into(), Tensor::new(recent.as_slice(), dev)?),
            (
                "budget".into(),
                Tensor::new(
                    &[
                        self.left as f32,
                        self.granted as f32,
                        self.settling as f32,
                        f32::from(u8::from(self.pending)),
                    ],
                    dev,
                )?,
            ),
        ])
    }

    pub fn load(&mut self, get: &dyn Fn(&str) -> Option<Tensor>) -> Result<()> {
        let read = |k: &str| -> Result<Vec<f64>> {
            let v: Vec<f32> = need(get, "budget", k)?.to_vec1()?;
            Ok(v.into_iter().map(f64::from).collect())
        };
        let stats = |v: &[f64]| Stats {
            n: v[0],
            mean: v[1..1 + DIMS].to_vec(),
            m2: v[1 + DIMS..1 + 2 * DIMS].to_vec(),
        };
        self.current = stats(&read("current")?);
        let per = 2 + 2 * DIMS;
        self.known = read("known")?
            .chunks(per)
            .map(|c| (stats(c), c[per - 1] as u32))
            .collect();
        self.recent = read("recent")?.chunks(DIMS).map(|c| c.to_vec()).collect();
        let b = read("budget")?;
        (self.left, self.granted) = (b[0] as u64, b[1] as u64);
        (self.settling, self.pending) = (b[2] as usize, b[3] > 0.0);
        Ok(())
    }
}

/// Per frame of `frames` [B, 3, H, W]: each channel's mean, standard deviation and mean absolute
/// horizontal-plus-vertical gradient.
fn descriptors(frames: &Tensor) -> Result<Vec<Vec<f64>>> {
    let (b, c, h, w) = frames.dims4()?;
    let v: Vec<f32> = frames.flatten_all()?.to_vec1()?;
    let plane = h * w;
    Ok((0..b)
        .map(|i| {
            let mut d = vec![0f64; DIMS];
            for ch in 0..c.min(3) {
                let p = &v[(i * c + ch) * plane..(i * c + ch + 1) * plane];
                let mean = p.iter().map(|&x| x as f64).sum::<f64>() / plane as f64;
                let var = p.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / plane as f64;
                let mut grad = 0f64;
                for y in 0..h.saturating_sub(1) {
                    for x in 0..w.saturating_sub(1) {
                        let at = y * w + x;
                        grad += ((p[at + 1] - p[at]).abs() + (p[at + w] - p[at]).abs()) as f64;
                    }
                }
                let cells = ((h.saturating_sub(1)) * (w.saturating_sub(1))).max(1) as f64;
                d[3 * ch] = mean;
                d[3 * ch + 1] = var.sqrt();
                d[3 * ch + 2] = grad / cells;
            }
            d
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch of one frame: every channel at `level` with a stripe pattern of `contrast`.
    fn frame(level: f32, contrast: f32) -> Tensor {
        let (h, w) = (8, 8);
        let v: Vec<f32> = (0..3 * h * w)
            .map(|i| {
                level
                    + if (i % w) % 2 == 0 {
                        contrast
                    } else {
                        -contrast
                    }
            })
            .collect();
        Tensor::from_vec(v, (1, 3, h, w), &Device::Cpu).unwrap()
    }

    fn cfg(steps: u64) -> config::Budget {
        config::Budget {
            on: true,
            steps,
            window: 4,
            threshold: 9.0,
            revisit: 0.5,
        }
    }

    #[test]
    fn a_steady_stream_spends_its_budget_and_stops() {
        let mut c = Controller::new(&cfg(10));
        let scales: Vec<f64> = (0..15)
            .map(|i| {
                c.observe(&frame(0.5 + 0.01 * (i % 3) as f32, 0.3))
                    .unwrap()
                    .0
            })
            .collect();
        // Ten steps with the rate decaying linearly from 1, then nothing.
        assert_eq!(scales[0], 1.0);
        assert!((scales[9] - 0.1).abs() < 1e-9, "{scales:?}");
        assert!(scales[10..].iter().all(|&s| s == 0.0), "{scales:?}");
    }

    #[test]
    fn a_new_condition_grants_a_budget_and_a_known_one_a_smaller_one() {
        let mut c = Controller::new(&cfg(40));
        let day = |i: usize| frame(0.5 + 0.01 * (i % 3) as f32, 0.3);
        let night = |i: usize| frame(-1.5 + 0.01 * (i % 3) as f32, 0.05);
        // Steps trained over 60 frames of a condition.
        let phase = |c: &mut Controller, f: &dyn Fn(usize) -> Tensor| -> usize {
            (0..60)
                .filter(|&i| c.observe(&f(i)).unwrap().0 > 0.0)
                .count()
        };
        let first = phase(&mut c, &day);
        assert_eq!(first, 40, "the first condition: the whole budget");
        let new = phase(&mut c, &night);
        assert_eq!(new, 40, "a new condition: the whole budget");
        let again = phase(&mut c, &day);
        assert!(
            (12..40).contains(&again),
            "a known condition: less ({again})"
        );
        assert_eq!(c.known.len(), 2);
        // The state round-trips.
        let state = c.state().unwrap();
        let mut d = Controller::new(&cfg(40));
        d.load(&|k| state.iter().find(|(n, _)| n == k).map(|(_, t)| t.clone()))
            .unwrap();
        assert_eq!(
            (d.left, d.granted, d.known.len()),
            (c.left, c.granted, c.known.len())
        );
    }
}
