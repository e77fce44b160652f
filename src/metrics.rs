//! Segmentation scores from a confusion matrix: per-class IoU, mIoU, pixel accuracy.

use serde::Serialize;

#[derive(Debug, Clone)]
pub struct Confusion {
    n: usize,
    /// counts[gt * n + pred]
    counts: Vec<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    /// Mean IoU in percent over classes that occur in labels or predictions.
    pub miou: f64,
    pub pixel_accuracy: f64,
    /// IoU in percent per class; None where the class is neither labelled nor predicted.
    pub per_class: Vec<(String, Option<f64>)>,
}

impl Confusion {
    pub fn new(n: usize) -> Self {
        Self {
            n,
            counts: vec![0; n * n],
        }
    }

    /// Adds one image; `gt` values >= n or in `ignore` are skipped.
    pub fn add(&mut self, pred: &[u8], gt: &[u8], ignore: &[u8]) {
        for (&p, &g) in pred.iter().zip(gt) {
            if (g as usize) < self.n && !ignore.contains(&g) && (p as usize) < self.n {
                self.counts[g as usize * self.n + p as usize] += 1;
            }
        }
    }

    pub fn merge(&mut self, other: &Confusion) {
        self.counts
            .iter_mut()
            .zip(&other.counts)
            .for_each(|(a, b)| *a += b);
    }

    pub fn iou(&self) -> Vec<Option<f64>> {
        (0..self.n)
            .map(|c| {
                let tp = self.counts[c * self.n + c];
                let gt: u64 = (0..self.n).map(|p| self.counts[c * self.n + p]).sum();
                let pr: u64 = (0..self.n).map(|g| self.counts[g * self.n + c]).sum();
                let union = gt + pr - tp;
                (union > 0).then(|| 100.0 * tp as f64 / union as f64)
            })
            .collect()
    }

    pub fn scores(&self, names: &[String]) -> Scores {
        let iou = self.iou();
        let valid: Vec<f64> = iou.iter().flatten().copied().collect();
        let total: u64 = self.counts.iter().sum();
        let correct: u64 = (0..self.n).map(|c| self.counts[c * self.n + c]).sum();
        Scores {
            miou: if valid.is_empty() {
                0.0
            } else {
                valid.iter().sum::<f64>() / valid.len() as f64
            },
            pixel_accuracy: if total == 0 {
                0.0
            } else {
                100.0 * correct as f64 / total as f64
            },
            per_class: names.iter().cloned().zip(iou).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_by_hand() {
        let mut c = Confusion::new(3);
        // gt:   0 0 1 1 2 9(ignored)
        // pred: 0 1 1 1 0 2
        c.add(&[0, 1, 1, 1, 0, 2], &[0, 0, 1, 1, 2, 9], &[9]);
        let iou = c.iou();
        assert_eq!(iou[0], Some(100.0 / 3.0)); // tp 1, gt 2, pred 2
        assert_eq!(iou[1], Some(200.0 / 3.0)); // tp 2, gt 2, pred 3
        assert_eq!(iou[2], Some(0.0)); // tp 0, gt 1, pred 0
        let s = c.scores(&["a".into(), "b".into(), "c".into()]);
        assert!((s.miou - 100.0 / 3.0).abs() < 1e-9);
        assert!((s.pixel_accuracy - 60.0).abs() < 1e-9);
    }

    #[test]
    fn absent_class_is_not_averaged() {
        let mut c = Confusion::new(3);
        c.add(&[0, 1], &[0, 1], &[]);
        assert_eq!(c.iou()[2], None);
        assert_eq!(c.scores(&["a".into(), "b".into(), "c".into()]).miou, 100.0);
    }
}
