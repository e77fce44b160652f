//! When to train (HAMLET's active training modulation, methods.md section 6.1): training runs on
//! a budget of steps granted when the stream shifts away from what the model has adapted to,
//! with the learning rate decaying linearly to zero over the budget; between budgets the weights
//! stay and only the teacher's BatchNorm statistics follow the frames it serves. A drive that
//! stays in one condition (or loops over the same road) stops changing the weights once its
//! budget is spent, so the model cannot drift on it; a new condition grants a new budget, a
//! condition seen before a smaller one.
//!
//! With `slots`, the controller also remembers the weights adapted to each condition: the
//! adapter starts a known condition from the weights it had when the stream last left it, and a
//! new one from the weights of the kept condition nearest to it. Adapting to fog then cannot
//! cost anything back in the day, and a drive through many conditions does not accumulate the
//! errors of each (measured on the continual CamVid-C stream, where one set of weights carried
//! through all conditions falls below the source model by the second round). After a shift,
//! training waits until the new condition is told apart from the kept ones (a window of its
//! own frames), so no step goes to weights about to be replaced.
//!
//! The shift signal is model-free: per frame, each colour channel's mean, spread and mean
//! absolute gradient (brightness, contrast, sharpness: what weather and light change), compared
//! window by window with the statistics of the frames the current budget adapted on. The
//! runtime shows it every frame as it arrives; the training samples drawn from the ring of
//! recent frames would blur a change over the ring's length. HAMLET
//! measures the shift with a small decoder on the frozen source encoder instead; these
//! statistics cost no forward pass and do not move as the model adapts.

use super::component::need;
use super::config;
use crate::model::TensorMap;
use candle_core::{Device, Result, Tensor};
use std::collections::VecDeque;

/// Values per frame: mean, standard deviation and mean absolute gradient of each channel.
const DIMS: usize = 9;

/// Running mean and variance of frame descriptors (Welford): what a condition's frames look
/// like to the shift test.
#[derive(Debug, Clone)]
pub struct FrameStats {
    n: f64,
    mean: Vec<f64>,
    m2: Vec<f64>,
}

impl Default for FrameStats {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameStats {
    fn new() -> Self {
        Self {
            n: 0.0,
            mean: vec![0.0; DIMS],
            m2: vec![0.0; DIMS],
        }
    }

    /// The statistics of `frames` (each [B, 3, H, W], normalised as the runtime feeds them).
    pub fn of_frames(frames: impl IntoIterator<Item = Result<Tensor>>) -> Result<Self> {
        let mut s = Self::new();
        for f in frames {
            s.add_frames(&f?)?;
        }
        Ok(s)
    }

    /// Folds in `frames` ([B, 3, H, W], normalised as the runtime feeds them).
    pub fn add_frames(&mut self, frames: &Tensor) -> Result<()> {
        descriptors(frames)?.iter().for_each(|d| self.add(d));
        Ok(())
    }

    /// Frames, means and squared deviations in one vector, as checkpoints and source
    /// statistics store them.
    pub fn to_vec(&self) -> Vec<f32> {
        std::iter::once(self.n)
            .chain(self.mean.iter().copied())
            .chain(self.m2.iter().copied())
            .map(|v| v as f32)
            .collect()
    }

