//! The `segadapt` command line: parse, call the library, print. Errors end here as one line.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Parser, Subcommand};
use segadapt::adapt::Method;
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
    /// No progress bars (they are also off when stderr is not a terminal).
    #[arg(long, global = true)]
    quiet: bool,
}

/// A progress bar on stderr, hidden with `--quiet`; `len` None counts without an end.
fn progress_bar(len: Option<u64>, quiet: bool) -> indicatif::ProgressBar {
    let (bar, template) = match len {
        Some(n) => (
            indicatif::ProgressBar::new(n),
            "{bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        ),
        None => (
            indicatif::ProgressBar::new_spinner(),
            "{spinner} {pos} frames [{elapsed_precise}] {msg}",
        ),
    };
    if quiet {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(indicatif::ProgressStyle::with_template(template).expect("valid template"));
    bar
}

#[derive(Subcommand)]
enum Cmd {
    /// Supervised source training; resumes from OUT/checkpoints when present.
    Train(TrainArgs),
    /// Per-class IoU, mIoU and pixel accuracy of a model on a labelled folder.
    Eval(EvalArgs),
    /// The demo: adapt the committed day model on the bundled dusk clip; print source-only
    /// against adapted mIoU and write overlays of both.
    Demo(DemoArgs),
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
    /// Adapt with each method over several seeds on a labelled target stream; print the table.
    Ablate(AblateArgs),
    /// Print a profile's memory plan (each part's bytes, measured); non-zero when it does not fit.
    Inspect(InspectArgs),
    /// Methods x seeds x targets from a suite file (benches/suites/dev.toml): one table of
    /// scores, gains and margins over the baselines; writes OUT/suite.md and OUT/suite.json.
    Suite(SuiteArgs),
    /// Compute a model's source statistics (class statistics, prior, prototypes and DIDA's
    /// instance bank) from frames of its source domain: labelled, or labelled by the model's
    /// confident predictions where a frame has no label.
    Stats(StatsArgs),
}

#[derive(clap::Args)]
struct SuiteArgs {
    /// The suite file.
    suite: PathBuf,
    #[arg(long, default_value = "models/camvid-day")]
    model: PathBuf,
    #[command(flatten)]
    profile: ProfileArgs,
    /// Override the file's methods.
    #[arg(long, value_delimiter = ',')]
    methods: Option<Vec<Method>>,
    /// Override the file's seeds.
    #[arg(long, value_delimiter = ',')]
    seeds: Option<Vec<u64>>,
    /// Only these targets (by name).
    #[arg(long, value_delimiter = ',')]
    targets: Option<Vec<String>>,
    /// Smoke form: the first `--quick-frames` frames of each condition, one seed unless given.
    #[arg(long)]
    quick: bool,
    #[arg(long, default_value_t = 10)]
    quick_frames: usize,
    /// Labelled source frames for methods with source replay (e.g. ../shared/data/camvid).
    #[arg(long)]
    replay: Option<PathBuf>,
    #[arg(long = "replay-where", value_parser = parse_where, default_value = "role=source-train")]
    replay_filter: Vec<(String, String)>,
    #[arg(long, default_value = "runs/suite")]
    out: PathBuf,
    /// Run nothing: join earlier runs' suite.json files (e.g. methods run in separate
    /// processes) into one table in OUT.
    #[arg(long, value_delimiter = ',')]
    join: Vec<PathBuf>,
}

#[derive(clap::Args)]
struct StatsArgs {
    #[arg(long)]
    model: PathBuf,
    /// A folder of source-domain frames (labels optional; the folder or Cityscapes layout).
    #[arg(long, required_unless_present = "source", conflicts_with = "source")]
    data: Option<PathBuf>,
    /// Any frame source recorded in the source domain (mcap:FILE, folder:DIR, ...).
    #[arg(long)]
    source: Option<String>,
    #[arg(long = "where", value_parser = parse_where)]
    filter: Vec<(String, String)>,
    /// With --source: at most this many frames.
    #[arg(long, default_value_t = 1000)]
    max_frames: usize,
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
    /// Profile the training step: time per phase, model part and kernel.
    #[arg(long)]
    ops: bool,
    /// Time the adaptation steps with this profile's `[adapt]` settings (its components and
    /// training scope) instead of every component on: a built-in one by name (`segadapt
    /// inspect --list`) or a TOML file.
    #[arg(long)]
    profile: Option<String>,
    /// cpu or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
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
    #[command(flatten)]
    metrics: MetricsArgs,
}

#[derive(clap::Args)]
struct MetricsArgs {
    /// Rewrite live figures here in Prometheus' text format every few seconds (atomically; for
    /// node_exporter's textfile collector).
    #[arg(long = "metrics")]
    metrics_file: Option<PathBuf>,
    /// Serve the same figures on http://127.0.0.1:PORT/metrics.
    #[arg(long)]
    metrics_port: Option<u16>,
}

impl MetricsArgs {
    /// The shared figures and their exporter, when asked for.
    fn start(
        &self,
    ) -> Result<(
        Option<Arc<segadapt::runtime::metrics::Metrics>>,
        Option<segadapt::runtime::metrics::Exporter>,
    )> {
        if self.metrics_file.is_none() && self.metrics_port.is_none() {
            return Ok((None, None));
        }
        let m = Arc::new(segadapt::runtime::metrics::Metrics::default());
        let export = segadapt::runtime::metrics::Export {
            file: self.metrics_file.clone(),
            port: self.metrics_port,
            every: std::time::Duration::from_secs(5),
        };
        let e = segadapt::runtime::metrics::Exporter::start(m.clone(), &export)
            .with_context(|| "starting the metrics export")?;
        Ok((Some(m), Some(e)))
    }
}

#[derive(clap::Args)]
struct AdaptArgs {
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    src: SourceArgs,
    #[command(flatten)]
    profile: ProfileArgs,
    #[arg(long)]
    out: PathBuf,
    /// source-only, or: profile (its own switches), tent, plain, ias, hpla, cpsl, region,
    /// sepico, protocl, bida, dida, replay, full (replay needs --replay)
    #[arg(long, default_value = "profile")]
    method: Method,
    /// Labelled folder to score on (labels are never trained on).
    #[arg(long)]
    eval_data: Option<PathBuf>,
    #[arg(long = "eval-where", value_parser = parse_where)]
    eval_filter: Vec<(String, String)>,
    /// Labelled source frames for source replay (`adapt.replay` in the profile).
    #[arg(long)]
    replay: Option<PathBuf>,
    #[arg(long = "replay-where", value_parser = parse_where)]
    replay_filter: Vec<(String, String)>,
    /// Score every N training steps (`N` or `Nsteps`) or every N served frames (`Nframes`);
    /// 0: only before and after.
    #[arg(long, default_value = "0")]
    eval_every: segadapt::runtime::session::Every,
    /// Training steps after each served frame, on the serving thread (reproducible); without it
    /// the profile's cadence holds. In real time training stays off the serving thread.
    #[arg(long, conflicts_with = "realtime")]
    steps_per_frame: Option<u32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    realtime: bool,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    metrics: MetricsArgs,
}

#[derive(clap::Args)]
struct ProfileArgs {
    /// Device profile: a built-in one by name (`segadapt inspect --list`) or a TOML file
    /// [default: x86-64-cpu, served at the model's own size]
    #[arg(long)]
    profile: Option<String>,
    /// Serve and train at this size (WxH) instead of the profile's or the model's.
    #[arg(long, value_parser = parse_size)]
    input: Option<(u32, u32)>,
    /// Run the profile on another device than it names (e.g. a Jetson profile's plan on cpu).
    #[arg(long)]
    device: Option<String>,
}

impl ProfileArgs {
    /// The profile for running `model`, at the size `--input`, a named profile or the model's
    /// `preprocessor_config.json` gives (in that order), said on one line.
    fn load_for(&self, model: &std::path::Path) -> Result<segadapt::config::Profile> {
        use segadapt::config::SizeFrom;
        let mut p = self.load()?;
        let pre = PreprocessConfig::load_or_default(&model.join("preprocessor_config.json"))?;
        let flag = self.input.map(|(w, h)| (w as usize, h as usize));
        let (from, warning) = p.fit_input(flag, self.profile.is_some(), pre.size)?;
        let from = match from {
            SizeFrom::Flag => "--input".to_string(),
            SizeFrom::Profile | SizeFrom::Default => format!("profile {}", p.device.name),
            SizeFrom::Model => format!("{}/preprocessor_config.json", model.display()),
        };
        log::info!(
            "serving at {}x{} (from {from}), training on {}x{} crops",
            p.input.width,
            p.input.height,
            p.train.crop_width,
            p.train.crop_height
        );
        if let Some(w) = warning {
            log::warn!("{w}");
        }
        Ok(p)
    }

    fn load(&self) -> Result<segadapt::config::Profile> {
        let name = self.profile.as_deref().unwrap_or("x86-64-cpu");
        let mut p = segadapt::config::Profile::resolve(name)?;
        if let Some(d) = &self.device {
            p.device.device = d.clone();
            if d == "cpu" {
                p.device.dtype = segadapt::config::Precision::F32;
            }
            p.validate()?;
        }
        if p.device.threads > 0 {
            // Before candle's first parallel op builds its pool.
            if rayon::ThreadPoolBuilder::new()
                .num_threads(p.device.threads)
                .build_global()
                .is_err()
            {
                log::warn!("device.threads: the thread pool already runs; keeping it");
            }
        }
        Ok(p)
    }
}

#[derive(clap::Args)]
struct AblateArgs {
    #[arg(long, default_value = "models/camvid-day")]
    model: PathBuf,
    #[command(flatten)]
    profile: ProfileArgs,
    /// Labelled folder: the target frames are streamed, and their labels only score (e.g.
    /// ../shared/data/camvid with --where role=target).
    #[arg(long)]
    data: PathBuf,
    #[arg(long = "where", value_parser = parse_where, default_value = "role=target")]
    filter: Vec<(String, String)>,
    /// Labelled source frames for the rows with source replay (replay; profile when its
    /// adapt.replay.on is set), e.g. ../shared/data/camvid.
    #[arg(long)]
    replay: Option<PathBuf>,
    #[arg(long = "replay-where", value_parser = parse_where, default_value = "role=source-train")]
    replay_filter: Vec<(String, String)>,
    #[arg(long, default_value_t = 1.0)]
    fps: f64,
    /// Passes over the stream.
    #[arg(long, default_value_t = 2)]
    loops: u32,
    /// Training steps after each frame.
    #[arg(long, default_value_t = 1)]
    steps_per_frame: u32,
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    seeds: Vec<u64>,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "source-only,tent,plain,ias,hpla,cpsl,region,sepico,protocl,bida,dida,replay,full"
    )]
    methods: Vec<Method>,
    #[arg(long, default_value = "runs/ablation")]
    out: PathBuf,
}

