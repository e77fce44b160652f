//! The `segadapt` command line: parse, call the library, print. Errors end here as one line.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Parser, Subcommand};
use segadapt::config::{PreprocessConfig, SegformerConfig};
use segadapt::data::{AugmentConfig, Dataset, LabelMap};
use segadapt::model::{init_tensors, weights, Segformer};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[global_allocator]
static ALLOC: segadapt::budget::CountingAlloc = segadapt::budget::CountingAlloc;

#[derive(Parser)]
#[command(
    name = "segadapt",
    version,
    about = "On-device SegFormer adaptation runtime"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Supervised source training; resumes from OUT/checkpoints when present.
    Train(TrainArgs),
    /// Per-class IoU, mIoU and pixel accuracy of a model on a labelled folder.
    Eval(EvalArgs),
    /// Segment a folder of frames and write class masks and colour overlays.
    Predict(PredictArgs),
    /// Time inference and a training step; print medians and peak memory.
    Bench(BenchArgs),
    /// Run a recorded drive (or any source) through the pipeline and print the summary.
    Replay(ReplayArgs),
    /// Write what a source delivers into an MCAP file (ROS 2 CompressedImage, JPEG).
    Record(RecordArgs),
    /// Serve a source while the student self-trains on it; write the adapted model.
    Adapt(AdaptArgs),
}

/// `COL=VAL` (or `COL=LO..HI`) for filtering a manifest; repeatable, all must hold.
fn parse_where(s: &str) -> Result<(String, String)> {
    let (c, v) = s.split_once('=').context("--where wants COL=VAL")?;
    Ok((c.to_string(), v.to_string()))
}

fn parse_size(s: &str) -> Result<(u32, u32)> {
    let (w, h) = s.split_once('x').context("size wants WxH, e.g. 240x180")?;
    Ok((w.parse()?, h.parse()?))
}

#[derive(clap::Args)]
struct TrainArgs {
    #[arg(long)]
    data: PathBuf,
    #[arg(long = "where", value_parser = parse_where)]
    filter: Vec<(String, String)>,
    /// b0..b5, or a HF config.json.
    #[arg(long, default_value = "b0")]
    config: String,
    #[arg(long)]
    out: PathBuf,
    /// Start from this model folder instead of random weights.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Class names in label-value order (when --config is a preset).
    #[arg(long, value_delimiter = ',')]
    classes: Option<Vec<String>>,
    /// Label value excluded from loss and metrics.
    #[arg(long, default_value_t = 255)]
    ignore: u8,
    #[arg(long, default_value_t = 4000)]
    iters: u64,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 6e-5)]
    lr: f64,
    #[arg(long, default_value_t = 10.0)]
    head_lr_mult: f64,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    #[arg(long, default_value_t = 1500)]
    warmup: u64,
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Model input / crop size WxH; images are rescaled around it by --ratio-range.
    #[arg(long, value_parser = parse_size, default_value = "512x512")]
    size: (u32, u32),
    #[arg(long, value_parser = parse_size)]
    crop: Option<(u32, u32)>,
    #[arg(long, num_args = 2, default_values_t = [0.5, 2.0])]
    ratio_range: Vec<f64>,
    /// Turn off brightness/contrast/saturation/hue distortion.
    #[arg(long)]
    no_photometric: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 250)]
    checkpoint_every: u64,
    #[arg(long, default_value_t = 3)]
    keep_checkpoints: usize,
}

#[derive(clap::Args)]
struct EvalArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    data: PathBuf,
    #[arg(long = "where", value_parser = parse_where)]
    filter: Vec<(String, String)>,
    #[arg(long)]
    label_map: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// b0..b5
    #[arg(long, default_value = "b0")]
    config: String,
    #[arg(long, value_parser = parse_size, default_value = "512x256")]
    size: (u32, u32),
    #[arg(long, default_value_t = 2)]
    batch: usize,
    #[arg(long, default_value_t = 19)]
    classes: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 5)]
    reps: usize,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct SourceArgs {
    /// folder:DIR, mcap:FILE[#TOPIC], pipe:WxH:rgb24|bgr24, v4l:/dev/videoN
    #[arg(long)]
    source: String,
    /// Manifest filter for folder sources.
    #[arg(long = "where", value_parser = parse_where)]
    filter: Vec<(String, String)>,
    /// Frame rate of sources without timestamps (folders), and the rate asked of cameras.
    #[arg(long, default_value_t = 15.0)]
    fps: f64,
    /// Camera capture size WxH (V4L2).
    #[arg(long, value_parser = parse_size)]
    camera_size: Option<(u32, u32)>,
    /// Play the source this many times end to end.
    #[arg(long, default_value_t = 1)]
    loops: u32,
}