    /// Reads [`FrameStats::to_vec`] back (its first `1 + 2 * DIMS` values).
    pub fn from_slice(v: &[f64]) -> Option<Self> {
        (v.len() > 2 * DIMS).then(|| Self {
            n: v[0],
            mean: v[1..1 + DIMS].to_vec(),
            m2: v[1 + DIMS..1 + 2 * DIMS].to_vec(),
        })
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

/// A condition adapted to before.
#[derive(Debug, Clone)]
struct Condition {
    stats: FrameStats,
    /// Budgets granted to it.
    visits: u32,
    /// The teacher's weights when the stream last left it (with slots).
    weights: Option<TensorMap>,
    /// The frame count when its weights were last kept or recalled: the least recent one's
    /// weights go first when the slots are full.
    last: u64,
}

/// What a shift interrupted, to go back to if the stream returns to it within the window.
#[derive(Debug, Clone)]
struct Interrupted {
    condition: usize,
    stats: FrameStats,
    left: u64,
    granted: u64,
    visits: u32,
}

/// What the stream did at a frame, as far as the adapter's weights are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Event {
    #[default]
    Steady,
    /// The stream moved to another condition. `left`: the condition it left, whose weights the
    /// adapter hands to [`Controller::keep`] (None for the first condition and without slots).
    Shifted { left: Option<usize> },
    /// The adapter goes on from condition `.0`'s kept weights: the stream moved to it again,
    /// came back to it after a passing change, or moved to a new condition nearest to it.
    Recalled(usize),
}

pub struct Controller {
    cfg: config::Budget,
    /// Frames of the condition the current budget adapts to.
    current: FrameStats,
    recent: VecDeque<Vec<f64>>,
    /// Conditions adapted to so far.
    known: Vec<Condition>,
    /// Frames observed.
    frames: u64,
    left: u64,
    granted: u64,
    /// A budget was granted and the new condition's statistics are not yet there to tell
    /// whether it is one adapted to before.
    pending: bool,
    /// Frames still to leave the window before the new condition's statistics start: for a
    /// while after a shift, windows (and the ring training samples from) mix both conditions.
    settling: usize,
    /// The condition the last shift left, until the new one's statistics are there.
    interrupted: Option<Interrupted>,
    /// The kept condition whose weights the adapter holds (with slots): the one a shift left,
    /// or the one the new condition went on from.
    held: Option<usize>,
    /// The frame just observed told a new condition apart (its start was decided): whether its
    /// start is near, that is, the condition itself (known, or the one a passing change
    /// interrupted) or a kept one within the shift threshold of it.
    told: Option<bool>,
    /// The source domain's frames, from the source statistics.
    source: Option<FrameStats>,
}

impl Controller {
    pub fn new(cfg: &config::Budget) -> Self {
        Self {
            cfg: cfg.clone(),
            current: FrameStats::new(),
            recent: VecDeque::new(),
            known: Vec::new(),
            frames: 0,
            left: 0,
            granted: 0,
            pending: false,
            settling: 0,
            interrupted: None,
            held: None,
            told: None,
            source: None,
        }
    }

    /// Measures the stream's shift from the source domain too ([`Controller::source_share`]).
    pub fn with_source(mut self, frames: FrameStats) -> Self {
        self.source = Some(frames);
        self
    }

    /// How far the recent frames are from the source domain's, as a share of the shift
    /// threshold (at most 1; 1 without the source's frame statistics). The teacher's BatchNorm
    /// statistics follow the frames' at least this share of the way from the source's
    /// (`model::Tracking::Anchored`): a frame's statistics mix what it shows with how it looks,
    /// and where it looks like the source, following them moves the model by the content alone
    /// (on CamVid's unseen day sequence, tracking at full momentum cost car 6.5 IoU and the
    /// mean 0.46, with no shift to follow). Where they follow
    /// by class ([`Controller::near_source`]), the class shares take the content out instead.
    pub fn source_share(&self) -> f64 {
        self.source_distance()
            .map_or(1.0, |d| (d / self.cfg.threshold).min(1.0))
    }

    /// Whether the recent frames are in the source domain's condition: within a quarter of the
    /// shift threshold of its frames, as a condition is the same one as a known condition
    /// (false without the source's frame statistics). There, what moves the frames' feature
    /// statistics is what they show; beyond, it is how they look.
    pub fn near_source(&self) -> bool {
        self.source_distance()
            .is_some_and(|d| d <= self.cfg.threshold / 4.0)
    }

    /// The recent window's distance from the source frames (None without their statistics or
    /// before the first frame).
    fn source_distance(&self) -> Option<f64> {
        let src = self.source.as_ref()?;
        (!self.recent.is_empty()).then(|| src.distance(&self.window_mean()))
    }

