//! A target batch's decode-head BatchNorm statistics as they would be under the source's class
//! mix.
//!
//! A frame's feature statistics mix how it looks with what it shows: a stretch of road without
//! parked cars moves the mean as a change of light does. A teacher that follows them on a
//! stream with no shift at all still moves, by the content alone (on CamVid's unseen day
//! sequence, car lost 6.5 IoU with nothing but the statistics moving). Taken class by class,
//! under the teacher's own labels, and weighed by the source's class shares, the batch's
//! statistics keep the shift and drop the content: a class the batch shows moves by its own
//! shift from the source, one it does not show by the batch's average shift.

use candle_core::{DType, Result, Tensor};

/// Pixels at which a class's own shift counts as much as the batch's average shift: a class
/// seen on a few pixels moves mostly with the rest of the frame.
const SHRINK_PIXELS: f64 = 64.0;

/// A variance floor for the ratio of a batch's class variance to the source's.
const VAR_FLOOR: f64 = 1e-6;

/// Per-class pixel counts and feature sums of [P, D] features.
#[derive(Debug, Clone)]
pub struct ClassMoments {
    /// [C, 1]
    pub count: Tensor,
    /// [C, D]
    pub sum: Tensor,
    /// [C, D] sums of squares.
    pub sq: Tensor,
}

impl ClassMoments {
    /// `x`: [P, D] features, `labels`: [P] u32 classes; a label of `classes` or more (ignored
    /// pixels) counts for none.
    pub fn of(x: &Tensor, labels: &Tensor, classes: usize) -> Result<Self> {
        let x = x.to_dtype(DType::F32)?;
        let ids = Tensor::arange(0u32, classes as u32, x.device())?;
        let onehot = labels
            .to_dtype(DType::U32)?
            .unsqueeze(1)?
            .broadcast_eq(&ids.unsqueeze(0)?)?
            .to_dtype(DType::F32)?; // [P, C]
        let by_class = onehot.t()?.contiguous()?; // [C, P]
        Ok(Self {
            count: by_class.sum_keepdim(1)?,
            sum: by_class.matmul(&x)?,
            sq: by_class.matmul(&x.sqr()?)?,
        })
    }

    pub fn add(&self, other: &Self) -> Result<Self> {
        Ok(Self {
            count: (&self.count + &other.count)?,
            sum: (&self.sum + &other.sum)?,
            sq: (&self.sq + &other.sq)?,
        })
    }

    /// Per-class ([C, D]) means and biased variances; zero for a class with no pixels.
    fn mean_var(&self) -> Result<(Tensor, Tensor)> {
        let n = self.count.clamp(1.0, f64::MAX)?;
        let mean = self.sum.broadcast_div(&n)?;
        let var = (self.sq.broadcast_div(&n)? - mean.sqr()?)?.relu()?;
        Ok((mean, var))
    }
}

/// The source's BatchNorm input class by class, measured on its labelled frames
/// (`segadapt stats`).
#[derive(Debug, Clone)]
pub struct ClassNorm {
    /// [C, D] per-class mean and variance.
    pub mean: Tensor,
    pub var: Tensor,
    /// [C, 1] source pixels per class at the head's resolution.
    pub count: Tensor,
    /// [C, 1] the counts' shares.
    prior: Tensor,
    /// The source frames' mean [`ClassNorm::frame_distance`]: how far a frame of the source
    /// domain sits from the source's statistics by what it shows alone.
    pub spread: f64,
}

impl ClassNorm {
    pub fn new(mean: Tensor, var: Tensor, count: Tensor, spread: f64) -> Result<Self> {
        let count = count.reshape(((), 1))?;
        let prior = count.broadcast_div(&count.sum_all()?.clamp(1.0, f64::MAX)?)?;
        Ok(Self {
            mean,
            var,
            count,
            prior,
            spread,
        })
    }