#[derive(clap::Args)]
struct InspectArgs {
    #[command(flatten)]
    profile: ProfileArgs,
    #[arg(long, default_value = "models/camvid-day")]
    model: PathBuf,
    #[arg(long, default_value = "profile")]
    method: Method,
    #[arg(long)]
    json: bool,
    /// List the built-in profiles and exit.
    #[arg(long)]
    list: bool,
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
struct DemoArgs {
    #[arg(long, default_value = "models/camvid-day")]
    model: PathBuf,
    /// Labelled frames: streamed to adapt on, their labels only score.
    #[arg(long, default_value = "assets/dusk-clip")]
    data: PathBuf,
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Passes over the clip.
    #[arg(long, default_value_t = 3)]
    loops: u32,
    #[command(flatten)]
    profile: ProfileArgs,
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
    let quiet = cli.quiet;
    match cli.cmd {
        Cmd::Train(a) => train(a, quiet),
        Cmd::Eval(a) => eval(a, quiet),
        Cmd::Demo(a) => demo(a),
        Cmd::Predict(a) => predict(a),
        Cmd::Bench(a) => bench(a),
        Cmd::Replay(a) => replay(a, quiet),
        Cmd::Record(a) => record(a),
        Cmd::Adapt(a) => adapt(a),
        Cmd::Inspect(a) => inspect(a),
        Cmd::Ablate(a) => ablate(a, quiet),
        Cmd::Stats(a) => stats(a),
        Cmd::Suite(a) => suite(a, quiet),
    }
}

fn suite(a: SuiteArgs, quiet: bool) -> Result<()> {
    use segadapt::suite::{run_target, Runner, SuiteFile, Target};
    if !a.join.is_empty() {
        let parts = a
            .join
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(p).with_context(|| p.display().to_string())?;
                serde_json::from_str(&text).with_context(|| p.display().to_string())
            })
            .collect::<Result<Vec<_>>>()?;
        return write_suite(&a.out, &segadapt::suite::join(parts));
    }
    let file = SuiteFile::load(&a.suite)?;
    let profile = a.profile.load_for(&a.model)?;
    let methods: Vec<Method> = match a.methods {
        Some(m) => m,
        None => file
            .methods
            .iter()
            .map(|m| m.parse())
            .collect::<Result<_, String>>()
            .map_err(anyhow::Error::msg)?,
    };
    let seeds = match (a.seeds, a.quick) {
        (Some(s), _) => s,
        (None, true) => file.seeds[..1].to_vec(),
        (None, false) => file.seeds.clone(),
    };
    let specs: Vec<_> = file
        .targets
        .iter()
        .filter(|t| a.targets.as_ref().is_none_or(|only| only.contains(&t.name)))
        .collect();
    if specs.is_empty() {
        bail!("{}: no target left after --targets", a.suite.display());
    }
    let cfg = SegformerConfig::load(&a.model.join("config.json"))?;
    let limit = a.quick.then_some(a.quick_frames);
    let replay_on = methods
        .iter()
        .any(|&m| m == Method::Replay || (m == Method::Profile && profile.adapt.replay.on));
    let runner = Runner {
        model: a.model.clone(),
        replay: match replay_on {
            true => {
                if a.replay.is_none() {
                    bail!("source replay needs labelled source frames: --replay DIR [--replay-where COL=VAL]");
                }
                load_replay(&a.replay, &a.replay_filter, &a.model, &profile)?
            }
            false => None,
        },
        profile,
        steps_per_frame: 1,
        out: a.out.clone(),
        stop: stop_flag()?,
    };
    let trained = methods.iter().filter(|&&m| m != Method::SourceOnly).count();
    let bar = progress_bar(Some((specs.len() * trained * seeds.len()) as u64), quiet);
    let mut results = Vec::new();
    for spec in specs {
        let target = Target::open(
            spec,
            file.fps,
            limit,
            (&cfg.class_names(), cfg.ignore_label()),
        )?;
        let mut progress = |line: &str| {
            bar.inc(1);
            bar.set_message(line.to_string());
            if bar.is_hidden() {
                log::info!("{line}");
            }
        };
        results.push(run_target(
            &runner,
            &target,
            &methods,
            &seeds,
            &mut progress,
        )?);
        // Each finished target is on disk: a suite stopped part way keeps its tables.
        write_tables(&a.out, &results)?;
    }
    bar.finish_and_clear();
    write_suite(&a.out, &results)
}