    /// Folds in frames as they arrive ([B, 3, H, W], normalised) and says whether the stream
    /// has just moved to another condition. The shift test watches the stream itself: fed the
    /// training samples drawn from the ring of recent frames, its windows would mix conditions
    /// for as long as the ring holds both, and a change could pass unseen.
    pub fn observe(&mut self, frames: &Tensor) -> Result<Event> {
        // A frame joins the current condition's statistics once it leaves the window, so the
        // window is always compared with frames before it.
        for d in descriptors(frames)? {
            self.frames += 1;
            self.recent.push_back(d);
            if self.recent.len() > self.cfg.window {
                let old = self.recent.pop_front().expect("longer than the window");
                match self.settling {
                    0 => self.current.add(&old),
                    _ => self.settling -= 1,
                }
            }
        }
        // A condition's spread is taken from two windows of its frames at least: from one, it
        // is too narrow, and the next scene of the same road looks like a shift.
        let settled =
            self.recent.len() >= self.cfg.window && self.current.n >= 2.0 * self.cfg.window as f64;
        let first = self.granted == 0;
        // The first frames are the shift away from the source domain.
        let distance = match settled {
            true => self.current.distance(&self.window_mean()),
            false => 0.0,
        };
        log::debug!("frame {}: shift distance {distance:.2}", self.frames);
        let shifted = first || distance > self.cfg.threshold;
        let mut event = Event::Steady;
        if shifted {
            let left = self.grant();
            if !first {
                let left = left.filter(|_| self.cfg.slots > 0);
                self.held = left;
                event = Event::Shifted { left };
            }
        } else if settled && self.pending {
            self.pending = false;
            let window = self.window_mean();
            let known = self
                .resume_if_transient(&window)
                .or_else(|| self.rescale_if_known(&window))
                .filter(|&i| self.known[i].weights.is_some());
            let start = known.or_else(|| self.nearest_kept(&window));
            let near = |i: usize| self.known[i].stats.distance(&window) < self.cfg.threshold;
            self.told = Some(known.is_some() || start.is_some_and(near));
            event = match start {
                // The weights in place are the ones to go on from.
                Some(i) if self.held == Some(i) => Event::Steady,
                Some(i) => Event::Recalled(i),
                None => Event::Steady,
            };
            if let Some(i) = start {
                self.known[i].last = self.frames;
            }
            self.held = start;
        }
        Ok(event)
    }

    /// Takes one step of the budget: the learning-rate scale for it, 0 when none is left. After
    /// a shift that kept the weights, training waits until the new condition is told apart
    /// from the kept ones: steps taken before would be thrown away when it starts from other
    /// weights.
    pub fn spend(&mut self) -> f64 {
        if self.left == 0 || (self.pending && self.held.is_some()) {
            return 0.0;
        }
        let scale = self.left as f64 / self.granted as f64;
        self.left -= 1;
        scale
    }

    /// Keeps `weights` as those adapted to condition `i` (from [`Event::Shifted`]); when the
    /// slots are full, the least recently used condition's weights go.
    pub fn keep(&mut self, i: usize, weights: TensorMap) {
        self.known[i].weights = Some(weights);
        self.known[i].last = self.frames;
        while self.known.iter().filter(|c| c.weights.is_some()).count() > self.cfg.slots {
            let oldest = self
                .known
                .iter_mut()
                .filter(|c| c.weights.is_some())
                .min_by_key(|c| c.last)
                .expect("more kept than slots");
            oldest.weights = None;
        }
    }

    /// The weights kept for condition `i`.
    pub fn weights(&self, i: usize) -> Option<&TensorMap> {
        self.known.get(i).and_then(|c| c.weights.as_ref())
    }

    fn window_mean(&self) -> Vec<f64> {
        let n = self.recent.len().max(1) as f64;
        (0..DIMS)
            .map(|i| self.recent.iter().map(|d| d[i]).sum::<f64>() / n)
            .collect()
    }

    /// A new budget, in full until the window has filled with the new condition's frames;
    /// the condition left, if any.
    fn grant(&mut self) -> Option<usize> {
        if self.granted > 0 {
            self.settling = 2 * self.cfg.window;
        }
        let left = (self.current.n > 0.0).then(|| {
            let done = std::mem::take(&mut self.current);
            let i = self.remember(done.clone());
            self.interrupted = Some(Interrupted {
                condition: i,
                stats: done,
                left: self.left,
                granted: self.granted,
                // Before this visit was counted.
                visits: self.known[i].visits - 1,
            });
            i
        });
        self.left = self.cfg.steps;
        self.granted = self.cfg.steps.max(1);
        self.pending = true;
        log::info!(
            "training budget: {} steps for a new condition",
            self.cfg.steps
        );
        left
    }

