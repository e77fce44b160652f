//! mmseg's `poly` learning-rate policy with linear warm-up (DAFormer's `poly10warm`).

#[derive(Debug, Clone, Copy)]
pub struct PolySchedule {
    pub base_lr: f64,
    pub total_steps: u64,
    pub warmup_steps: u64,
    /// The warm-up starts at `warmup_ratio * lr`.
    pub warmup_ratio: f64,
    pub power: f64,
    pub min_lr: f64,
}

impl PolySchedule {
    pub fn new(base_lr: f64, total_steps: u64, warmup_steps: u64) -> Self {
        Self {
            base_lr,
            total_steps,
            warmup_steps,
            warmup_ratio: 1e-6,
            power: 1.0,
            min_lr: 0.0,
        }
    }

    /// The learning rate at (0-based) step `t`.
    pub fn lr(&self, t: u64) -> f64 {
        let frac = (t as f64 / self.total_steps.max(1) as f64).min(1.0);
        let poly = (self.base_lr - self.min_lr) * (1.0 - frac).powf(self.power) + self.min_lr;
        if t < self.warmup_steps {
            let k = (1.0 - t as f64 / self.warmup_steps as f64) * (1.0 - self.warmup_ratio);
            poly * (1.0 - k)
        } else {
            poly
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_linearly_then_decays_to_zero() {
        let s = PolySchedule::new(1e-3, 1000, 100);
        assert!((s.lr(0) - 1e-3 * 1e-6 * 1.0).abs() < 1e-12);
        // Halfway through warm-up: half of the poly value at that step.
        let poly50 = 1e-3 * (1.0 - 50.0 / 1000.0);
        assert!((s.lr(50) - poly50 * (0.5 + 0.5 * 1e-6)).abs() < 1e-12);
        assert!((s.lr(100) - 1e-3 * 0.9).abs() < 1e-12);
        assert!((s.lr(550) - 1e-3 * 0.45).abs() < 1e-12);
        assert_eq!(s.lr(1000), 0.0);
        assert_eq!(s.lr(5000), 0.0);
    }
}