/// OUT/suite.md and OUT/suite.json; the table.
fn write_tables(
    out: &std::path::Path,
    results: &[segadapt::suite::TargetResult],
) -> Result<String> {
    let table = segadapt::suite::markdown(results);
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("suite.md"), &table)?;
    std::fs::write(
        out.join("suite.json"),
        serde_json::to_string_pretty(results)?,
    )?;
    Ok(table)
}

fn write_suite(out: &std::path::Path, results: &[segadapt::suite::TargetResult]) -> Result<()> {
    let table = write_tables(out, results)?;
    print!("{table}");
    let runs = segadapt::report::tables::run_folders(out);
    let page = out.join("report.html");
    segadapt::report::tables::suite_page(results, &runs)?.write(&page)?;
    eprintln!("report: {}", page.display());
    Ok(())
}

fn stats(a: StatsArgs) -> Result<()> {
    let dev = Device::Cpu;
    let (model, pre) = load_model(&a.model, &dev)?;
    let ignore = model.cfg.ignore_label();
    let (examples, from) = match (&a.data, &a.source) {
        (Some(d), _) => {
            let ex =
                Dataset::open(d, &a.filter)?.load_for(&model.cfg.class_names(), ignore, false)?;
            (ex, d.display().to_string())
        }
        (None, Some(spec)) => (source_frames(spec, &a, &model, &pre)?, spec.clone()),
        (None, None) => bail!("--data DIR or --source SPEC"),
    };
    if examples.is_empty() {
        bail!("{from}: no frames to compute statistics from");
    }
    let stats = segadapt::stats::SourceStats::compute(&model, &pre, &examples, ignore)?;
    stats.save(&a.model)?;
    let labelled = examples.iter().filter(|e| e.label.is_some()).count();
    let bank = stats.bank.as_ref().map_or(0, |b| b.labels.len());
    println!(
        "{}: statistics of {} frames of {from} ({labelled} labelled, {} by the model's confident \
         predictions; origin {}), {bank} instances, written to {}",
        a.model.display(),
        examples.len(),
        examples.len() - labelled,
        stats.origin.name(),
        a.model.join(segadapt::stats::FILE).display()
    );
    Ok(())
}

