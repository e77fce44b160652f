//! A device profile (`firmware-configs/*.toml`): where segadapt runs, at what size and cadence,
//! inside which memory budget, and which adaptation components are on with their settings.

use crate::adapt::AdaptConfig;
use crate::error::{at_least, check, positive, Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub device: DeviceSection,
    pub input: InputSection,
    pub train: TrainSection,
    pub memory: MemorySection,
    #[serde(default)]
    pub adapt: AdaptConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSection {
    pub name: String,
    /// "cpu" or "cuda:N".
    pub device: String,
    /// CUDA compute capability as major*10+minor (87 Orin, 72 Xavier); 0 on CPU.
    #[serde(default)]
    pub compute_capability: u32,
    /// Serving precision. Training always keeps f32 master weights.
    #[serde(default)]
    pub dtype: Precision,
    /// CPU worker threads (0: all cores).
    #[serde(default)]
    pub threads: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSection {
    /// Frames are resized to this size for serving and training.
    pub width: usize,
    pub height: usize,
    /// The camera's frame rate.
    pub fps: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Random crop of the resized frame that one training sample uses.
    pub crop_width: usize,
    pub crop_height: usize,
    pub batch: usize,
    /// Train after every N-th served frame (0: a training thread steps as fast as it can).
    #[serde(default)]
    pub every: u32,
    /// A longer step is logged and counted as over budget.
    pub max_step_ms: u64,
    /// Recent frames kept for training.
    pub ring: usize,
    /// Adaptation checkpoints: every N steps, keeping the last `keep`.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    #[serde(default = "default_keep")]
    pub keep: usize,
}

/// The runtime's whole slice of memory, and each part's share of it (MB, 1 MB = 2^20 bytes).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySection {
    pub total_mb: f64,
    /// Student, teacher and the published serving copy.
    pub models_mb: f64,
    /// Gradients and the optimizer's two moments.
    pub optimizer_mb: f64,
    /// A training step's live intermediates, measured.
    pub activations_mb: f64,
    /// Serving: one forward at input size, measured, and the frame ring.
    pub serving_mb: f64,
    /// Bank, queue, prototypes, thresholds, source statistics, replay buffer.
    pub state_mb: f64,
}

/// The served model's precision (`device.dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    /// CUDA only.
    F16,
    /// CUDA with compute capability 80 or more.
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::F16 => candle_core::DType::F16,
            Precision::Bf16 => candle_core::DType::BF16,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        })
    }
}
fn default_checkpoint_every() -> u64 {
    100
}
fn default_keep() -> usize {
    3
}

/// The profiles of `firmware-configs/`, compiled in: the binary runs from any folder.
pub const BUILT_IN: &[(&str, &str)] = &[
    (
        "x86-64-cpu",
        include_str!("../../firmware-configs/x86-64-cpu.toml"),
    ),
    (
        "jetson-orin-nano-4gb",
        include_str!("../../firmware-configs/jetson-orin-nano-4gb.toml"),
    ),
    (
        "jetson-orin-nano-8gb",
        include_str!("../../firmware-configs/jetson-orin-nano-8gb.toml"),
    ),
    (
        "jetson-xavier-nx-8gb",
        include_str!("../../firmware-configs/jetson-xavier-nx-8gb.toml"),
    ),
    (
        "jetson-orin-nx-16gb",
        include_str!("../../firmware-configs/jetson-orin-nx-16gb.toml"),
    ),
    (
        "jetson-agx-xavier-32gb",
        include_str!("../../firmware-configs/jetson-agx-xavier-32gb.toml"),
    ),
    (
        "jetson-agx-orin-32gb",
        include_str!("../../firmware-configs/jetson-agx-orin-32gb.toml"),
    ),
    (
        "jetson-agx-orin-64gb",
        include_str!("../../firmware-configs/jetson-agx-orin-64gb.toml"),
    ),
];

pub fn built_in_names() -> Vec<&'static str> {
    BUILT_IN.iter().map(|(n, _)| *n).collect()
}