    /// After a shift, a stream back in the condition it left had a passing change (a tunnel,
    /// a bridge's shadow): the condition goes on with its statistics, budget and, with slots,
    /// its weights. The condition resumed.
    fn resume_if_transient(&mut self, window: &[f64]) -> Option<usize> {
        let int = self.interrupted.take()?;
        if int.stats.distance(window) > self.cfg.threshold / 4.0 {
            return None;
        }
        log::info!("training budget: the stream is back in the condition it left");
        let i = int.condition;
        self.known[i].visits = int.visits;
        (self.left, self.granted) = (int.left, int.granted);
        self.current = int.stats;
        Some(i)
    }

    /// A new condition starts from the weights of the kept condition nearest to it: what was
    /// learnt on another road or in other weather is a better start than the source model. As
    /// in HAMLET, how hard it trains follows how far it is from them: at distance d it gets the
    /// last d/threshold of a budget (the rate starts at that share of the full rate and decays
    /// to zero), the whole budget at the threshold and beyond.
    fn nearest_kept(&mut self, window: &[f64]) -> Option<usize> {
        let (i, d) = self
            .known
            .iter()
            .enumerate()
            .filter(|(_, c)| c.weights.is_some())
            .map(|(i, c)| (i, c.stats.distance(window)))
            .min_by(|a, b| a.1.total_cmp(&b.1))?;
        let share = (d / self.cfg.threshold).min(1.0);
        self.left = ((self.left as f64 * share).round() as u64).max(1);
        log::info!(
            "training budget: a new condition, nearest to condition {i} (distance {d:.1}); {} steps left",
            self.left
        );
        Some(i)
    }

    /// A condition adapted to k times before keeps `revisit`^k of its budget. Being the same
    /// condition takes a quarter of the shift threshold: a near miss is a new condition.
    fn rescale_if_known(&mut self, window: &[f64]) -> Option<usize> {
        let i = self.find(window)?;
        let visits = self.known[i].visits;
        let f = self.cfg.revisit.powi(visits as i32);
        self.left = (self.left as f64 * f).round() as u64;
        self.granted = ((self.granted as f64 * f).round() as u64).max(1);
        log::info!(
            "training budget: a condition adapted to {visits} time(s) before; {} steps left",
            self.left
        );
        Some(i)
    }

    /// The known condition `mean` belongs to.
    fn find(&self, mean: &[f64]) -> Option<usize> {
        self.known
            .iter()
            .position(|c| c.stats.distance(mean) <= self.cfg.threshold / 4.0)
    }

    /// Files a finished condition's statistics; its index among the known ones.
    fn remember(&mut self, done: FrameStats) -> usize {
        match self.find(&done.mean) {
            Some(i) => {
                self.known[i].visits += 1;
                i
            }
            None => {
                self.known.push(Condition {
                    stats: done,
                    visits: 1,
                    weights: None,
                    last: self.frames,
                });
                self.known.len() - 1
            }
        }
    }

    /// Whether the last observed frame told a condition apart, once, and then whether the
    /// weights it starts from are near (its own, or a kept condition's within the shift
    /// threshold): the moment the adapter may weigh where the condition starts.
    pub fn take_told(&mut self) -> Option<bool> {
        std::mem::take(&mut self.told)
    }

    /// The kept conditions with weights.
    pub fn kept(&self) -> Vec<usize> {
        (0..self.known.len())
            .filter(|&i| self.known[i].weights.is_some())
            .collect()
    }

    /// Whether any condition's weights are kept.
    pub fn has_kept(&self) -> bool {
        self.known.iter().any(|c| c.weights.is_some())
    }