#[derive(clap::Args)]
struct ReplayArgs {
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    src: SourceArgs,
    /// Write class masks and overlays here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Play at the recording's rate, dropping the oldest frames when inference lags.
    #[arg(long)]
    realtime: bool,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct AdaptArgs {
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    src: SourceArgs,
    #[arg(long)]
    out: PathBuf,
    /// source-only, tent, plain, ias, cpsl, region, sepico, protocl, bida, dida, full
    #[arg(long, default_value = "full")]
    method: String,
    /// Labelled folder to score on (labels are never trained on).
    #[arg(long)]
    eval_data: Option<PathBuf>,
    #[arg(long = "eval-where", value_parser = parse_where)]
    eval_filter: Vec<(String, String)>,
    /// Score every N training steps (0: only before and after).
    #[arg(long, default_value_t = 0)]
    eval_every: u64,
    /// Training steps after each served frame, on the serving thread (reproducible); without it
    /// a training thread runs beside serving.
    #[arg(long)]
    steps_per_frame: Option<u32>,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 16)]
    ring: usize,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    realtime: bool,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct RecordArgs {
    #[command(flatten)]
    src: SourceArgs,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "/camera/image/compressed")]
    topic: String,
}

#[derive(clap::Args)]
struct PredictArgs {
    #[arg(long, default_value = "models/camvid-day")]
    model: PathBuf,
    #[arg(long, default_value = "assets/dusk-clip")]
    data: PathBuf,
    #[arg(long, default_value = "runs/predict")]
    out: PathBuf,
}

fn main() {
    segadapt::budget::tune_malloc();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Train(a) => train(a),
        Cmd::Eval(a) => eval(a),
        Cmd::Predict(a) => predict(a),
        Cmd::Bench(a) => bench(a),
        Cmd::Replay(a) => replay(a),
        Cmd::Record(a) => record(a),
        Cmd::Adapt(a) => adapt(a),
    }
}

fn model_config(a: &TrainArgs) -> Result<SegformerConfig> {
    if a.config.ends_with(".json") {
        return Ok(SegformerConfig::load(a.config.as_ref())?);
    }
    let classes = a
        .classes
        .clone()
        .context("--classes is needed with a preset --config (names in label-value order)")?;
    Ok(SegformerConfig::preset(
        &a.config,
        &classes,
        a.ignore as i64,
    )?)
}

fn train(a: TrainArgs) -> Result<()> {
    let dev = Device::Cpu;
    let (cfg, init) = match &a.init {
        Some(dir) => {
            let f = weights::load_model_dir(dir, &dev)?;
            (f.config, f.tensors)
        }
        None => {
            let cfg = model_config(&a)?;
            let t = init_tensors(&cfg, &dev, a.seed)?;
            (cfg, t)
        }
    };
    if a.ratio_range.len() != 2 || a.ratio_range[0] <= 0.0 || a.ratio_range[0] > a.ratio_range[1] {
        bail!(
            "--ratio-range wants two values 0 < lo <= hi, got {:?}",
            a.ratio_range
        );
    }
    let ds = Dataset::open(&a.data, &a.filter)?;
    let examples = ds.load_all(cfg.num_labels(), a.ignore, true);
    log::info!(
        "{} training frames of {} listed",
        examples.len(),
        ds.samples.len()
    );
    let pre = PreprocessConfig::with_size(Some((a.size.0 as usize, a.size.1 as usize)));
    let tc = segadapt::train::TrainConfig {
        iters: a.iters,
        batch: a.batch,
        lr: a.lr,
        head_lr_mult: a.head_lr_mult,
        weight_decay: a.weight_decay,
        warmup: a.warmup,
        max_grad_norm: a.max_grad_norm,
        ema: 0.999,
        seed: a.seed,
        augment: AugmentConfig {
            base: a.size,
            ratio_range: (a.ratio_range[0], a.ratio_range[1]),
            crop: a.crop.unwrap_or(a.size),
            cat_max_ratio: 0.75,
            flip_prob: 0.5,
            photometric: !a.no_photometric,
        },
        checkpoint_every: a.checkpoint_every,
        keep_checkpoints: a.keep_checkpoints,
        preprocess: pre.clone(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::Relaxed))
            .context("installing the signal handler")?;
    }
    let bar = indicatif::ProgressBar::new(a.iters);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    let progress = |t: u64, s: &segadapt::train::StepStats| {
        bar.set_position(t);
        bar.set_message(format!("loss {:.3} lr {:.2e}", s.loss, s.lr));
        if t % 50 == 0 {
            let line = format!(
                "step {t} loss {:.4} lr {:.3e} {:?}",
                s.loss, s.lr, s.outcome
            );
            if bar.is_hidden() {
                log::info!("{line}");
            } else {
                bar.println(line);
            }
        }
    };
    let trainer = segadapt::train::train(&cfg, init, &examples, &tc, &a.out, &stop, &progress)?;
    bar.finish();
    if stop.load(Ordering::Relaxed) {
        return Ok(());
    }
    let stats =
        segadapt::stats::SourceStats::compute(&trainer.student.model, &pre, &examples, a.ignore)?;
    stats.save(&a.out)?;
    println!("model written to {}", a.out.display());
    Ok(())
}