impl Profile {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text).map_err(|e| match e {
            Error::Config {
                key,
                value,
                allowed,
            } => Error::Config {
                key: format!("{}: {key}", path.display()),
                value,
                allowed,
            },
            other => Error::data(path, other.to_string()),
        })
    }

    /// A built-in profile by name (`x86-64-cpu`, `jetson-orin-nano-8gb`, ...), or a TOML file.
    pub fn resolve(name_or_path: &str) -> Result<Self> {
        match BUILT_IN.iter().find(|(n, _)| *n == name_or_path) {
            Some((name, text)) => Self::parse(text)
                .map_err(|e| Error::Invalid(format!("built-in profile {name}: {e}"))),
            None if Path::new(name_or_path).exists() || name_or_path.ends_with(".toml") => {
                Self::load(Path::new(name_or_path))
            }
            None => Err(Error::config(
                "--profile",
                name_or_path,
                format!(
                    "a TOML file or a built-in profile: {}",
                    built_in_names().join(", ")
                ),
            )),
        }
    }

    pub fn parse(text: &str) -> Result<Self> {
        let p: Profile = toml::from_str(text).map_err(|e| {
            // toml names the key and the line; keep its message whole.
            Error::config("profile", "?", e.to_string().trim().replace('\n', " "))
        })?;
        p.validate()?;
        Ok(p)
    }

    /// The device the profile names, opened; where it cannot be, one line naming it and why.
    pub fn open_device(&self) -> Result<candle_core::Device> {
        open_device("device.device", &self.device.device)
    }

    /// The CUDA ordinal, or None on CPU.
    pub fn cuda_ordinal(&self) -> Option<usize> {
        cuda_ordinal(&self.device.device)
    }

    pub fn validate(&self) -> Result<()> {
        let d = &self.device;
        check(
            !d.name.is_empty(),
            "device.name",
            "\"\"",
            "a non-empty name",
        )?;
        let cuda = self.cuda_ordinal();
        check(
            d.device == "cpu" || cuda.is_some(),
            "device.device",
            &d.device,
            "\"cpu\" or \"cuda:N\"",
        )?;
        if cuda.is_some() {
            check(
                (30..=120).contains(&d.compute_capability),
                "device.compute_capability",
                d.compute_capability,
                "a CUDA compute capability such as 87 (Orin) or 72 (Xavier)",
            )?;
        }
        match d.dtype {
            Precision::F32 => {}
            Precision::F16 => check(cuda.is_some(), "device.dtype", "f16", "f32 on cpu")?,
            Precision::Bf16 => check(
                cuda.is_some() && d.compute_capability >= 80,
                "device.dtype",
                "bf16",
                "f32 or f16: bf16 needs CUDA compute capability 80 or more (not Xavier, sm_72)",
            )?,
        }
        check(
            d.threads <= 1024,
            "device.threads",
            d.threads,
            "0 (all cores) to 1024",
        )?;

        let i = &self.input;
        for (k, v) in [("input.width", i.width), ("input.height", i.height)] {
            check((32..=4096).contains(&v), k, v, "32 to 4096 pixels")?;
        }
        check(
            i.fps.is_finite() && i.fps > 0.0 && i.fps <= 240.0,
            "input.fps",
            i.fps,
            "a frame rate in (0, 240]",
        )?;

        let t = &self.train;
        check(
            t.crop_width >= 32 && t.crop_width <= i.width,
            "train.crop_width",
            t.crop_width,
            "32 to input.width pixels",
        )?;
        check(
            t.crop_height >= 32 && t.crop_height <= i.height,
            "train.crop_height",
            t.crop_height,
            "32 to input.height pixels",
        )?;
        check(
            (1..=64).contains(&t.batch),
            "train.batch",
            t.batch,
            "1 to 64",
        )?;
        check(
            t.max_step_ms > 0,
            "train.max_step_ms",
            t.max_step_ms,
            "more than 0",
        )?;
        check(
            t.ring >= t.batch,
            "train.ring",
            t.ring,
            "at least train.batch frames",
        )?;
        at_least("train.keep", t.keep, 1)?;

        let m = &self.memory;
        for (k, v) in [
            ("memory.total_mb", m.total_mb),
            ("memory.models_mb", m.models_mb),
            ("memory.optimizer_mb", m.optimizer_mb),
            ("memory.activations_mb", m.activations_mb),
            ("memory.serving_mb", m.serving_mb),
            ("memory.state_mb", m.state_mb),
        ] {
            positive(k, v)?;
        }
        let shares = m.models_mb + m.optimizer_mb + m.activations_mb + m.serving_mb + m.state_mb;
        check(
            shares <= m.total_mb + 1e-9,
            "memory.total_mb",
            m.total_mb,
            &format!("at least the sum of the shares ({shares:.0} MB)"),
        )?;
        self.adapt.validate()
    }
}

