//! Measures, with the counting allocator, the heap a training step and a serving forward take
//! above what was live before them: the planner's activation and serving figures.

use super::plan::Measure;
use crate::adapt::step::Adapter;
use crate::adapt::AdaptConfig;
use crate::config::SegformerConfig;
use crate::error::{Error, Result};
use crate::model::{Segformer, TensorMap};
use crate::stats::SourceStats;
use candle_core::Tensor;
use rand::SeedableRng;

pub struct Calibrator<'a> {
    pub model: &'a SegformerConfig,
    pub tensors: &'a TensorMap,
    pub stats: &'a SourceStats,
    pub adapt: &'a AdaptConfig,
    /// Serving input (width, height).
    pub input: (usize, usize),
}

/// Runs `f` and returns the heap peak it reached above the level before it.
fn peak_of(f: impl FnOnce() -> Result<()>) -> Result<usize> {
    let base = super::current_bytes();
    super::reset_peak();
    f()?;
    let peak = super::peak_bytes();
    if peak == 0 {
        return Err(Error::Invalid(
            "memory measurement needs segadapt's counting allocator installed as the global allocator".into(),
        ));
    }
    Ok(peak.saturating_sub(base))
}

impl Measure for Calibrator<'_> {
    fn step_peak(&mut self, batch: usize, (w, h): (usize, usize)) -> Result<usize> {
        let mut cfg = self.adapt.clone();
        // Measure a step that does all its work.
        cfg.guard.collapse = false;
        let replay = cfg.replay.on;
        let mut a = Adapter::new(cfg, self.model, self.tensors, self.stats.clone())?;
        let x = Tensor::randn(0f32, 1.0, (batch, 3, h, w), a.teacher.device())?;
        let strong = (&x * 0.9)?;
        let mut rng = crate::SeededRng::seed_from_u64(0);
        if replay {
            // A stand-in source frame: the step's cost does not depend on what it shows.
            let c = self.model.num_labels();
            let (iw, ih) = self.input;
            let ex = crate::data::Example {
                name: "calibration".into(),
                image: image::RgbImage::from_fn(iw as u32, ih as u32, |x, y| {
                    image::Rgb([(x % 256) as u8, (y % 256) as u8, 128])
                }),
                label: Some((0..iw * ih).map(|i| ((i % iw) * c / iw) as u8).collect()),
            };
            a.replay = Some(std::sync::Arc::new(crate::adapt::replay::Replay::new(
                &[ex],
                &crate::config::PreprocessConfig::default(),
                (iw as u32, ih as u32),
                1,
                self.adapt.replay.temp,
                c,
                &mut rng,
            )));
        }
        // The first step fills the queue, bank and paste pool; the second is the steady one.
        a.step(&x, &strong, &mut rng)?;
        let first = peak_of(|| Ok(a.step(&x, &strong, &mut rng).map(|_| ())?))?;
        log::debug!("step batch {batch} crop {w}x{h}: {first} bytes");
        Ok(first)
    }

    fn serve_peak(&mut self) -> Result<usize> {
        let m = Segformer::new(self.model, self.tensors.clone())?;
        let (w, h) = self.input;
        let x = Tensor::randn(0f32, 1.0, (1, 3, h, w), m.device())?;
        peak_of(|| {
            let out = m.forward(&x, None)?;
            drop(out.logits.argmax(3)?);
            Ok(())
        })
    }
}

/// The profile's plan for `model` with the step and serving peaks measured here.
pub fn measured_plan(
    profile: &crate::config::Profile,
    model: &SegformerConfig,
    tensors: &TensorMap,
    stats: &SourceStats,
    adapt: &AdaptConfig,
) -> Result<super::Plan> {
    super::plan(
        profile,
        model,
        (tensors, stats),
        adapt,
        &mut Calibrator {
            model,
            tensors,
            stats,
            adapt,
            input: (profile.input.width, profile.input.height),
        },
    )
}