    pub fn to_device(&self, dev: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            mean: self.mean.to_device(dev)?,
            var: self.var.to_device(dev)?,
            count: self.count.to_device(dev)?,
            prior: self.prior.to_device(dev)?,
            spread: self.spread,
        })
    }

    /// From the source's class moments and the mean per-frame feature means of its frames
    /// (`frame_means`: [N, D], one row a frame), whose distances give the spread.
    pub fn from_moments(m: &ClassMoments, frame_means: &Tensor) -> Result<Self> {
        let (mean, var) = m.mean_var()?;
        let mut norm = Self::new(mean, var, m.count.clone(), 0.0)?;
        norm.spread = norm
            .distance_of_means(frame_means)?
            .mean_all()?
            .to_scalar::<f32>()? as f64;
        Ok(norm)
    }

    /// The source's statistics ([1, D] mean and biased variance) under its class shares.
    pub fn mixture(&self) -> Result<(Tensor, Tensor)> {
        let mean = self.mean.broadcast_mul(&self.prior)?.sum_keepdim(0)?;
        let spread = (&self.var + self.mean.broadcast_sub(&mean)?.sqr()?)?;
        Ok((mean, spread.broadcast_mul(&self.prior)?.sum_keepdim(0)?))
    }

    /// How far a batch's feature mean (`mean`: [1, D]) sits from the source's: the squared
    /// difference in source variances, averaged over the channels. What it shows counts too.
    pub fn frame_distance(&self, mean: &Tensor) -> Result<f64> {
        Ok(self.distance_of_means(mean)?.to_vec1::<f32>()?[0] as f64)
    }

    /// The share of the way from the source's statistics towards a batch's that the batch's
    /// feature shift calls for: none within the source frames' own spread, all of it at twice
    /// that spread, linear between.
    pub fn feature_share(&self, mean: &Tensor) -> Result<f64> {
        // Source frames that all sit at their mean leave no spread to measure a shift against.
        if self.spread <= 0.0 {
            return Ok(1.0);
        }
        Ok((self.frame_distance(mean)? / self.spread - 1.0).clamp(0.0, 1.0))
    }

    /// [N] distances of [N, D] means.
    fn distance_of_means(&self, means: &Tensor) -> Result<Tensor> {
        let (mix, var) = self.mixture()?;
        let var = var.clamp(VAR_FLOOR, f64::MAX)?;
        means
            .to_dtype(DType::F32)?
            .broadcast_sub(&mix)?
            .sqr()?
            .broadcast_div(&var)?
            .mean(1)
    }

    pub fn classes(&self) -> Result<usize> {
        self.mean.dim(0)
    }

    /// The statistics `x` ([P, D], labelled `labels` [P]) would have with the source's class
    /// shares: each class's mean and variance moved from the source's by the batch's shift of
    /// that class, shrunk towards the batch's pooled shift by how few pixels show it. Returns
    /// ([1, D] mean, [1, D] biased variance).
    pub fn batch_stats(&self, x: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
        let m = ClassMoments::of(x, labels, self.classes()?)?;
        let (mean, var) = m.mean_var()?;
        let n = &m.count; // [C, 1]
        let total = n.sum_all()?.clamp(1.0, f64::MAX)?;
        let own = (&mean - &self.mean)?.broadcast_mul(n)?; // n_c * shift_c
        let pooled = own.sum_keepdim(0)?.broadcast_div(&total)?; // [1, D]
        let src_var = self.var.clamp(VAR_FLOOR, f64::MAX)?;
        let pooled_ratio = var
            .broadcast_mul(n)?
            .sum_keepdim(0)?
            .broadcast_div(&src_var.broadcast_mul(n)?.sum_keepdim(0)?)?; // [1, D]
        let weight = (n + SHRINK_PIXELS)?; // [C, 1]
        let shift = own
            .broadcast_add(&(pooled * SHRINK_PIXELS)?)?
            .broadcast_div(&weight)?;
        let ratio = (var / &src_var)?
            .broadcast_mul(n)?
            .broadcast_add(&(pooled_ratio * SHRINK_PIXELS)?)?
            .broadcast_div(&weight)?;
        let shifted = Self {
            mean: (&self.mean + shift)?,
            var: (&self.var * ratio)?,
            count: self.count.clone(),
            prior: self.prior.clone(),
            spread: self.spread,
        };
        shifted.mixture()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn vec2(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Two classes in one dimension: class 0 at 0, class 1 at 10, equal source shares.
    fn source() -> ClassNorm {
        let dev = &Device::Cpu;
        ClassNorm::new(
            Tensor::new(&[[0f32], [10.0]], dev).unwrap(),
            Tensor::new(&[[1f32], [1.0]], dev).unwrap(),
            Tensor::new(&[500f32, 500.0], dev).unwrap(),
            0.5,
        )
        .unwrap()
    }

    /// `a` pixels of class 0 and `b` of class 1, each at its class mean plus `shift`, spread
    /// by +-1 so each class keeps the source's variance.
    fn batch(a: usize, b: usize, shift: f32) -> (Tensor, Tensor) {
        let mut x = Vec::new();
        let mut l = Vec::new();
        for (class, count, centre) in [(0u32, a, 0f32), (1, b, 10.0)] {
            for i in 0..count {
                x.push(centre + shift + if i % 2 == 0 { 1.0 } else { -1.0 });
                l.push(class);
            }
        }
        let dev = &Device::Cpu;
        let p = x.len();
        (
            Tensor::from_vec(x, (p, 1), dev).unwrap(),
            Tensor::from_vec(l, p, dev).unwrap(),
        )
    }

    #[test]
    fn a_batch_that_shows_mostly_one_class_keeps_the_source_statistics() {
        let norm = source();
        let (x, l) = batch(900, 100, 0.0);
        let (mean, var) = norm.batch_stats(&x, &l).unwrap();
        // Plain batch statistics would say mean 1.0, variance 10: the content, not a shift.
        assert!((vec2(&mean)[0] - 5.0).abs() < 1e-4, "{:?}", vec2(&mean));
        assert!((vec2(&var)[0] - 26.0).abs() < 1e-3, "{:?}", vec2(&var));
    }

    #[test]
    fn a_shift_moves_the_statistics_and_an_unseen_class_moves_with_the_rest() {
        let norm = source();
        // Only class 0, shifted by 3: class 1 is not shown and takes the pooled shift.
        let (x, l) = batch(1000, 0, 3.0);
        let (mean, var) = norm.batch_stats(&x, &l).unwrap();
        assert!((vec2(&mean)[0] - 8.0).abs() < 1e-3, "{:?}", vec2(&mean));
        assert!((vec2(&var)[0] - 26.0).abs() < 1e-2, "{:?}", vec2(&var));
    }

    #[test]
    fn a_class_seen_on_few_pixels_moves_mostly_with_the_batch() {
        let norm = source();
        let mut x: Vec<f32> = vec![0.0; 1000];
        let mut l = vec![0u32; 1000];
        // Eight pixels of class 1, far off its source mean; class 0 unshifted.
        x.extend([30f32; 8]);
        l.extend([1u32; 8]);
        let dev = &Device::Cpu;
        let x = Tensor::from_vec(x, (1008, 1), dev).unwrap();
        let l = Tensor::from_vec(l, 1008, dev).unwrap();
        let (mean, _) = norm.batch_stats(&x, &l).unwrap();
        // Class 1's own shift (20) at 8 / (8 + 64), plus the pooled shift's share: far below
        // the 10 it would add at full weight.
        let m = vec2(&mean)[0];
        assert!(m > 5.0 && m < 6.5, "{m}");
    }

    #[test]
    fn moments_add_up_and_ignore_out_of_range_labels() {
        let dev = &Device::Cpu;
        let x = Tensor::new(&[[1f32], [3.0], [5.0]], dev).unwrap();
        let l = Tensor::new(&[0u32, 0, 255], dev).unwrap();
        let m = ClassMoments::of(&x, &l, 2).unwrap();
        let both = m.add(&m).unwrap();
        let frames = Tensor::new(&[[2f32]], dev).unwrap();
        let norm = ClassNorm::from_moments(&both, &frames).unwrap();
        assert_eq!(vec2(&both.count), vec![4.0, 0.0]);
        assert_eq!(norm.spread, 0.0, "the one frame is at the mixture's mean");
        assert_eq!(vec2(&norm.mean), vec![2.0, 0.0]);
        assert_eq!(vec2(&norm.var), vec![1.0, 0.0]);
    }

    #[test]
    fn the_feature_share_grows_from_the_source_frames_spread_to_twice_it() {
        // Mixture: mean 5, variance 26; spread 0.5 source variances.
        let norm = source();
        let at = |shift: f64| {
            let m = Tensor::new(&[[(5.0 + shift) as f32]], &Device::Cpu).unwrap();
            norm.feature_share(&m).unwrap()
        };
        let sd = 26f64.sqrt();
        assert_eq!(at(0.0), 0.0);
        assert!(at(sd * 0.5f64.sqrt()) < 1e-5, "at the spread itself");
        assert!((at(sd * 0.75f64.sqrt()) - 0.5).abs() < 1e-4);
        assert_eq!(at(-sd), 1.0);
    }
}