    /// Steps left in the current budget.
    pub fn left(&self) -> u64 {
        self.left
    }

    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let dev = &Device::Cpu;
        let stats = FrameStats::to_vec;
        let mut known: Vec<f32> = Vec::new();
        let mut slots = Vec::new();
        for (i, c) in self.known.iter().enumerate() {
            known.extend(stats(&c.stats));
            known.extend([
                c.visits as f32,
                c.last as f32,
                f32::from(u8::from(c.weights.is_some())),
            ]);
            for (n, t) in c.weights.iter().flatten() {
                slots.push((format!("slot{i}.{n}"), t.clone()));
            }
        }
        let recent: Vec<f32> = self.recent.iter().flatten().map(|&v| v as f32).collect();
        let interrupted: Vec<f32> = match &self.interrupted {
            Some(int) => [
                int.condition as f32,
                int.left as f32,
                int.granted as f32,
                int.visits as f32,
            ]
            .into_iter()
            .chain(stats(&int.stats))
            .collect(),
            None => Vec::new(),
        };
        let mut v = vec![
            (
                "interrupted".into(),
                Tensor::new(interrupted.as_slice(), dev)?,
            ),
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
                        self.frames as f32,
                        self.held.map_or(-1.0, |i| i as f32),
                    ],
                    dev,
                )?,
            ),
        ];
        v.extend(slots);
        Ok(v)
    }

    /// Reads [`Controller::state`] back; `names` are the model's tensor names, under which the
    /// kept weights were saved.
    pub fn load(&mut self, get: &dyn Fn(&str) -> Option<Tensor>, names: &[String]) -> Result<()> {
        let read = |k: &str| -> Result<Vec<f64>> {
            let v: Vec<f32> = need(get, "budget", k)?.to_vec1()?;
            Ok(v.into_iter().map(f64::from).collect())
        };
        let stats = |v: &[f64]| {
            FrameStats::from_slice(v).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "budget state: {} values where frame statistics need {}",
                    v.len(),
                    1 + 2 * DIMS
                ))
            })
        };
        self.current = stats(&read("current")?)?;
        let per = 4 + 2 * DIMS;
        self.known = Vec::new();
        for (i, c) in read("known")?.chunks(per).enumerate() {
            let weights = match c[per - 1] > 0.0 {
                true => Some(
                    names
                        .iter()
                        .map(|n| Ok((n.clone(), need(get, "budget", &format!("slot{i}.{n}"))?)))
                        .collect::<Result<TensorMap>>()?,
                ),
                false => None,
            };
            self.known.push(Condition {
                stats: stats(c)?,
                visits: c[per - 3] as u32,
                last: c[per - 2] as u64,
                weights,
            });
        }
        self.recent = read("recent")?.chunks(DIMS).map(|c| c.to_vec()).collect();
        let int = read("interrupted")?;
        self.interrupted = match int.is_empty() {
            true => None,
            false => Some(Interrupted {
                condition: int[0] as usize,
                left: int[1] as u64,
                granted: int[2] as u64,
                visits: int[3] as u32,
                stats: stats(&int[4..])?,
            }),
        };
        let b = read("budget")?;
        (self.left, self.granted) = (b[0] as u64, b[1] as u64);
        (self.settling, self.pending) = (b[2] as usize, b[3] > 0.0);
        self.frames = b[4] as u64;
        // Checkpoints from before the held condition was recorded have five values.
        self.held = b.get(5).filter(|&&v| v >= 0.0).map(|&v| v as usize);
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
            let mut d = [0f64; DIMS];
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
            // In f32, as checkpoints keep the window: a resumed run's source share is the same
            // to the bit.
            d.iter().map(|&v| v as f32 as f64).collect()
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

    #[test]
    fn the_teachers_statistics_follow_a_stream_by_its_shift_from_the_source() {
        // Source frames whose level varies a little from frame to frame: their spread.
        let day = |i: usize| frame(0.5 + 0.02 * (i % 5) as f32, 0.3);
        let source = FrameStats::of_frames((0..50).map(|i| Ok(day(i)))).unwrap();
        let mut c = Controller::new(&cfg(40)).with_source(source.clone());
        let share = |c: &mut Controller, f: &dyn Fn(usize) -> Tensor| {
            (0..8).for_each(|i| {
                c.observe(&f(i)).unwrap();
            });
            c.source_share()
        };
        let like_source = share(&mut c, &|i| day(i + 1));
        assert!(like_source < 0.1, "{like_source}");
        assert!(
            c.near_source(),
            "in the source's condition: tracked by class"
        );
        let night = share(&mut c, &|i| frame(-1.5 + 0.01 * (i % 3) as f32, 0.05));
        assert_eq!(night, 1.0);
        assert!(!c.near_source());
        // Without the source's frames, all of the way, and never near it.
        let mut plain = Controller::new(&cfg(40));
        assert_eq!(share(&mut plain, &|i| day(i + 1)), 1.0);
        assert!(!plain.near_source());
        // They round-trip through the source statistics' vector.
        let v: Vec<f64> = source.to_vec().into_iter().map(f64::from).collect();
        let back = FrameStats::from_slice(&v).unwrap();
        assert_eq!(back.to_vec(), source.to_vec());
        assert!(FrameStats::from_slice(&v[..5]).is_none());
        // A checkpoint whose statistics are cut short is refused, not read as empty.
        let mut state = c.state().unwrap();
        let cur = state.iter_mut().find(|(n, _)| n == "current").unwrap();
        cur.1 = Tensor::new(&[1f32, 2.0, 3.0, 4.0, 5.0], &Device::Cpu).unwrap();
        let err = Controller::new(&cfg(40))
            .load(
                &|k| state.iter().find(|(n, _)| n == k).map(|(_, t)| t.clone()),
                &[],
            )
            .unwrap_err();
        assert!(err.to_string().contains("5 values"), "{err}");
    }

    fn cfg(steps: u64) -> config::Budget {
        config::Budget {
            on: true,
            steps,
            window: 4,
            threshold: 9.0,
            revisit: 0.5,
            slots: 0,
            ..Default::default()
        }
    }

    /// The events of 60 frames of a condition, one step on each.
    fn events(c: &mut Controller, f: &dyn Fn(usize) -> Tensor) -> Vec<Event> {
        (0..60)
            .map(|i| {
                let e = c.observe(&f(i)).unwrap();
                c.spend();
                e
            })
            .filter(|e| *e != Event::Steady)
            .collect()
    }

    #[test]
    fn with_slots_a_known_condition_gets_its_weights_back() {
        let mut c = Controller::new(&config::Budget {
            slots: 1,
            ..cfg(40)
        });
        let day = |i: usize| frame(0.5 + 0.01 * (i % 3) as f32, 0.3);
        let night = |i: usize| frame(-1.5 + 0.01 * (i % 3) as f32, 0.05);
        let fog = |i: usize| frame(1.5 + 0.01 * (i % 3) as f32, 0.02);
        let weights = |v: f32| {
            let t = Tensor::new(&[v], &Device::Cpu).unwrap();
            TensorMap::from([("w".to_string(), t)])
        };
        assert_eq!(events(&mut c, &day), vec![], "the first condition");
        assert_eq!(
            events(&mut c, &night),
            vec![Event::Shifted { left: Some(0) }]
        );
        c.keep(0, weights(1.0));
        // Night has no weights yet: back to day, day's weights come back.
        assert_eq!(
            events(&mut c, &day),
            vec![Event::Shifted { left: Some(1) }, Event::Recalled(0)]
        );
        c.keep(1, weights(2.0));
        assert!(
            c.weights(0).is_none(),
            "one slot: night's weights pushed day's out"
        );
        // The slots survive a checkpoint.
        let state = c.state().unwrap();
        let mut d = Controller::new(&c.cfg);
        d.load(
            &|k| state.iter().find(|(n, _)| n == k).map(|(_, t)| t.clone()),
            &["w".to_string()],
        )
        .unwrap();
        let w: Vec<f32> = d.weights(1).unwrap()["w"].to_vec1().unwrap();
        assert_eq!(w, vec![2.0]);
        // Fog is new: it goes on from the nearest kept weights, night's.
        assert_eq!(
            events(&mut d, &fog),
            vec![Event::Shifted { left: Some(0) }, Event::Recalled(1)]
        );
        assert_eq!(
            events(&mut d, &night),
            vec![Event::Shifted { left: Some(2) }, Event::Recalled(1)]
        );
    }

    #[test]
    fn a_new_condition_like_a_kept_one_starts_from_its_weights_with_part_of_a_budget() {
        let mut c = Controller::new(&config::Budget {
            slots: 2,
            ..cfg(100)
        });
        let day = |i: usize| frame(0.5 + 0.01 * (i % 3) as f32, 0.3);
        let night = |i: usize| frame(-1.5 + 0.01 * (i % 3) as f32, 0.05);
        // A little darker than day: past a quarter of the threshold, within the threshold.
        let dusk = |i: usize| frame(0.46 + 0.01 * (i % 3) as f32, 0.3);
        events(&mut c, &day);
        assert_eq!(
            events(&mut c, &night),
            vec![Event::Shifted { left: Some(0) }]
        );
        c.keep(0, TensorMap::new());
        let (mut seen, mut scales) = (Vec::new(), Vec::new());
        for i in 0..60 {
            let e = c.observe(&dusk(i)).unwrap();
            if e != Event::Steady {
                seen.push(e);
            }
            scales.push(c.spend());
        }
        assert_eq!(
            seen,
            vec![Event::Shifted { left: Some(1) }, Event::Recalled(0)]
        );
        // Past a quarter of the threshold and within it: the tail of a full budget, its rate
        // starting below the full rate.
        let first = scales.iter().copied().find(|&s| s > 0.0).unwrap();
        assert!(first > 0.0 && first < 1.0, "{scales:?}");
        assert_eq!(c.granted, 100);
        assert_eq!(c.known[0].visits, 1, "day itself was not revisited");
    }

    #[test]
    fn a_passing_change_resumes_the_condition_it_interrupted() {
        let mut c = Controller::new(&config::Budget {
            slots: 2,
            ..cfg(100)
        });
        let day = |i: usize| frame(0.5 + 0.01 * (i % 3) as f32, 0.3);
        events(&mut c, &day);
        let left_before = c.left;
        // A tunnel: six dark frames, then day again.
        let mut seen = Vec::new();
        for i in 0..30 {
            let f = match i < 6 {
                true => frame(-1.5, 0.05),
                false => day(i),
            };
            let e = c.observe(&f).unwrap();
            c.spend();
            if let Event::Shifted { left: Some(j) } = e {
                c.keep(j, TensorMap::new());
            }
            if e != Event::Steady {
                seen.push(e);
            }
        }
        // Day's weights never left the adapter: nothing to recall.
        assert_eq!(seen, vec![Event::Shifted { left: Some(0) }]);
        assert_eq!(c.held, Some(0));
        assert_eq!(
            c.known[0].visits, 0,
            "the day condition is not counted again"
        );
        assert!(
            c.left < left_before,
            "the budget goes on from where it was ({} of {left_before})",
            c.left
        );
    }

    #[test]
    fn after_a_shift_training_waits_until_the_new_condition_is_told() {
        let mut c = Controller::new(&config::Budget {
            slots: 2,
            ..cfg(100)
        });
        events(&mut c, &|i| frame(0.5 + 0.01 * (i % 3) as f32, 0.3));
        let mut scales = Vec::new();
        let (mut shifted, mut told) = (false, None);
        for i in 0..60 {
            match c
                .observe(&frame(-1.5 + 0.01 * (i % 3) as f32, 0.05))
                .unwrap()
            {
                Event::Shifted { left: Some(j) } => {
                    c.keep(j, TensorMap::new());
                    shifted = true;
                }
                Event::Steady if shifted && told.is_none() && !c.pending => told = Some(i),
                _ => {}
            }
            scales.push(c.spend());
        }
        let told = told.expect("night is told apart");
        // Night is new and goes on from day's weights, the only kept ones: no recall, and no
        // step before it is told, then its whole budget.
        assert_eq!(c.held, Some(0));
        assert!(scales[..told].iter().all(|&s| s == 0.0), "{scales:?}");
        assert_eq!(scales[told], 1.0, "{scales:?}");
    }

    #[test]
    fn without_slots_shifts_name_no_condition() {
        let mut c = Controller::new(&cfg(40));
        events(&mut c, &|i| frame(0.5 + 0.01 * (i % 3) as f32, 0.3));
        let night = events(&mut c, &|i| frame(-1.5 + 0.01 * (i % 3) as f32, 0.05));
        assert_eq!(night, vec![Event::Shifted { left: None }]);
    }

    #[test]
    fn a_steady_stream_spends_its_budget_and_stops() {
        let mut c = Controller::new(&cfg(10));
        let scales: Vec<f64> = (0..15)
            .map(|i| {
                c.observe(&frame(0.5 + 0.01 * (i % 3) as f32, 0.3)).unwrap();
                c.spend()
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
                .filter(|&i| {
                    c.observe(&f(i)).unwrap();
                    c.spend() > 0.0
                })
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
        d.load(
            &|k| state.iter().find(|(n, _)| n == k).map(|(_, t)| t.clone()),
            &[],
        )
        .unwrap();
        assert_eq!(
            (d.left, d.granted, d.known.len()),
            (c.left, c.granted, c.known.len())
        );
    }
}