fn load_model(dir: &std::path::Path, dev: &Device) -> Result<(Segformer, PreprocessConfig)> {
    let f = weights::load_model_dir(dir, dev)?;
    Ok((Segformer::new(&f.config, f.tensors)?, f.preprocess))
}

fn eval(a: EvalArgs) -> Result<()> {
    let dev = Device::Cpu;
    let (model, pre) = load_model(&a.model, &dev)?;
    let classes = model.cfg.class_names();
    let ignore = model.cfg.ignore_label();
    let map = match &a.label_map {
        Some(p) => LabelMap::load(p, &classes)?,
        None => LabelMap::identity(&classes, ignore),
    };
    let ds = Dataset::open(&a.data, &a.filter)?;
    // Label values are checked against the dataset's classes, not the model's.
    let max_ignore = map.ignore.iter().copied().max().unwrap_or(255);
    let examples = ds.load_all(map.classes.len(), max_ignore, true);
    if examples.is_empty() {
        bail!("{}: no labelled frames to score", a.data.display());
    }
    let s = segadapt::eval::evaluate(&model, &pre, &examples, &map, &dev)?;
    if a.json {
        let per_class: serde_json::Map<String, serde_json::Value> = s
            .per_class
            .iter()
            .map(|(n, v)| (n.clone(), serde_json::json!(v)))
            .collect();
        println!(
            "{}",
            serde_json::json!({"miou": s.miou, "pixel_accuracy": s.pixel_accuracy, "per_class": per_class, "frames": examples.len()})
        );
    } else {
        println!("{} frames of {}", examples.len(), a.data.display());
        for (n, v) in &s.per_class {
            match v {
                Some(v) => println!("  {n:<14} {v:6.2}"),
                None => println!("  {n:<14}    n/a"),
            }
        }
        println!("mIoU {:.2}  pixel accuracy {:.2}", s.miou, s.pixel_accuracy);
    }
    Ok(())
}

fn predict(a: PredictArgs) -> Result<()> {
    let dev = Device::Cpu;
    let (model, pre) = load_model(&a.model, &dev)?;
    let ds = Dataset::open(&a.data, &[])?;
    let classes = model.cfg.class_names();
    let ignore = model.cfg.ignore_label();
    let examples = ds.load_all(classes.len(), ignore, false);
    let mut conf = segadapt::metrics::Confusion::new(classes.len());
    let mut labelled = 0;
    for ex in &examples {
        let pred = segadapt::eval::predict_image(&model, &pre, &ex.image, &dev)?;
        segadapt::report::write_outputs(&a.out, &ex.name, &ex.image, &pred, classes.len())?;
        if let Some(l) = &ex.label {
            conf.add(&pred, l, &[ignore]);
            labelled += 1;
        }
    }
    println!(
        "{} frames segmented; masks and overlays in {}",
        examples.len(),
        a.out.display()
    );
    if labelled > 0 {
        println!(
            "mIoU on {labelled} labelled frames: {:.2}",
            conf.scores(&classes).miou
        );
    }
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    let spec = segadapt::bench::BenchSpec {
        config: a.config,
        width: a.size.0 as usize,
        height: a.size.1 as usize,
        batch: a.batch,
        classes: a.classes,
        warmup: a.warmup,
        reps: a.reps,
    };
    let r = segadapt::bench::run(&spec)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "config": r.config, "size": r.size, "batch": r.batch, "threads": r.threads,
                "infer_ms": r.infer.median_ms, "train_step_ms": r.train_step.median_ms, "adapt_step_ms": r.adapt_step.median_ms, "ema_ms": r.ema.median_ms,
                "infer_peak_mb": r.infer.peak_mb, "train_peak_mb": r.train_step.peak_mb,
                "peak_mb": r.infer.peak_mb.max(r.train_step.peak_mb),
                "infer_peak_rss_mb": r.infer_peak_rss_mb, "train_peak_rss_mb": r.train_peak_rss_mb,
            })
        );
    } else {
        println!(
            "{} {} batch {} ({} threads), median of {} after {} warm-up",
            r.config, r.size, r.batch, r.threads, spec.reps, spec.warmup
        );
        println!(
            "{:<28} {:>10} {:>10} {:>10} {:>10}",
            "", "median ms", "min", "max", "peak MB"
        );
        for (name, t) in [
            ("inference (batch 1)", &r.infer),
            ("train step (fwd+CE+bwd+AdamW+EMA)", &r.train_step),
            ("adaptation step (full)", &r.adapt_step),
            ("EMA update", &r.ema),
        ] {
            println!(
                "{name:<28} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
                t.median_ms, t.min_ms, t.max_ms, t.peak_mb
            );
        }
    }
    Ok(())
}

