//! What an adaptation step does: which components are on and their hyperparameters, as the
//! profile's `[adapt]` table gives them (defaults from `design/methods.md`), and the ablation's
//! method switches.

use crate::error::{at_least, check, positive, unit, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptConfig {
    pub lr: f64,
    pub head_lr_mult: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub ema: f64,
    /// Which student parameters train.
    pub train: TrainScope,
    /// What the student's backward pass recomputes instead of keeping in memory.
    pub recompute: crate::model::Recompute,
    /// Fixed confidence threshold of plain self-training (used when `ias` is off).
    pub threshold: f32,
    pub ias: Ias,
    pub hpla: Hpla,
    pub cpsl: Cpsl,
    pub region: Region,
    pub sepico: Sepico,
    pub bida: Bida,
    pub dida: Dida,
    pub replay: Replay,
    pub guard: Guard,
    pub tent: Tent,
    pub budget: Budget,
    /// What the teacher's decode-head BatchNorm statistics follow on the frames it labels.
    pub statistics: Statistics,
}

/// What the teacher's decode-head BatchNorm statistics follow near the source domain. Away
/// from it, with training budgets, both lead them only part of the way from the source's
/// statistics to each batch's (`model::Tracking::Anchored`); without budgets, to each batch's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Statistics {
    /// Each batch's statistics as they are (led part of the way, with budgets).
    #[default]
    Batch,
    /// Each batch's statistics under the source's class shares, class by class from the
    /// teacher's labels (`model::class_norm`): the shift without the content. Needs the class
    /// statistics stored with the source statistics (`segadapt stats`).
    Class,
}

/// When to train: HAMLET's budgets (see `adapt::controller`). Off: every step trains at `lr`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Budget {
    pub on: bool,
    /// Steps granted for a condition not adapted to before; the learning rate decays linearly
    /// to zero over them.
    pub steps: u64,
    /// Frames per window of the shift test.
    pub window: usize,
    /// Mean squared z-score of a window against the current condition that counts as a shift.
    pub threshold: f64,
    /// Budget factor per earlier visit of a known condition.
    pub revisit: f64,
    /// Conditions whose adapted weights are kept (0: none). With slots, a known condition starts
    /// from the weights adapted to it and a new one from the nearest kept condition's, so
    /// adapting to one condition does not degrade the model for another.
    pub slots: usize,
    /// Once a new condition is told apart, the weights it goes on from are weighed on its
    /// window of frames against the source weights and every kept condition's, by this
    /// label-free signal (`adapt::signals`); `off` keeps the frame statistics' choice.
    pub judge: Judge,
    /// While a condition lasts, its weights are weighed again every this many frames, so
    /// weights that stop suiting it give way to the source's or a kept condition's (0: only
    /// when it is told apart).
    pub recheck: usize,
}

/// The label-free signal that weighs candidate weights on a condition's first frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Judge {
    /// The frame statistics' choice stands.
    #[default]
    Off,
    /// A condition further than the shift threshold from every kept one starts from the
    /// source weights; a known one from its own, a near one from the nearest kept.
    Source,
    /// The mean top class probability.
    Confidence,
    /// One minus the normalised entropy.
    Certainty,
    /// Agreement with the candidates' majority class.
    Consensus,
    /// Agreement with the mirrored frame's classes.
    Flip,
    /// Predicted class shares near the source's class prior.
    Prior,
}

impl Judge {
    /// Whether it weighs candidates by a signal on the recent frames.
    pub fn weighs(self) -> bool {
        !matches!(self, Judge::Off | Judge::Source)
    }

    /// The signal's value, higher is better.
    pub fn of(self, s: &super::signals::Signals) -> f64 {
        match self {
            Judge::Off | Judge::Source => 0.0,
            Judge::Confidence => s.confidence,
            Judge::Certainty => s.certainty,
            Judge::Consensus => s.consensus,
            Judge::Flip => s.flip,
            Judge::Prior => s.prior,
        }
    }
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            on: false,
            steps: 250,
            window: 8,
            threshold: 9.0,
            revisit: 0.5,
            slots: 0,
            judge: Judge::Off,
            recheck: 0,
        }
    }
}

