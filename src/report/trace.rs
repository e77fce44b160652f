//! What a run records for its report, in bounded memory however long it drives.

use crate::adapt::controller::Event;
use crate::adapt::step::StepReport;
use image::RgbImage;

/// A series that keeps at most `cap` points spread over everything pushed: when full, every
/// other point goes and from then on only every `stride`-th push is kept. An hours-long drive
/// costs the same memory as a minute's.
#[derive(Debug, Clone)]
pub struct Thinned<T> {
    cap: usize,
    stride: u64,
    seen: u64,
    points: Vec<T>,
}

impl<T> Thinned<T> {
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(2),
            stride: 1,
            seen: 0,
            points: Vec::new(),
        }
    }

    pub fn push(&mut self, p: T) {
        self.seen += 1;
        if (self.seen - 1) % self.stride != 0 {
            return;
        }
        if self.points.len() == self.cap {
            let mut i = 0;
            self.points.retain(|_| {
                i += 1;
                i % 2 == 1
            });
            self.stride *= 2;
            if (self.seen - 1) % self.stride != 0 {
                return;
            }
        }
        self.points.push(p);
    }

    pub fn points(&self) -> &[T] {
        &self.points
    }
}

/// One adaptation step, as the report plots it.
#[derive(Debug, Clone)]
pub struct StepPoint {
    pub step: u64,
    pub total: f32,
    pub terms: Vec<(&'static str, f32)>,
    pub kept: f32,
    pub confidence: f32,
    /// The training budgets' shift test saw a new condition before this step.
    pub shifted: bool,
}

impl StepPoint {
    pub fn new(step: u64, r: &StepReport) -> Self {
        Self {
            step,
            total: r.total,
            terms: r.terms.clone(),
            kept: r.kept,
            confidence: r.confidence,
            shifted: matches!(r.event, Event::Shifted { .. }),
        }
    }
}

/// One served frame: its latency and the share of each class in its prediction.
#[derive(Debug, Clone)]
pub struct ServePoint {
    pub frame: u64,
    pub latency_ms: f32,
    pub shares: Vec<f32>,
}

impl ServePoint {
    pub fn new(frame: u64, latency_ms: f64, pred: &[u8], classes: usize) -> Self {
        let mut counts = vec![0u32; classes];
        for &c in pred {
            if let Some(n) = counts.get_mut(c as usize) {
                *n += 1;
            }
        }
        let total = pred.len().max(1) as f32;
        Self {
            frame,
            latency_ms: latency_ms as f32,
            shares: counts.iter().map(|&n| n as f32 / total).collect(),
        }
    }
}

/// A few frames spread over the drive, for the report's strip: the frames served at indices
/// 1, 2, 4, 8, ... and of those the last `cap`, so a long drive shows its later part.
#[derive(Debug, Clone)]
pub struct FrameStrip {
    cap: usize,
    pub frames: Vec<(u64, String, RgbImage)>,
}

impl FrameStrip {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            frames: Vec::new(),
        }
    }

    /// Offers the `index`-th served frame (counting from 1).
    pub fn offer(&mut self, index: u64, name: &str, img: &RgbImage) {
        if self.cap == 0 || !index.is_power_of_two() {
            return;
        }
        if self.frames.len() == self.cap {
            self.frames.remove(0);
        }
        self.frames
            .push((index, name.to_string(), thumbnail(img, 320)));
    }
}

/// `img` scaled down to at most `width` pixels across (a page of full frames weighs megabytes).
fn thumbnail(img: &RgbImage, width: u32) -> RgbImage {
    if img.width() <= width {
        return img.clone();
    }
    let height = (img.height() as u64 * width as u64 / img.width() as u64).max(1) as u32;
    image::imageops::resize(img, width, height, image::imageops::FilterType::Triangle)
}

/// Everything a run recorded for its report.
#[derive(Debug, Clone)]
pub struct RunTrace {
    pub steps: Thinned<StepPoint>,
    pub served: Thinned<ServePoint>,
    pub strip: FrameStrip,
}

impl RunTrace {
    /// Records the `index`-th served frame (counting from 1): its latency, its prediction's
    /// class shares, and the frame itself where the strip wants it.
    pub fn served(
        &mut self,
        index: u64,
        latency_ms: f64,
        frame: &crate::source::Frame,
        pred: &[u8],
        classes: usize,
    ) {
        self.served
            .push(ServePoint::new(index, latency_ms, pred, classes));
        self.strip.offer(index, &frame.name, &frame.image);
    }
}

impl Default for RunTrace {
    fn default() -> Self {
        Self {
            steps: Thinned::new(2000),
            served: Thinned::new(2000),
            strip: FrameStrip::new(4),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thinned_series_stays_bounded_and_spans_the_whole_run() {
        let mut t = Thinned::new(10);
        for i in 0..1000u64 {
            t.push(i);
        }
        let p = t.points();
        assert!(p.len() <= 10 && p.len() >= 5, "{p:?}");
        assert_eq!(p[0], 0);
        assert!(*p.last().unwrap() >= 500, "{p:?}");
        let gaps: Vec<u64> = p.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.iter().all(|&g| g == gaps[0]), "evenly spaced: {p:?}");
    }

    #[test]
    fn the_strip_keeps_the_last_powers_of_two() {
        let img = RgbImage::new(2, 2);
        let mut s = FrameStrip::new(3);
        for i in 1..=100 {
            s.offer(i, &format!("f{i}"), &img);
        }
        let idx: Vec<u64> = s.frames.iter().map(|f| f.0).collect();
        assert_eq!(idx, vec![16, 32, 64]);
    }

    #[test]
    fn class_shares_sum_to_one() {
        let p = ServePoint::new(1, 3.0, &[0, 0, 1, 2], 3);
        assert_eq!(p.shares, vec![0.5, 0.25, 0.25]);
    }
}