fn stop_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    ctrlc::set_handler(move || s.store(true, Ordering::Relaxed))
        .context("installing the signal handler")?;
    Ok(stop)
}

fn open_source(
    a: &SourceArgs,
    classes: usize,
    ignore: u8,
) -> Result<Box<dyn segadapt::source::FrameSource>> {
    let opts = segadapt::source::SourceOptions {
        filter: a.filter.clone(),
        fps: a.fps,
        num_classes: classes,
        ignore,
        camera_size: a.camera_size,
    };
    if a.loops > 1 {
        return Ok(Box::new(segadapt::source::Looped::open(
            &a.source, &opts, a.loops,
        )?));
    }
    Ok(segadapt::source::open(&a.source, &opts)?)
}

fn replay(a: ReplayArgs) -> Result<()> {
    let dev = Device::Cpu;
    let (model, pre) = load_model(&a.model, &dev)?;
    let classes = model.cfg.class_names();
    let ignore = model.cfg.ignore_label();
    let source = open_source(&a.src, classes.len(), ignore)?;
    let cfg = segadapt::runtime::PipelineConfig {
        realtime: a.realtime,
        queue: 2,
    };
    let mut conf = segadapt::metrics::Confusion::new(classes.len());
    let mut labelled = 0u64;
    let mut summary = segadapt::runtime::run(source, &cfg, stop_flag()?, |item| -> Result<()> {
        let f = &item.frame;
        let pred = segadapt::eval::predict_image(&model, &pre, &f.image, &dev)?;
        if let Some(l) = &f.label {
            conf.add(&pred, l, &[ignore]);
            labelled += 1;
        }
        if let Some(out) = &a.out {
            segadapt::report::write_outputs(out, &f.name, &f.image, &pred, classes.len())?;
        }
        Ok(())
    })?;
    if labelled > 0 {
        summary.miou = Some(conf.scores(&classes).miou);
    }
    for d in &summary.damage {
        eprintln!("damage: {}: {d}", a.src.source);
    }
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "frames in {}, served {}, dropped {}, bad {}; latency p50 {:.1} ms, p99 {:.1} ms; {:.1} s",
            summary.frames_in,
            summary.frames_served,
            summary.frames_dropped,
            summary.frame_errors,
            summary.latency_ms_p50,
            summary.latency_ms_p99,
            summary.wall_s
        );
        if let Some(m) = summary.miou {
            println!("mIoU on {labelled} labelled frames: {m:.2}");
        }
    }
    Ok(())
}

fn record(a: RecordArgs) -> Result<()> {
    let mut source = open_source(&a.src, 0, 255)?;
    let mut rec = segadapt::source::McapRecorder::create(&a.out, &a.topic)?;
    let stop = stop_flag()?;
    let mut bad = 0;
    while !stop.load(Ordering::Relaxed) {
        match source.next_frame() {
            None => break,
            Some(Ok(f)) => rec.write(&f)?,
            Some(Err(e)) => {
                eprintln!("error: {e}");
                bad += 1;
                if matches!(e, segadapt::source::SourceError::Fatal { .. }) {
                    break;
                }
            }
        }
    }
    let n = rec.finish()?;
    println!("{n} frames written to {} ({bad} skipped)", a.out.display());
    Ok(())
}

