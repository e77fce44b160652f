//! The interface every adaptation idea implements. A step is a fixed pipeline:
//!
//! 1. the EMA teacher labels the weak view ([`Step::new`]);
//! 2. `label`: components rectify, select or check the pseudo labels, in list order;
//! 3. `view`: components change the student's strong view (copy-paste, ClassMix);
//! 4. the student runs on the strong view; `losses`: each component adds its terms;
//! 5. backward and AdamW; `update`: components move their state (before the EMA teacher);
//!
//! and, around it, each component reports its bounded memory and saves its state under its own
//! key prefix. Target labels never enter a step.

use crate::model::Student;
use crate::stats::SourceStats;
use crate::SeededRng;
use candle_core::{Result, Tensor, Var};

pub const IGNORE: u32 = 255;

/// What a `label` hook decided about the whole step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Go,
    /// Predictions left their running band: nothing is updated, and the runner rolls back.
    Collapse,
}

/// The step's sizes: the training crop in input pixels and the model input, for memory bounds.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub classes: usize,
    /// Decoder embedding width.
    pub dim: usize,
    pub crop: (usize, usize),
    pub input: (usize, usize),
}

/// The teacher's view of the batch and the pseudo labels built from it.
pub struct Labels {
    /// [N, C] teacher class probabilities on the weak view (N = B h w, feature resolution).
    pub probs: Tensor,
    /// [N, D] teacher decoder embedding.
    pub feats: Tensor,
    /// (B, h, w) of the feature grid.
    pub grid: (usize, usize, usize),
    /// [N, C] class scores the labels are the argmax of: the probabilities, or rectified ones.
    pub scores: Tensor,
    pub pred: Vec<u32>,
    /// Confidence of each pixel's label (`pred`) under `scores`.
    pub conf: Vec<f32>,
    /// Pixels kept as pseudo labels.
    pub keep: Vec<bool>,
}

impl Labels {
    /// `pred` and `conf` as the argmax and maximum of `scores`; nothing kept yet.
    pub fn from_scores(
        probs: Tensor,
        feats: Tensor,
        grid: (usize, usize, usize),
        scores: Tensor,
    ) -> Result<Self> {
        let n = grid.0 * grid.1 * grid.2;
        let mut l = Self {
            probs,
            feats,
            grid,
            scores: scores.clone(),
            pred: Vec::new(),
            conf: Vec::new(),
            keep: vec![true; n],
        };
        l.rescore(scores)?;
        Ok(l)
    }

    /// Replaces the scores; labels and confidences follow them.
    pub fn rescore(&mut self, scores: Tensor) -> Result<()> {
        self.pred = scores.argmax(candle_core::D::Minus1)?.to_vec1()?;
        self.conf = scores.max(candle_core::D::Minus1)?.to_vec1()?;
        self.scores = scores;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.pred.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pred.is_empty()
    }

    /// The kept labels, [`IGNORE`] elsewhere.
    pub fn selected(&self) -> Vec<u32> {
        self.pred
            .iter()
            .zip(&self.keep)
            .map(|(&p, &k)| if k { p } else { IGNORE })
            .collect()
    }
}

/// The student's training view and its labels, as the `view` hooks leave them.
pub struct View {
    /// [B, 3, H, W] strong view.
    pub image: Tensor,
    /// Selected pseudo labels before any paste ([`IGNORE`] where not kept).
    pub labels: Vec<u32>,
    /// Labels the student trains on: `labels` with pasted pixels' own classes.
    pub train: Vec<u32>,
    /// Pixels pasted in from elsewhere (they have no teacher feature of their own).
    pub pasted: Vec<bool>,
    /// A labelled source batch (images [K, 3, H, W], labels u32 [K H W]) from source replay.
    pub source: Option<(Tensor, Tensor)>,
}

/// The student's outputs on the view and the masks the losses use.
pub struct StudentOut {
    /// [N, C] logits at feature resolution.
    pub logits: Tensor,
    /// [N, D] decoder embedding.
    pub feats: Tensor,
    /// u32 [N] training labels (`View::train`).
    pub y: Tensor,
    /// u8 [N]: trained on (kept or pasted).
    pub kept: Tensor,
    /// u8 [N]: not trained on.
    pub ignored: Tensor,
    /// u8 [N]: the teacher saw these pixels as the student does (not pasted).
    pub same: Tensor,
    /// The replayed source crop's embedding cells [K h w, D] (with their gradient) and their
    /// labels: BiDA's source side and DIDA's bank updates.
    pub source_cells: Option<(Tensor, Vec<u32>)>,
}

/// Everything the hooks of one step may read.
pub struct Step<'a> {
    pub labels: Labels,
    pub view: View,
    pub student: Option<StudentOut>,
    /// Steps completed before this one.
    pub t: u64,
    pub stats: &'a SourceStats,
    /// Labelled source frames on board (source replay), not part of any component's state.
    pub replay: Option<&'a super::replay::Replay>,
}

impl Step<'_> {
    pub fn out(&self) -> &StudentOut {
        self.student
            .as_ref()
            .expect("the student ran before the losses")
    }
}

/// One adaptation idea with its own state. Hooks default to doing nothing.
pub trait Component: Send {
    /// Short name: the key prefix of its state and the label of its loss terms' group.
    fn name(&self) -> &'static str;

    /// Rectifies, selects or checks pseudo labels.
    fn label(&mut self, _labels: &mut Labels, _t: u64) -> Result<Flow> {
        Ok(Flow::Go)
    }

    /// Changes the student's view (after every `label` hook).
    fn view(&mut self, _step: &mut Step, _rng: &mut SeededRng) -> Result<()> {
        Ok(())
    }

    /// The stream has moved to another condition (the training budget's shift test): what
    /// was normal before need not be now.
    fn shift(&mut self) {}

    /// Judges the student's outputs before any loss is taken (the collapse guard).
    fn inspect(&mut self, _step: &Step) -> Result<Flow> {
        Ok(Flow::Go)
    }

    /// Loss terms on the student's outputs, weights applied.
    fn losses(
        &mut self,
        _step: &mut Step,
        _student: &Student,
        _rng: &mut SeededRng,
    ) -> Result<Vec<(&'static str, Tensor)>> {
        Ok(Vec::new())
    }

    /// State updates after the optimizer step (and before the EMA teacher follows the student).
    fn update(&mut self, _step: &Step, _student: &Student, _rng: &mut SeededRng) -> Result<()> {
        Ok(())
    }

    /// Parameters of its own that the optimizer trains, with their learning-rate multiplier.
    fn params(&self) -> Vec<(String, Var, f64)> {
        Vec::new()
    }

    /// Bytes its state can reach (its bound, not its current fill) and what that holds.
    fn bytes(&self, _geo: &Geometry) -> (usize, String) {
        (0, String::new())
    }

    /// Its state for a checkpoint, keys relative to its prefix.
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }

    /// Reads what [`Component::state`] wrote; `get` looks a key up under its prefix.
    fn load(&mut self, _get: &dyn Fn(&str) -> Option<Tensor>) -> Result<()> {
        Ok(())
    }
}

/// `get(key)` or an error naming the component and key.
pub fn need(get: &dyn Fn(&str) -> Option<Tensor>, component: &str, key: &str) -> Result<Tensor> {
    get(key).ok_or_else(|| {
        candle_core::Error::Msg(format!("adaptation state lacks adapt.{component}.{key}"))
    })
}
