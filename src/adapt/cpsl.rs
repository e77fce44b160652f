//! CPSL (class-balanced pixel-level self-labeling, methods.md section 1): prototype
//! rectification of the pseudo labels, the Sinkhorn self-labeling loss towards a target class
//! prior over a bounded feature queue, and the weak-to-strong prototype consistency.

use super::bidirectional::Prototypes;
use super::component::{Component, Flow, Geometry, Labels, Step};
use super::config;
use super::contrast::cosine;
use super::region::masked_mean;
use super::sinkhorn::balanced_assignment;
use crate::model::ops::log_softmax_last_dim as log_softmax;
use crate::model::Student;
use crate::stats::SourceStats;
use candle_core::{Device, Result, Tensor, D};
use rand::rngs::StdRng;
use rand::Rng;

pub struct Cpsl {
    cfg: config::Cpsl,
    /// Class prototypes the features are compared with.
    protos: Prototypes,
    /// Target class prior r the assignment's class marginals follow.
    prior: Vec<f32>,
    /// Teacher features [Q, D] of past pixels (FIFO).
    queue: Option<Tensor>,
    /// This step's prototype weights softmax(cos(f, mu) / tau) [N, C] and sampled features.
    weights: Option<Tensor>,
    picked: Option<Tensor>,
}

impl Cpsl {
    pub fn new(cfg: &config::AdaptConfig, stats: &SourceStats) -> Result<Self> {
        Ok(Self {
            cfg: cfg.cpsl.clone(),
            protos: Prototypes::new(&stats.prototypes, cfg.bida.momentum, cfg.bida.ramp)?,
            prior: stats.prior.to_vec1()?,
            queue: None,
            weights: None,
            picked: None,
        })
    }

    /// The self-labeling loss: Sinkhorn assignments of sampled teacher features (with the
    /// queue) towards the prior supervise the student's prototype scores at the same pixels.
    fn self_labeling(&mut self, step: &Step, rng: &mut StdRng) -> Result<Option<Tensor>> {
        let pasted = &step.view.pasted;
        let free: Vec<u32> = (0..pasted.len() as u32)
            .filter(|&i| !pasted[i as usize])
            .collect();
        let idx: Vec<u32> = (0..self.cfg.pixels.min(free.len()))
            .map(|_| free[rng.random_range(0..free.len())])
            .collect();
        if idx.is_empty() {
            return Ok(None);
        }
        let c = self.prior.len();
        let idx = Tensor::new(idx.as_slice(), step.labels.feats.device())?;
        let ft = step.labels.feats.index_select(&idx, 0)?;
        let all = match &self.queue {
            Some(q) => Tensor::cat(&[q, &ft], 0)?,
            None => ft.clone(),
        };
        let rows = all.dim(0)?;
        let sc: Vec<f32> = cosine(&all, &self.protos.target)?
            .flatten_all()?
            .to_vec1()?;
        let q = balanced_assignment(&sc, rows, &self.prior, self.cfg.eps, self.cfg.iters);
        let m = ft.dim(0)?;
        let q = Tensor::from_vec(q[(rows - m) * c..].to_vec(), (m, c), ft.device())?;
        let fs = step.out().feats.index_select(&idx, 0)?;
        let lp = log_softmax(&(cosine(&fs, &self.protos.target)? / self.cfg.tau)?)?;
        let l = (q * lp)?.sum(D::Minus1)?.mean_all()?.neg()?;
        self.picked = Some(ft);
        Ok(Some((l * self.cfg.weight)?))
    }

    /// KL from the teacher's prototype weights to the student's, on pixels both views share.
    fn consistency(&self, step: &Step) -> Result<Tensor> {
        let pt = self.weights.as_ref().expect("set by the label hook");
        let out = step.out();
        let ls = log_softmax(&(cosine(&out.feats, &self.protos.target)? / self.cfg.tau)?)?;
        let lt = pt.clamp(1e-8, 1.0)?.log()?;
        let kl = (pt * (lt - ls)?)?.sum(D::Minus1)?;
        masked_mean(&kl, &out.same)? * self.cfg.consistency
    }

    fn push_queue(&mut self) -> Result<()> {
        let Some(ft) = self.picked.take() else {
            return Ok(());
        };
        let q = match self.queue.take() {
            Some(q) => Tensor::cat(&[&q, &ft], 0)?,
            None => ft,
        };
        let len = q.dim(0)?;
        let cap = self.cfg.queue;
        self.queue = Some(match len > cap {
            true => q.narrow(0, len - cap, cap)?.copy()?,
            false => q,
        });
        Ok(())
    }
}

impl Component for Cpsl {
    fn name(&self) -> &'static str {
        "cpsl"
    }

    /// Rectification: each pixel's label is the argmax of w * p with
    /// w = softmax(cos(f, mu) / tau).
    fn label(&mut self, l: &mut Labels, _t: u64) -> Result<Flow> {
        let w = candle_nn::ops::softmax_last_dim(
            &(cosine(&l.feats, &self.protos.target)? / self.cfg.tau)?,
        )?;
        let scores = (&w * &l.probs)?;
        l.pred = scores.argmax(D::Minus1)?.to_vec1()?;
        l.scores = scores;
        self.weights = Some(w);
        Ok(Flow::Go)
    }

    fn losses(
        &mut self,
        step: &mut Step,
        _student: &Student,
        rng: &mut StdRng,
    ) -> Result<Vec<(&'static str, Tensor)>> {
        let mut terms = Vec::new();
        if let Some(l) = self.self_labeling(step, rng)? {
            terms.push(("cpsl", l));
        }
        if self.cfg.consistency > 0.0 {
            terms.push(("cpsl_consist", self.consistency(step)?));
        }
        Ok(terms)
    }

    fn update(&mut self, step: &Step, _student: &Student, _rng: &mut StdRng) -> Result<()> {
        self.protos.update(&step.labels.feats, &step.view.labels)?;
        self.push_queue()?;
        let c = self.prior.len();
        let n = step.labels.len();
        let mut hist = vec![0f32; c];
        step.labels
            .pred
            .iter()
            .for_each(|&p| hist[p as usize] += 1.0 / n as f32);
        let m = self.cfg.prior_momentum as f32;
        self.prior
            .iter_mut()
            .zip(&hist)
            .for_each(|(r, h)| *r = m * *r + (1.0 - m) * h);
        Ok(())
    }

    fn bytes(&self, g: &Geometry) -> (usize, String) {
        (
            (self.cfg.queue + g.classes) * g.dim * 4,
            format!("queue {}", self.cfg.queue),
        )
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut v = vec![
            (
                "prior".into(),
                Tensor::new(self.prior.as_slice(), &Device::Cpu)?,
            ),
            ("protos".into(), self.protos.target.clone()),
        ];
        if let Some(q) = &self.queue {
            v.push(("queue".into(), q.clone()));
        }
        Ok(v)
    }

    fn load(&mut self, get: &dyn Fn(&str) -> Option<Tensor>) -> Result<()> {
        self.prior = super::component::need(get, "cpsl", "prior")?.to_vec1()?;
        self.protos.target = super::component::need(get, "cpsl", "protos")?;
        self.queue = get("queue");
        Ok(())
    }
}