fn adapt(a: AdaptArgs) -> Result<()> {
    let dev = Device::Cpu;
    let files = weights::load_model_dir(&a.model, &dev)?;
    let stats = segadapt::stats::SourceStats::load(&a.model, &dev)?;
    let classes = files.config.class_names();
    let ignore = files.config.ignore_label();
    let eval_set = match &a.eval_data {
        Some(d) => {
            let ds = Dataset::open(d, &a.eval_filter)?;
            Some(ds.load_all(classes.len(), ignore, true))
        }
        None => None,
    };
    let map = LabelMap::identity(&classes, ignore);
    let score = |m: &Segformer| -> Result<Option<f64>> {
        Ok(match &eval_set {
            Some(ex) => Some(segadapt::eval::evaluate(m, &files.preprocess, ex, &map, &dev)?.miou),
            None => None,
        })
    };
    let source_model = Segformer::new(&files.config, files.tensors.clone())?;
    let before = score(&source_model)?;
    drop(source_model);
    let source_only = a.method == "source-only";
    let mut cfg = segadapt::adapt::step::preset(if source_only { "plain" } else { &a.method })
        .with_context(|| format!("--method {}: unknown (source-only, tent, plain, ias, cpsl, region, sepico, protocl, bida, dida, full)", a.method))?;
    if let Some(lr) = a.lr {
        cfg.lr = lr;
    }
    // A restarted run continues from the adaptation state it saved.
    let ckpts = segadapt::checkpoint::CheckpointDir::new(a.out.join("checkpoints"), 3);
    let adapter = match ckpts.latest(&dev) {
        Some(ck) => {
            log::info!(
                "resuming adaptation from {} (step {})",
                ck.path.display(),
                ck.step
            );
            segadapt::adapt::step::Adapter::restore(cfg, &files.config, stats, &ck.tensors)?
        }
        None => segadapt::adapt::step::Adapter::new(cfg, &files.config, &files.tensors, stats)?,
    };
    let source = open_source(&a.src, classes.len(), ignore)?;
    let online = segadapt::runtime::online::OnlineConfig {
        pipeline: segadapt::runtime::PipelineConfig {
            realtime: a.realtime,
            queue: 2,
        },
        batch: a.batch,
        ring: a.ring,
        steps_per_frame: if source_only {
            Some(0)
        } else {
            a.steps_per_frame
        },
        seed: a.seed,
    };
    let curve = std::sync::Mutex::new(Vec::new());
    let eval_every = a.eval_every;
    let (summary, adapter) = segadapt::runtime::online::run_online(
        source,
        adapter,
        &files.preprocess,
        &online,
        stop_flag()?,
        |item, model| {
            segadapt::eval::predict_image(model, &files.preprocess, &item.frame.image, &dev)?;
            Ok(())
        },
        |step, model| {
            if eval_every > 0 && step % eval_every == 0 {
                if let Ok(Some(m)) = score(model) {
                    log::info!("step {step}: mIoU {m:.2}");
                    curve.lock().expect("curve").push((step, m));
                }
            }
            Ok(())
        },
    )?;
    let after = score(&adapter.teacher)?;
    let meta = std::collections::HashMap::from([("method".to_string(), a.method.clone())]);
    ckpts.save(adapter.step, &adapter.state()?, meta)?;
    weights::save_model_dir(
        &a.out,
        &weights::ModelFiles {
            config: files.config.clone(),
            preprocess: files.preprocess.clone(),
            tensors: adapter.teacher.tensors()?,
        },
    )?;
    adapter.stats.save(&a.out)?;
    let curve = curve.into_inner().expect("curve");
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "method": a.method, "summary": summary, "miou_source_only": before,
                "miou_adapted": after, "curve": curve,
            })
        );
    } else {
        println!(
            "{}: frames {} served {} dropped {}, {} training steps; latency p50 {:.1} ms p99 {:.1} ms",
            a.method, summary.frames_in, summary.frames_served, summary.frames_dropped, summary.train_steps,
            summary.latency_ms_p50, summary.latency_ms_p99
        );
        if let (Some(b), Some(c)) = (before, after) {
            println!("mIoU source-only {b:.2} -> adapted {c:.2}");
        }
        println!("adapted model written to {}", a.out.display());
    }
    Ok(())
}