/// Up to `--max-frames` frames of `spec`; unlabelled ones shrunk to the model's input size as
/// they arrive, so a long recording at camera size fits in memory.
fn source_frames(
    spec: &str,
    a: &StatsArgs,
    model: &Segformer,
    pre: &PreprocessConfig,
) -> Result<Vec<segadapt::data::Example>> {
    let opts = segadapt::source::SourceOptions {
        filter: a.filter.clone(),
        fps: 15.0,
        num_classes: model.cfg.num_labels(),
        ignore: model.cfg.ignore_label(),
        camera_size: None,
        limit: None,
    };
    let mut source = segadapt::source::open(spec, &opts)?;
    let mut out = Vec::new();
    while out.len() < a.max_frames {
        let frame = match source.next_frame() {
            None => break,
            Some(Ok(f)) => f,
            Some(Err(e @ segadapt::source::SourceError::Fatal { .. })) => return Err(e.into()),
            Some(Err(e)) => {
                log::error!("{e}");
                continue;
            }
        };
        let image = match &frame.label {
            Some(_) => frame.image,
            None => {
                let (w, h) =
                    pre.input_size(frame.image.width() as usize, frame.image.height() as usize);
                segadapt::data::resize_rgb(&frame.image, w as u32, h as u32)
            }
        };
        out.push(segadapt::data::Example {
            name: frame.name,
            image,
            label: frame.label,
        });
    }
    Ok(out)
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

fn train(a: TrainArgs, quiet: bool) -> Result<()> {
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
    let examples = ds.load_for(&cfg.class_names(), a.ignore, true)?;
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
    let bar = progress_bar(Some(a.iters), quiet);
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

fn eval(a: EvalArgs, quiet: bool) -> Result<()> {
    let dev = Device::Cpu;
    let (model, pre) = load_model(&a.model, &dev)?;
    let classes = model.cfg.class_names();
    let ignore = model.cfg.ignore_label();
    let ds = Dataset::open(&a.data, &a.filter)?;
    let map = LabelMap::for_dataset(a.label_map.as_deref(), &ds, &classes, ignore)?;
    // Label values are checked against the dataset's classes, not the model's.
    let max_ignore = map.ignore.iter().copied().max().unwrap_or(255);
    let examples = ds.load_all(map.classes.len(), max_ignore, true);
    if examples.is_empty() {
        bail!("{}: no labelled frames to score", a.data.display());
    }
    let bar = progress_bar(Some(examples.len() as u64), quiet);
    let s = segadapt::eval::evaluate_with(&model, &pre, &examples, &map, &dev, &mut || bar.inc(1))?;
    bar.finish_and_clear();
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
    let (n, miou) = segment_folder(&a.model, &a.data, &a.out)?;
    println!(
        "{n} frames segmented; masks and overlays in {}",
        a.out.display()
    );
    if let Some((labelled, m)) = miou {
        println!("mIoU on {labelled} labelled frames: {m:.2}");
    }
    Ok(())
}

/// Masks and overlays of every frame of `data` into `out`; the frame count and, where labels
/// exist, (labelled frames, mIoU).
fn segment_folder(
    model_dir: &std::path::Path,
    data: &std::path::Path,
    out: &std::path::Path,
) -> Result<(usize, Option<(usize, f64)>)> {
    let dev = Device::Cpu;
    let (model, pre) = load_model(model_dir, &dev)?;
    let classes = model.cfg.class_names();
    let ignore = model.cfg.ignore_label();
    let examples = Dataset::open(data, &[])?.load_all(classes.len(), ignore, false);
    let mut conf = segadapt::metrics::Confusion::new(classes.len());
    let mut labelled = 0;
    for ex in &examples {
        let pred = segadapt::eval::predict_image(&model, &pre, &ex.image, &dev)?;
        segadapt::report::write_outputs(out, &ex.name, &ex.image, &pred, classes.len())?;
        if let Some(l) = &ex.label {
            conf.add(&pred, l, &[ignore]);
            labelled += 1;
        }
    }
    let miou = (labelled > 0).then(|| (labelled, conf.scores(&classes).miou));
    Ok((examples.len(), miou))
}

fn demo(a: DemoArgs) -> Result<()> {
    let model_out = a.out.join("adapted-model");
    // The demo always starts from the committed source model.
    if model_out.exists() {
        std::fs::remove_dir_all(&model_out)?;
    }
    let cfg = SegformerConfig::load(&a.model.join("config.json"))?;
    let eval = load_eval(&Some(a.data.clone()), &[], &a.model)?.map(Arc::new);
    let session = segadapt::runtime::session::Session {
        model: a.model.clone(),
        profile: a.profile.load_for(&a.model)?,
        method: Method::Profile,
        out: model_out.clone(),
        eval,
        eval_every: Default::default(),
        steps_per_frame: Some(1),
        seed: 0,
        realtime: false,
        adapt: None,
        replay: None,
        before: None,
        schedule: Default::default(),
        metrics: None,
    };
    let opts = segadapt::source::SourceOptions {
        fps: 1.0,
        num_classes: cfg.num_labels(),
        ignore: cfg.ignore_label(),
        ..Default::default()
    };
    let spec = format!("folder:{}", a.data.display());
    let source = segadapt::source::Looped::open(&spec, &opts, a.loops)?;
    let r = session.run(Box::new(source), stop_flag()?)?;
    segment_folder(&a.model, &a.data, &a.out.join("source-only"))?;
    segment_folder(&model_out, &a.data, &a.out.join("adapted"))?;
    println!(
        "{} dusk frames served {} times, {} adaptation steps (median {:.0} ms), heap peak {:.0} MB",
        r.summary.frames_in / a.loops.max(1) as u64,
        a.loops,
        r.summary.train_steps,
        r.summary.step_ms_p50,
        r.peak_heap_mb
    );
    if let (Some(b), Some(c)) = (&r.source_only, &r.adapted) {
        println!("IoU per class, source-only -> adapted:");
        for ((name, x), (_, y)) in b.per_class.iter().zip(&c.per_class) {
            match (x, y) {
                (Some(x), Some(y)) => println!("  {name:<12} {x:6.2} -> {y:6.2} ({:+.2})", y - x),
                _ => println!("  {name:<12}    n/a"),
            }
        }
        println!(
            "mIoU on the clip: source-only {:.2} -> adapted {:.2} ({:+.2})",
            b.miou,
            c.miou,
            c.miou - b.miou
        );
    }
    println!(
        "overlays in {0}/source-only and {0}/adapted; the adapted model in {1}",
        a.out.display(),
        model_out.display()
    );
    if let Some(p) = &r.page {
        let to = a.out.join("report.html");
        std::fs::rename(p, &to)?;
        println!("report: {}", to.display());
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
        ops: a.ops,
        adapt: match &a.profile {
            Some(p) => Some(segadapt::config::Profile::resolve(p)?.adapt),
            None => None,
        },
        device: segadapt::config::open_device("--device", &a.device)?,
    };
    let r = segadapt::bench::run(&spec)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "config": r.config, "size": r.size, "batch": r.batch, "threads": r.threads,
                "infer_ms": r.infer.median_ms, "train_step_ms": r.train_step.median_ms, "adapt_step_ms": r.adapt_step.median_ms, "adapt_step_norm_ms": r.adapt_step_norm.median_ms,
                "adapt_step_recompute_ms": r.adapt_step_recompute.median_ms, "adapt_recompute_peak_mb": r.adapt_step_recompute.peak_mb,
                "adapt_peak_mb": r.adapt_step.peak_mb, "adapt_norm_peak_mb": r.adapt_step_norm.peak_mb, "ema_ms": r.ema.median_ms,
                "handover_ms": r.handover.median_ms, "handover_statistics_ms": r.handover_statistics.median_ms,
                "track_ms": r.track.median_ms, "track_by_class_ms": r.track_by_class.median_ms,
                "track_anchored_ms": r.track_anchored.median_ms,
                "infer_peak_mb": r.infer.peak_mb, "train_peak_mb": r.train_step.peak_mb,
                "peak_mb": r.infer.peak_mb.max(r.train_step.peak_mb),
                "infer_peak_rss_mb": r.infer_peak_rss_mb, "train_peak_rss_mb": r.train_peak_rss_mb,
                "ops": r.ops, "adapt_ops": r.adapt_ops,
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
            ("adaptation step (full, norms train)", &r.adapt_step_norm),
            (
                "adaptation step (full, blocks recomputed)",
                &r.adapt_step_recompute,
            ),
            ("EMA update", &r.ema),
            ("serving handover (weights)", &r.handover),
            ("serving handover (statistics)", &r.handover_statistics),
            ("teacher forward, tracking", &r.track),
            ("teacher forward, tracking by class", &r.track_by_class),
            ("teacher forward, anchored", &r.track_anchored),
        ] {
            println!(
                "{name:<28} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
                t.median_ms, t.min_ms, t.max_ms, t.peak_mb
            );
        }
        for (what, ops) in [
            ("training", &r.ops),
            ("adaptation (all weights)", &r.adapt_ops),
        ] {
            if ops.is_empty() {
                continue;
            }
            println!("\n{what} step profile (per step; phases hold the model parts and kernels run in them)");
            println!("{:<28} {:>10} {:>8}", "", "ms", "calls");
            for o in ops {
                println!(
                    "{:<28} {:>10.1} {:>8.0}",
                    o.name, o.ms_per_step, o.calls_per_step
                );
            }
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
        limit: None,
    };
    if a.loops > 1 {
        return Ok(Box::new(segadapt::source::Looped::open(
            &a.source, &opts, a.loops,
        )?));
    }
    Ok(segadapt::source::open(&a.source, &opts)?)
}

fn replay(a: ReplayArgs, quiet: bool) -> Result<()> {
    let dev = Device::Cpu;
    let (model, pre) = load_model(&a.model, &dev)?;
    let classes = model.cfg.class_names();
    let ignore = model.cfg.ignore_label();
    let source = open_source(&a.src, classes.len(), ignore)?;
    let (metrics, _exporter) = a.metrics.start()?;
    let cfg = segadapt::runtime::PipelineConfig {
        realtime: a.realtime,
        queue: 2,
        metrics,
    };
    let mut conf = segadapt::metrics::Confusion::new(classes.len());
    let mut labelled = 0u64;
    let mut trace = segadapt::report::trace::RunTrace::default();
    let mut served = 0u64;
    // Offline only: in real time nothing is to wait for.
    let bar = progress_bar(None, quiet || a.realtime);
    let mut summary = segadapt::runtime::run(source, &cfg, stop_flag()?, |item| -> Result<()> {
        let f = &item.frame;
        let pred = segadapt::eval::predict_image(&model, &pre, &f.image, &dev)?;
        served += 1;
        let ms = item.at.elapsed().as_secs_f64() * 1e3;
        trace.served(served, ms, f, &pred, classes.len());
        bar.inc(1);
        if let Some(l) = &f.label {
            conf.add(&pred, l, &[ignore]);
            labelled += 1;
        }
        if let Some(out) = &a.out {
            segadapt::report::write_outputs(out, &f.name, &f.image, &pred, classes.len())?;
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    if labelled > 0 {
        summary.miou = Some(conf.scores(&classes).miou);
    }
    if let Some(out) = &a.out {
        let models = [("prediction", &model)];
        let frames =
            segadapt::report::run::segment_strip(&trace.strip, &pre, classes.len(), &models)?;
        let page = out.join("report.html");
        std::fs::create_dir_all(out)?;
        segadapt::report::run::replay_page(&summary, &trace, &classes, frames)?.write(&page)?;
        eprintln!("report: {}", page.display());
    }
    for d in &summary.damage {
        eprintln!("damage: {}: {d}", a.src.source);
    }
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "frames in {}, served {}, dropped {}, bad {}; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {:.1} s",
            summary.frames_in,
            summary.frames_served,
            summary.frames_dropped,
            summary.frame_errors,
            summary.latency_ms_p50,
            summary.latency_ms_p99,
            summary.latency_ms_max,
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

fn load_eval(
    data: &Option<PathBuf>,
    filter: &[(String, String)],
    model: &std::path::Path,
) -> Result<Option<Vec<segadapt::data::Example>>> {
    let Some(d) = data else { return Ok(None) };
    let cfg = SegformerConfig::load(&model.join("config.json"))?;
    let ex = Dataset::open(d, filter)?.load_for(&cfg.class_names(), cfg.ignore_label(), true)?;
    if ex.is_empty() {
        bail!("{}: no labelled frames to score", d.display());
    }
    Ok(Some(ex))
}

/// Labelled source frames for source replay, kept at the profile's input size.
fn load_replay(
    data: &Option<PathBuf>,
    filter: &[(String, String)],
    model: &std::path::Path,
    profile: &segadapt::config::Profile,
) -> Result<Option<Arc<Vec<segadapt::data::Example>>>> {
    let size = (profile.input.width, profile.input.height);
    Ok(load_eval(data, filter, model)?
        .map(|ex| Arc::new(segadapt::adapt::replay::shrink(ex, size))))
}

fn adapt(a: AdaptArgs) -> Result<()> {
    let profile = a.profile.load_for(&a.model)?;
    let (metrics, _exporter) = a.metrics.start()?;
    let cfg = SegformerConfig::load(&a.model.join("config.json"))?;
    let session = segadapt::runtime::session::Session {
        model: a.model.clone(),
        replay: load_replay(&a.replay, &a.replay_filter, &a.model, &profile)?,
        profile,
        method: a.method,
        out: a.out.clone(),
        eval: load_eval(&a.eval_data, &a.eval_filter, &a.model)?.map(Arc::new),
        eval_every: a.eval_every,
        steps_per_frame: a.steps_per_frame,
        seed: a.seed,
        realtime: a.realtime,
        adapt: None,
        before: None,
        schedule: Default::default(),
        metrics,
    };
    let source = open_source(&a.src, cfg.num_labels(), cfg.ignore_label())?;
    let r = session.run(source, stop_flag()?)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let s = &r.summary;
    println!(
        "{}: frames {} served {} dropped {}; {} training steps ({:.2}/s, median {:.0} ms), {} skipped, {} rollbacks, {} budget waits; latency p50 {:.1} ms p99 {:.1} ms max {:.1} ms",
        a.method, s.frames_in, s.frames_served, s.frames_dropped, s.train_steps,
        s.train_steps_per_s, s.step_ms_p50, s.steps_skipped, s.rollbacks, s.budget_waits,
        s.latency_ms_p50, s.latency_ms_p99, s.latency_ms_max
    );
    if s.frames_blank > 0 {
        println!(
            "{} frames without content (uniform: a covered lens, a black frame) were served but not trained on",
            s.frames_blank
        );
    }
    if s.checkpoint_failures > 0 {
        println!(
            "{} checkpoints could not be written; the newest written one is in {}",
            s.checkpoint_failures,
            a.out.join("checkpoints").display()
        );
    }
    if s.train_busy > 0.0 {
        println!(
            "busy: serving {:.0}% of the time, training {:.0}%",
            100.0 * s.serve_busy,
            100.0 * s.train_busy
        );
    }
    println!(
        "memory: heap peak {:.0} MB, resident peak {} (budget {:.0} MB)",
        r.peak_heap_mb,
        r.peak_rss_mb.map_or("n/a".into(), |v| format!("{v:.0} MB")),
        r.plan.budget as f64 / (1 << 20) as f64
    );
    if let (Some(b), Some(c)) = (&r.source_only, &r.adapted) {
        println!("mIoU source-only {:.2} -> adapted {:.2}", b.miou, c.miou);
    }
    println!("adapted model written to {}", a.out.display());
    if let Some(p) = &r.page {
        println!("report: {}", p.display());
    }
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    if a.list {
        for (name, text) in segadapt::config::BUILT_IN {
            let p = segadapt::config::Profile::parse(text)?;
            println!(
                "{name:<24} {:<8} {}x{} at {} fps, {} MB",
                p.device.device, p.input.width, p.input.height, p.input.fps, p.memory.total_mb
            );
        }
        return Ok(());
    }
    let profile = a.profile.load_for(&a.model)?;
    let dev = Device::Cpu;
    let mut files = weights::load_model_dir(&a.model, &dev)?;
    files.preprocess.size = Some(segadapt::config::Size {
        width: profile.input.width,
        height: profile.input.height,
    });
    let stats = match segadapt::stats::SourceStats::load_if_present(&a.model, &dev)? {
        Some(s) => s,
        None => {
            log::warn!(
                "{}: no source statistics; the plan counts none of what a run builds from the stream",
                a.model.display()
            );
            let model = Segformer::new(&files.config, files.tensors.clone())?;
            segadapt::stats::SourceStats::of_stream(&model, &files.preprocess, Vec::new())?
        }
    };
    let mut cfg = a.method.config(&profile.adapt);
    segadapt::runtime::bootstrap::fit(&mut cfg, &stats, &a.model);
    let plan =
        segadapt::budget::measured_plan(&profile, &files.config, &files.tensors, &stats, &cfg)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"plan": plan, "fits": plan.problems().is_empty(), "problems": plan.problems()})
        );
    } else {
        print!("{}", plan.table());
    }
    plan.check()?;
    Ok(())
}

fn ablate(a: AblateArgs, quiet: bool) -> Result<()> {
    let profile = a.profile.load_for(&a.model)?;
    let ab = segadapt::ablation::Ablation {
        model: a.model.clone(),
        profile: profile.clone(),
        data: a.data,
        filter: a.filter,
        replay: match a
            .methods
            .iter()
            .any(|&m| m == Method::Replay || (m == Method::Profile && profile.adapt.replay.on))
        {
            true => {
                if a.replay.is_none() {
                    bail!("source replay needs labelled source frames: --replay DIR [--replay-where COL=VAL]");
                }
                load_replay(&a.replay, &a.replay_filter, &a.model, &profile)?
            }
            false => None,
        },
        fps: a.fps,
        loops: a.loops,
        steps_per_frame: a.steps_per_frame,
        methods: a.methods,
        seeds: a.seeds,
        out: a.out.clone(),
    };
    let bar = progress_bar(Some(ab.runs() as u64), quiet);
    let rows = ab.run(stop_flag()?, &mut |line| {
        bar.inc(1);
        bar.set_message(line.to_string());
        if bar.is_hidden() {
            log::info!("{line}");
        }
    })?;
    bar.finish_and_clear();
    let table = segadapt::ablation::markdown(&rows);
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(a.out.join("ablation.md"), &table)?;
    std::fs::write(
        a.out.join("ablation.json"),
        serde_json::to_string_pretty(&rows)?,
    )?;
    print!("{table}");
    let runs = segadapt::report::tables::run_folders(&a.out);
    let page = a.out.join("report.html");
    segadapt::report::tables::ablation_page(&rows, &runs)?.write(&page)?;
    eprintln!("report: {}", page.display());
    Ok(())
}