impl Budget {
    fn validate(&self) -> Result<()> {
        at_least("adapt.budget.steps", self.steps as usize, 1)?;
        at_least("adapt.budget.window", self.window, 1)?;
        positive("adapt.budget.threshold", self.threshold)?;
        unit("adapt.budget.revisit", self.revisit)?;
        check(
            self.slots <= 64,
            "adapt.budget.slots",
            self.slots,
            "0 to 64 conditions",
        )
    }
}

/// Which student parameters an adaptation step trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainScope {
    /// Every weight.
    All,
    /// The norm layers' affine parameters only (as TENT); the rest keeps its source values.
    Norm,
}

/// SePiCo's contrast against the source class statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SepicoVariant {
    /// DistCL: the closed form over Gaussian class distributions (means and variances).
    Dist,
    /// ProtoCL: class centroids only.
    Proto,
}

/// TENT instead of self-training: the entropy of the model's own predictions on the frame, only
/// the norm layers' affine parameters train, and the served model is the adapted one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tent {
    pub on: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ias {
    pub on: bool,
    pub alpha: f32,
    pub beta: f32,
    pub gamma: f32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Hpla {
    pub on: bool,
    /// Recent pseudo-labelled frames kept to paste from.
    pub pool: usize,
    /// How many of the least confident classes count as hard.
    pub hard: usize,
    pub rounds: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cpsl {
    pub on: bool,
    pub tau: f64,
    pub eps: f32,
    pub iters: usize,
    pub queue: usize,
    pub pixels: usize,
    pub weight: f64,
    pub consistency: f64,
    /// Learning-rate multiplier of the learnable prototypes (CPSL: x5).
    pub proto_lr: f64,
    /// Momentum of the EMA prototypes that rectify and teach the consistency.
    pub proto_ema: f64,
    /// Steps over which the target class prior is estimated from the teacher's labels before
    /// it is frozen (CPSL estimates it once from the warm-up model).
    pub prior_steps: u64,
    /// Share of the source class prior mixed into the target prior, so no class the source
    /// knows can lose all its assignment mass.
    pub prior_mix: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Region {
    pub on: bool,
    pub smooth: f64,
    pub entropy: f64,
    pub consistency: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sepico {
    pub on: bool,
    pub variant: SepicoVariant,
    /// Temperature on unit-norm projections. SePiCo's released code divides by 100: its logits
    /// stay within 0.01 of each other and the loss acts as a nearly constant pull of each pixel
    /// towards its class mean at 1/100 of the unit scale, which 40k offline iterations
    /// integrate. Over a few hundred online steps that moves nothing; 0.1 (InfoNCE's range, and
    /// BiDA's here) gives logits that tell the classes apart.
    pub tau: f64,
    pub weight: f64,
    pub reg: f64,
    /// Width of the projection head's output (the contrast space).
    pub dim: usize,
    /// Source pixels per class drawn from the stored statistics each step to update the
    /// projected class statistics.
    pub samples: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Bida {
    pub on: bool,
    pub tau: f64,
    pub weight: f64,
    pub momentum: f64,
    /// Steps over which the calibration is phased in (from the run's first step; 0: at once).
    /// A ramp longer than a condition's training budget (250) keeps label transfer from
    /// meeting the target's prototypes within one (night, three seeds: 30.5 mIoU at 500, 32.2
    /// at 100, 33.4 at 0); at 0, car under motion blur fell 5.3 IoU below the source model
    /// (4.4 at 100).
    pub ramp: u64,
    pub per_class: usize,
    /// Keep a pseudo label only where label transfer agrees with the classifier.
    pub check: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Dida {
    pub on: bool,
    /// Instances used, taken class-balanced from the bank stored with the source statistics.
    pub bank: usize,
    pub momentum: f64,
    /// Steps between bank updates (DIDA: 50).
    pub interval: u64,
    pub weight: f64,
    /// Temperature of the instance similarities (softmax over the bank).
    pub tau: f64,
    /// Weight of the instance-level class distribution (scatter) in the pseudo labels; 0 as in
    /// DIDA's released configuration (`a_smooth = 1`). At 0.5 it cost 9 mIoU on CamVid dusk.
    pub blend: f64,
}

/// Source replay: labelled source frames on board (DAFormer's source cross-entropy and DACS
/// ClassMix). Needs the frames (`adapt --replay DIR`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Replay {
    pub on: bool,
    /// Frames kept (chosen once by rare-class sampling).
    pub size: usize,
    /// RCS temperature.
    pub temp: f64,
    /// Weight of the source cross-entropy.
    pub weight: f64,
    /// Paste half the source crop's classes onto the student's target view.
    pub mix: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Guard {
    /// Roll back when a step's class histogram or confidence leaves its running band.
    pub collapse: bool,
    /// Band half-width in running standard deviations.
    pub band: f64,
    /// Steps before the band is trusted; a rollback goes to a checkpoint at least this many
    /// steps older than the flagged step.
    pub warmup: u64,
    /// Consecutive flagged steps after which the new level is accepted as the stream's own
    /// (a domain change, not a collapse).
    pub patience: u64,
    /// CoTTA stochastic restore: each weight goes back to its source value with this probability.
    pub restore: f64,
}

impl Default for AdaptConfig {
    fn default() -> Self {
        Self {
            lr: 6e-5,
            head_lr_mult: 10.0,
            weight_decay: 0.01,
            max_grad_norm: 10.0,
            ema: 0.999,
            train: TrainScope::All,
            recompute: crate::model::Recompute::None,
            threshold: 0.968,
            ias: Ias::default(),
            hpla: Hpla::default(),
            cpsl: Cpsl::default(),
            region: Region::default(),
            sepico: Sepico::default(),
            bida: Bida::default(),
            dida: Dida::default(),
            replay: Replay::default(),
            guard: Guard::default(),
            tent: Tent::default(),
            budget: Budget::default(),
            statistics: Statistics::default(),
        }
    }
}

impl Default for Ias {
    fn default() -> Self {
        Self {
            on: true,
            alpha: 0.5,
            beta: 0.9,
            gamma: 8.0,
        }
    }
}

impl Default for Hpla {
    fn default() -> Self {
        Self {
            on: true,
            pool: 8,
            hard: 5,
            rounds: 3,
        }
    }
}

impl Default for Cpsl {
    fn default() -> Self {
        Self {
            on: true,
            tau: 0.08,
            eps: 0.05,
            iters: 3,
            queue: 4096,
            pixels: 256,
            weight: 0.1,
            consistency: 5.0,
            proto_lr: 5.0,
            proto_ema: 0.999,
            prior_steps: 50,
            prior_mix: 0.2,
        }
    }
}

impl Default for Region {
    fn default() -> Self {
        Self {
            on: true,
            smooth: 0.1,
            entropy: 1.0,
            consistency: 0.5,
        }
    }
}

impl Default for Sepico {
    fn default() -> Self {
        Self {
            on: true,
            variant: SepicoVariant::Dist,
            tau: 0.1,
            weight: 1.0,
            reg: 1.0,
            dim: 128,
            samples: 16,
        }
    }
}

impl Default for Bida {
    fn default() -> Self {
        Self {
            on: true,
            tau: 0.1,
            weight: 0.1,
            momentum: 0.99,
            ramp: 100,
            per_class: 16,
            check: true,
        }
    }
}

impl Default for Dida {
    fn default() -> Self {
        Self {
            on: true,
            bank: 100,
            momentum: 0.999,
            interval: 50,
            weight: 0.5,
            tau: 0.1,
            blend: 0.0,
        }
    }
}

impl Default for Replay {
    fn default() -> Self {
        Self {
            on: false,
            size: 64,
            temp: 0.01,
            weight: 1.0,
            mix: true,
        }
    }
}

impl Default for Guard {
    fn default() -> Self {
        Self {
            collapse: true,
            band: 6.0,
            warmup: 50,
            patience: 10,
            restore: 0.0,
        }
    }
}

impl AdaptConfig {
    pub fn validate(&self) -> Result<()> {
        positive("adapt.lr", self.lr)?;
        positive("adapt.head_lr_mult", self.head_lr_mult)?;
        check(
            self.weight_decay >= 0.0 && self.weight_decay < 1.0,
            "adapt.weight_decay",
            self.weight_decay,
            "a number in [0, 1)",
        )?;
        positive("adapt.max_grad_norm", self.max_grad_norm)?;
        momentum("adapt.ema", self.ema)?;
        check(
            (0.0..=1.0).contains(&self.threshold),
            "adapt.threshold",
            self.threshold,
            "a confidence in [0, 1]",
        )?;
        self.ias.validate()?;
        self.hpla.validate()?;
        self.cpsl.validate()?;
        self.region.validate()?;
        self.sepico.validate()?;
        self.bida.validate()?;
        self.dida.validate()?;
        self.replay.validate()?;
        self.guard.validate()?;
        self.budget.validate()
    }
}

fn momentum(key: &str, v: f64) -> Result<()> {
    check((0.0..1.0).contains(&v), key, v, "a momentum in [0, 1)")
}

fn weight(key: &str, v: f64) -> Result<()> {
    check(v >= 0.0 && v.is_finite(), key, v, ">= 0")
}

impl Ias {
    fn validate(&self) -> Result<()> {
        unit("adapt.ias.alpha", self.alpha as f64)?;
        unit("adapt.ias.beta", self.beta as f64)?;
        positive("adapt.ias.gamma", self.gamma as f64)
    }
}

impl Hpla {
    fn validate(&self) -> Result<()> {
        at_least("adapt.hpla.pool", self.pool, 1)?;
        at_least("adapt.hpla.hard", self.hard, 1)?;
        at_least("adapt.hpla.rounds", self.rounds, 1)
    }
}

impl Cpsl {
    fn validate(&self) -> Result<()> {
        positive("adapt.cpsl.tau", self.tau)?;
        positive("adapt.cpsl.eps", self.eps as f64)?;
        at_least("adapt.cpsl.iters", self.iters, 1)?;
        at_least("adapt.cpsl.pixels", self.pixels, 1)?;
        check(
            self.queue >= self.pixels,
            "adapt.cpsl.queue",
            self.queue,
            "at least adapt.cpsl.pixels",
        )?;
        weight("adapt.cpsl.weight", self.weight)?;
        weight("adapt.cpsl.consistency", self.consistency)?;
        positive("adapt.cpsl.proto_lr", self.proto_lr)?;
        momentum("adapt.cpsl.proto_ema", self.proto_ema)?;
        unit("adapt.cpsl.prior_mix", self.prior_mix)
    }
}

impl Region {
    fn validate(&self) -> Result<()> {
        weight("adapt.region.smooth", self.smooth)?;
        weight("adapt.region.entropy", self.entropy)?;
        weight("adapt.region.consistency", self.consistency)
    }
}

impl Sepico {
    fn validate(&self) -> Result<()> {
        positive("adapt.sepico.tau", self.tau)?;
        weight("adapt.sepico.weight", self.weight)?;
        weight("adapt.sepico.reg", self.reg)?;
        at_least("adapt.sepico.dim", self.dim, 1)?;
        at_least("adapt.sepico.samples", self.samples, 1)
    }
}

impl Bida {
    fn validate(&self) -> Result<()> {
        positive("adapt.bida.tau", self.tau)?;
        weight("adapt.bida.weight", self.weight)?;
        momentum("adapt.bida.momentum", self.momentum)?;
        at_least("adapt.bida.per_class", self.per_class, 1)
    }
}

impl Dida {
    fn validate(&self) -> Result<()> {
        at_least("adapt.dida.bank", self.bank, 1)?;
        momentum("adapt.dida.momentum", self.momentum)?;
        weight("adapt.dida.weight", self.weight)?;
        positive("adapt.dida.tau", self.tau)?;
        unit("adapt.dida.blend", self.blend)?;
        at_least("adapt.dida.interval", self.interval as usize, 1)
    }
}

impl Replay {
    fn validate(&self) -> Result<()> {
        at_least("adapt.replay.size", self.size, 1)?;
        positive("adapt.replay.temp", self.temp)?;
        weight("adapt.replay.weight", self.weight)
    }
}

impl Guard {
    fn validate(&self) -> Result<()> {
        positive("adapt.guard.band", self.band)?;
        at_least("adapt.guard.patience", self.patience as usize, 1)?;
        unit("adapt.guard.restore", self.restore)
    }
}

/// What an adaptation run does: the profile's own switches, no training, a baseline, one
/// component on top of plain self-training, or every component of the five methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// The profile's switches as they are.
    Profile,
    /// No training: the source model serves.
    SourceOnly,
    Tent,
    /// Mean-teacher self-training with the fixed threshold, every component off.
    Plain,
    Ias,
    Hpla,
    Cpsl,
    Region,
    Sepico,
    /// SePiCo with the centroid variant.
    Protocl,
    Bida,
    Dida,
    /// Plain plus source replay (needs labelled source frames on board).
    Replay,
    /// Every component of the five methods (source replay stays off).
    Full,
}

impl Method {
    pub const ALL: [Method; 14] = [
        Method::Profile,
        Method::SourceOnly,
        Method::Tent,
        Method::Plain,
        Method::Ias,
        Method::Hpla,
        Method::Cpsl,
        Method::Region,
        Method::Sepico,
        Method::Protocl,
        Method::Bida,
        Method::Dida,
        Method::Replay,
        Method::Full,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Profile => "profile",
            Method::SourceOnly => "source-only",
            Method::Tent => "tent",
            Method::Plain => "plain",
            Method::Ias => "ias",
            Method::Hpla => "hpla",
            Method::Cpsl => "cpsl",
            Method::Region => "region",
            Method::Sepico => "sepico",
            Method::Protocl => "protocl",
            Method::Bida => "bida",
            Method::Dida => "dida",
            Method::Replay => "replay",
            Method::Full => "full",
        }
    }

    /// The adaptation settings of this method, hyperparameters from `base`. Source-only
    /// returns plain's settings (the runner takes no step).
    pub fn config(self, base: &AdaptConfig) -> AdaptConfig {
        use Method as M;
        let mut c = base.clone();
        if self == M::Profile {
            return c;
        }
        let all = self == M::Full;
        c.ias.on = all || self == M::Ias;
        c.hpla.on = all || self == M::Hpla;
        c.cpsl.on = all || self == M::Cpsl;
        c.region.on = all || self == M::Region;
        c.sepico.on = all || matches!(self, M::Sepico | M::Protocl);
        if self == M::Protocl {
            c.sepico.variant = SepicoVariant::Proto;
        }
        c.bida.on = all || self == M::Bida;
        c.dida.on = all || self == M::Dida;
        // Source replay is an option of the deployment (it needs source frames on board), not one
        // of the five methods: `full` leaves it off.
        c.replay.on = self == M::Replay;
        c.tent.on = self == M::Tent;
        // The baselines and the components' rows train on every frame, as their papers do;
        // training budgets belong to the deployed profile.
        c.budget.on = false;
        c.statistics = Statistics::Batch;
        c
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Method {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
                format!("unknown method {s:?}; one of {}", names.join(", "))
            })
    }
}

/// The norm layers' affine parameters (LayerNorms and the decode head's BatchNorm).
pub fn is_norm_affine(name: &str) -> bool {
    name.contains("norm") && !name.contains("running")
}

impl AdaptConfig {
    /// Whether the student parameter `name` trains: every one, or only the norm affines under
    /// TENT and `train = "norm"`.
    pub fn trains(&self, name: &str) -> bool {
        !(self.tent.on || self.train == TrainScope::Norm) || is_norm_affine(name)
    }

    /// Every component off: plain mean-teacher self-training.
    pub fn plain() -> AdaptConfig {
        Method::Plain.config(&Self::default())
    }
}
