//! Traces the training budgets' shift test over a suite target without running a model: which
//! frames start a budget, which conditions are recalled, against the target's own segments.
//! It feeds every frame in order, as the runtime shows them to an adapter's shift test.
//!
//! ```sh
//! cargo run --release --example shift_trace -- benches/suites/dev.toml continual
//! ```

use segadapt::adapt::controller::{Controller, Event};
use segadapt::config::{PreprocessConfig, Profile, SegformerConfig};
use segadapt::data::image_to_tensor;
use segadapt::source::FrameSource;
use segadapt::suite::{SuiteFile, Target};
use std::path::Path;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [suite, name, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: shift_trace SUITE.toml TARGET [PROFILE.toml]");
    };
    let profile_path = rest
        .first()
        .map_or("firmware-configs/x86-64-cpu.toml", String::as_str);
    let profile = Profile::load(Path::new(profile_path))?;
    let suite = SuiteFile::load(Path::new(suite))?;
    let model = Path::new("models/camvid-day");
    let cfg = SegformerConfig::load(&model.join("config.json"))?;
    let target = Target::open(
        suite.target(name)?,
        suite.fps,
        None,
        (&cfg.class_names(), cfg.ignore_label()),
    )?;
    let pre = PreprocessConfig::load_or_default(&model.join("preprocessor_config.json"))?;
    let mut ctl = Controller::new(&profile.adapt.budget);
    let mut src = target.source()?;
    let bounds: Vec<u64> = target.schedule().at.iter().map(|(n, _)| *n).collect();
    let mut frame = 0u64;
    let mut segment = 0usize;
    while let Some(f) = src.next_frame() {
        let f = f?;
        frame += 1;
        if frame > bounds[segment] {
            segment += 1;
            println!("{frame:5} ---- segment {segment} starts");
        }
        let x = image_to_tensor(&f.image, &pre, &candle_core::Device::Cpu)?;
        let event = ctl.observe(&x)?;
        // One step per frame, as the suite replays.
        ctl.spend();
        match event {
            Event::Steady => {}
            Event::Shifted { left } => {
                if let Some(i) = left {
                    // Stand-in weights, so recalls can be traced.
                    ctl.keep(i, Default::default());
                }
                println!("{frame:5} shift (left {left:?})");
            }
            Event::Recalled(i) => println!("{frame:5} recalled condition {i}"),
        }
    }
    Ok(())
}
