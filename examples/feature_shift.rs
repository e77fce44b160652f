//! How far a suite target's frames sit from the source domain in the decode head's BatchNorm
//! input, as the source model sees them ([`segadapt::model::ClassNorm::frame_distance`]): per
//! frame, the squared shift of the feature mean in source variances, averaged over channels.
//! Two estimates: the frame's statistics as they are ("batch", what the teacher's anchored
//! tracking measures) and under the source's class shares by the model's own labels ("class",
//! the content taken out as `adapt.statistics = "class"` does). The source frames' own mean
//! batch distance, the spread a shift has to exceed, is printed first.
//!
//! ```sh
//! cargo run --release --example feature_shift -- benches/suites/dev.toml dusk,fog
//! ```

use candle_core::{DType, Device, Tensor};
use segadapt::data::image_to_tensor;
use segadapt::model::weights::load_model_dir;
use segadapt::model::Segformer;
use segadapt::source::FrameSource;
use segadapt::stats::SourceStats;
use segadapt::suite::{SuiteFile, Target};
use std::path::Path;

struct Shift {
    batch: Vec<f32>,
    class: Vec<f32>,
}

impl Shift {
    fn line(&self, name: &str) -> String {
        let m = |v: &[f32]| v.iter().sum::<f32>() / v.len().max(1) as f32;
        let q = |v: &[f32], p: f32| {
            let mut s = v.to_vec();
            s.sort_by(f32::total_cmp);
            s[((s.len() - 1) as f32 * p) as usize]
        };
        format!(
            "{name:<14} {:>5} frames  batch {:>7.3} (p10 {:>6.3}, p90 {:>6.3})  class {:>7.3} (p10 {:>6.3}, p90 {:>6.3})",
            self.batch.len(),
            m(&self.batch),
            q(&self.batch, 0.1),
            q(&self.batch, 0.9),
            m(&self.class),
            q(&self.class, 0.1),
            q(&self.class, 0.9),
        )
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [suite, names, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: feature_shift SUITE.toml TARGET[,TARGET...] [MODEL_DIR]");
    };
    let dir = Path::new(rest.first().map_or("models/camvid-day", String::as_str));
    let dev = Device::Cpu;
    let files = load_model_dir(dir, &dev)?;
    let model = Segformer::new(&files.config, files.tensors)?;
    let norm = SourceStats::load(dir, &dev)?
        .norm
        .ok_or_else(|| anyhow::anyhow!("{}: no class statistics", dir.display()))?;
    println!("source frames' spread: {:.4}", norm.spread);
    let measure = |x: &Tensor| -> anyhow::Result<(f32, f32)> {
        let (out, fused) = model.forward_fused(x)?;
        let labels = out.logits.flatten_to(2)?.argmax(1)?.to_dtype(DType::U32)?;
        let (class_mean, _) = norm.batch_stats(&fused, &labels)?;
        Ok((
            norm.frame_distance(&fused.mean_keepdim(0)?)? as f32,
            norm.frame_distance(&class_mean)? as f32,
        ))
    };
    let suite = SuiteFile::load(Path::new(suite))?;
    for name in names.split(',') {
        let target = Target::open(
            suite.target(name)?,
            suite.fps,
            None,
            (&model.cfg.class_names(), model.cfg.ignore_label()),
        )?;
        let mut src = target.source()?;
        let mut shift = Shift {
            batch: Vec::new(),
            class: Vec::new(),
        };
        while let Some(f) = src.next_frame() {
            let x = image_to_tensor(&f?.image, &files.preprocess, &dev)?;
            let (b, c) = measure(&x)?;
            shift.batch.push(b);
            shift.class.push(c);
        }
        println!("{}", shift.line(name));
    }
    Ok(())
}