/// Who chose the size a run serves at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeFrom {
    /// `--input WxH`.
    Flag,
    /// A profile named on the command line.
    Profile,
    /// The model's `preprocessor_config.json`.
    Model,
    /// The built-in default profile, for a model that gives no size.
    Default,
}

impl Profile {
    /// Sets the size frames are served and trained at: `flag` where given, else the profile's
    /// where one was `named`, else the model's own (`preprocessor_config.json`), else the
    /// default profile's. The training crop keeps its share of the input. Returns who chose,
    /// and a warning where the chosen size is more than 2x off the model's on either side.
    pub fn fit_input(
        &mut self,
        flag: Option<(usize, usize)>,
        named: bool,
        model: Option<crate::config::Size>,
    ) -> Result<(SizeFrom, Option<String>)> {
        let model = model.map(|s| (s.width, s.height));
        let (size, from) = match (flag, named, model) {
            (Some(s), ..) => (s, SizeFrom::Flag),
            (None, true, _) => ((self.input.width, self.input.height), SizeFrom::Profile),
            (None, false, Some(s)) => (s, SizeFrom::Model),
            (None, false, None) => ((self.input.width, self.input.height), SizeFrom::Default),
        };
        let (old, t) = ((self.input.width, self.input.height), &mut self.train);
        let keep_share = |crop: usize, old: usize, new: usize| {
            ((crop as f64 * new as f64 / old as f64).round() as usize).clamp(32.min(new), new)
        };
        t.crop_width = keep_share(t.crop_width, old.0, size.0);
        t.crop_height = keep_share(t.crop_height, old.1, size.1);
        (self.input.width, self.input.height) = size;
        self.validate()?;
        let off = |a: usize, b: usize| a > 2 * b || b > 2 * a;
        let warning = match model {
            Some(m) if off(size.0, m.0) || off(size.1, m.1) => Some(format!(
                "serving at {}x{}, more than 2x off the {}x{} the model's \
                 preprocessor_config.json gives; `--input {}x{}` serves at the model's size",
                size.0, size.1, m.0, m.1, m.0, m.1
            )),
            _ => None,
        };
        Ok((from, warning))
    }
}

/// N of a "cuda:N" device name.
fn cuda_ordinal(name: &str) -> Option<usize> {
    name.strip_prefix("cuda:")?.parse().ok()
}

/// Opens `name` ("cpu" or "cuda:N", the value of `key`); where it cannot be, one line naming it
/// and why.
pub fn open_device(key: &str, name: &str) -> Result<candle_core::Device> {
    if name == "cpu" {
        return Ok(candle_core::Device::Cpu);
    }
    let Some(n) = cuda_ordinal(name) else {
        return Err(Error::config(key, name, "\"cpu\" or \"cuda:N\""));
    };
    let cpu = "--device cpu runs on the CPU";
    candle_core::Device::new_cuda(n).map_err(|e| {
        let why = match cfg!(feature = "cuda") {
            true => {
                let e = e.to_string();
                let e = e.lines().next().unwrap_or("");
                format!("no such CUDA device here ({e}); {cpu}")
            }
            false => format!("this build has no CUDA (build with --features cuda); {cpu}"),
        };
        Error::config(key, name, why)
    })
}
