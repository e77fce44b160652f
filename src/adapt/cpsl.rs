//! CPSL (class-balanced pixel-level self-labeling, methods.md section 1): prototype
//! rectification of the pseudo labels, the Sinkhorn self-labeling loss towards a target class
//! prior over a bounded feature queue, and the weak-to-strong prototype consistency.

use super::component::{need, Component, Flow, Geometry, Labels, Step};
use super::config;
use super::contrast::cosine;
use super::region::masked_mean;
use super::sinkhorn::balanced_assignment;
use crate::model::ops::log_softmax_last_dim as log_softmax;
use crate::model::Student;
use crate::stats::SourceStats;
use crate::SeededRng;
use candle_core::{Device, Result, Tensor, Var, D};
use rand::Rng;

/// CPSL's state. Online, two choices differ from the paper's offline stage 1 (both in the
/// direction of its intent):
/// - the target prior r is estimated from the teacher's labels over the first
///   `prior_steps` steps (CPSL: once, from the warm-up model over the target set) and then
///   frozen, and a share `prior_mix` of the source prior is mixed in, so a class the teacher
///   stops predicting keeps assignment mass instead of being starved;
/// - the second Sinkhorn pass over a queue of EMA logits is left out (the feature pass is
///   kept); the pixel-queue contrast (weight 0.001) too.
pub struct Cpsl {
    cfg: config::Cpsl,
    /// Learnable prototypes P [C, D] (unit-norm source class means at start).
    protos: Var,
    /// EMA of P: rectification and the consistency's teacher.
    ema: Tensor,
    source_prior: Vec<f32>,
    /// Teacher label histogram summed over the estimation steps, and how many steps it holds.
    hist: Vec<f64>,
    seen: u64,
    /// Teacher features [Q, D] of past pixels (FIFO).
    queue: Option<Tensor>,
    /// This step's prototype weights softmax(cos(f, mu_ema) / tau) [N, C] and sampled features.
    weights: Option<Tensor>,
    picked: Option<Tensor>,
}

impl Cpsl {
    pub fn new(cfg: &config::Cpsl, stats: &SourceStats) -> Result<Self> {
        let init = stats.prototypes.detach().copy()?;
        let c = init.dim(0)?;
        Ok(Self {
            cfg: cfg.clone(),
            protos: Var::from_tensor(&init)?,
            ema: init,
            source_prior: stats.prior.to_vec1()?,
            hist: vec![0.0; c],
            seen: 0,
            queue: None,
            weights: None,
            picked: None,
        })
    }

    /// r: the frozen (or still forming) target estimate mixed with the source prior; before any
    /// estimate, the source prior.
    pub fn prior(&self) -> Vec<f32> {
        let total: f64 = self.hist.iter().sum();
        let mix = self.cfg.prior_mix as f32;
        self.source_prior
            .iter()
            .zip(&self.hist)
            .map(|(&s, &h)| match total > 0.0 {
                true => (1.0 - mix) * (h / total) as f32 + mix * s,
                false => s,
            })
            .collect()
    }

    /// Folds the teacher's (unrectified) labels into the prior estimate while it is open.
    fn observe_prior(&mut self, l: &Labels) -> Result<()> {
        if self.seen >= self.cfg.prior_steps {
            return Ok(());
        }
        let argmax: Vec<u32> = l.probs.argmax(D::Minus1)?.to_vec1()?;
        argmax.iter().for_each(|&k| self.hist[k as usize] += 1.0);
        self.seen += 1;
        Ok(())
    }

    /// The self-labeling loss: Sinkhorn assignments of sampled teacher features (with the
    /// queue) to the prototypes, class marginals following the prior, supervise the student's
    /// prototype scores at the same pixels; the gradient reaches the student and P.
    fn self_labeling(&mut self, step: &Step, rng: &mut SeededRng) -> Result<Option<Tensor>> {
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
        let prior = self.prior();
        let c = prior.len();
        let idx = Tensor::new(idx.as_slice(), step.labels.feats.device())?;
        let ft = step.labels.feats.index_select(&idx, 0)?;
        let all = match &self.queue {
            Some(q) => Tensor::cat(&[q, &ft], 0)?,
            None => ft.clone(),
        };
        let rows = all.dim(0)?;
        let p = self.protos.as_tensor();
        let sc: Vec<f32> = cosine(&all, &p.detach())?.flatten_all()?.to_vec1()?;
        let q = balanced_assignment(&sc, rows, &prior, self.cfg.eps, self.cfg.iters);
        let m = ft.dim(0)?;
        let q = Tensor::from_vec(q[(rows - m) * c..].to_vec(), (m, c), ft.device())?;
        let fs = step.out().feats.index_select(&idx, 0)?;
        let lp = log_softmax(&(cosine(&fs, p)? / self.cfg.tau)?)?;
        let l = (q * lp)?.sum(D::Minus1)?.mean_all()?.neg()?;
        self.picked = Some(ft);
        Ok(Some((l * self.cfg.weight)?))
    }

    /// KL from the teacher's EMA-prototype weights to the student's, on pixels both views share.
    fn consistency(&self, step: &Step) -> Result<Tensor> {
        let pt = self.weights.as_ref().expect("set by the label hook");
        let out = step.out();
        let ls = log_softmax(&(cosine(&out.feats, &self.ema)? / self.cfg.tau)?)?;
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

    /// Rectification: each pixel's class scores become w * p / sum(w * p) with
    /// w = softmax(cos(f, mu_ema) / tau); its label and confidence are the rectified ones.
    fn label(&mut self, l: &mut Labels, _t: u64) -> Result<Flow> {
        self.observe_prior(l)?;
        let w = candle_nn::ops::softmax_last_dim(&(cosine(&l.feats, &self.ema)? / self.cfg.tau)?)?;
        let rect = (&w * &l.probs)?;
        let rect = rect.broadcast_div(&(rect.sum_keepdim(D::Minus1)? + 1e-12)?)?;
        l.rescore(rect)?;
        self.weights = Some(w);
        Ok(Flow::Go)
    }

    fn losses(
        &mut self,
        step: &mut Step,
        _student: &Student,
        rng: &mut SeededRng,
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

    fn update(&mut self, _step: &Step, _student: &Student, _rng: &mut SeededRng) -> Result<()> {
        let m = self.cfg.proto_ema;
        self.ema = ((&self.ema * m)? + (self.protos.as_tensor().detach() * (1.0 - m))?)?;
        self.push_queue()
    }

    fn params(&self) -> Vec<(String, Var, f64)> {
        vec![("prototypes".into(), self.protos.clone(), self.cfg.proto_lr)]
    }

    fn bytes(&self, g: &Geometry) -> (usize, String) {
        (
            (self.cfg.queue + 4 * g.classes) * g.dim * 4,
            format!("queue {}, prototypes", self.cfg.queue),
        )
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let dev = &Device::Cpu;
        let hist: Vec<f32> = self.hist.iter().map(|&v| v as f32).collect();
        let mut v = vec![
            ("prior_hist".into(), Tensor::new(hist.as_slice(), dev)?),
            ("prior_steps".into(), Tensor::new(self.seen as i64, dev)?),
            ("prior".into(), Tensor::new(self.prior().as_slice(), dev)?),
            ("protos".into(), self.protos.as_tensor().copy()?),
            ("protos_ema".into(), self.ema.clone()),
        ];
        if let Some(q) = &self.queue {
            v.push(("queue".into(), q.clone()));
        }
        Ok(v)
    }

    fn load(&mut self, get: &dyn Fn(&str) -> Option<Tensor>) -> Result<()> {
        let hist: Vec<f32> = need(get, "cpsl", "prior_hist")?.to_vec1()?;
        self.hist = hist.into_iter().map(f64::from).collect();
        self.seen = need(get, "cpsl", "prior_steps")?
            .to_dtype(candle_core::DType::I64)?
            .to_scalar::<i64>()? as u64;
        self.protos.set(&need(get, "cpsl", "protos")?)?;
        self.ema = need(get, "cpsl", "protos_ema")?;
        self.queue = get("queue");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapt::thresholds::Selection;

    fn t(v: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    fn stats(prior: &[f32]) -> SourceStats {
        let protos = t(&[1.0, 0.0, 0.0, 1.0], (2, 2));
        SourceStats {
            mean: protos.clone(),
            var: protos.ones_like().unwrap(),
            count: Tensor::new(&[10f32, 10.0], &Device::Cpu).unwrap(),
            prior: Tensor::new(prior, &Device::Cpu).unwrap(),
            prototypes: protos,
            bank: None,
            frames: None,
            norm: None,
            origin: crate::stats::Origin::Labels,
        }
    }

    fn labels(probs: &[f32], feats: &[f32], n: usize) -> Labels {
        let p = t(probs, (n, 2));
        Labels::from_scores(p.clone(), t(feats, (n, 2)), (1, 1, n), p).unwrap()
    }

    #[test]
    fn a_rectified_pixel_is_judged_by_its_rectified_confidence() {
        let mut cpsl = Cpsl::new(&config::Cpsl::default(), &stats(&[0.5, 0.5])).unwrap();
        // The classifier says class 0 at 0.95; the feature sits nearer class 1's prototype.
        let mut l = labels(&[0.95, 0.05], &[0.5, 0.8], 1);
        cpsl.label(&mut l, 0).unwrap();
        let norm = (0.5f64 * 0.5 + 0.8 * 0.8).sqrt();
        let (c0, c1) = (0.5 / norm, 0.8 / norm);
        let w0 = 1.0 / (1.0 + ((c1 - c0) / 0.08).exp());
        let w1 = 1.0 - w0;
        let want = 0.05 * w1 / (0.95 * w0 + 0.05 * w1);
        assert_eq!(l.pred, vec![1], "rectification moves the label to class 1");
        assert!(
            (l.conf[0] as f64 - want).abs() < 1e-4,
            "{} vs {want}",
            l.conf[0]
        );
        // At 0.9 the rectified class's confidence (about 0.74) fails; the classifier's 0.95
        // for the class it no longer carries must not count.
        Selection::Fixed(0.9).label(&mut l, 0).unwrap();
        assert_eq!(l.keep, vec![false]);
        let mut l = labels(&[0.95, 0.05], &[0.5, 0.8], 1);
        cpsl.label(&mut l, 0).unwrap();
        Selection::Fixed(0.7).label(&mut l, 0).unwrap();
        assert_eq!(l.selected(), vec![1]);
    }

    #[test]
    fn the_prior_keeps_a_floor_for_a_class_the_teacher_stopped_predicting() {
        let cfg = config::Cpsl {
            prior_steps: 2,
            prior_mix: 0.2,
            ..Default::default()
        };
        let mut cpsl = Cpsl::new(&cfg, &stats(&[0.5, 0.5])).unwrap();
        assert_eq!(
            cpsl.prior(),
            vec![0.5, 0.5],
            "the source prior before any estimate"
        );
        // The teacher predicts class 0 everywhere for the estimation steps.
        for _ in 0..2 {
            let mut l = labels(&[0.9, 0.1, 0.8, 0.2], &[1.0, 0.0, 1.0, 0.1], 2);
            cpsl.label(&mut l, 0).unwrap();
        }
        let r = cpsl.prior();
        assert!(
            (r[0] - 0.9).abs() < 1e-6 && (r[1] - 0.1).abs() < 1e-6,
            "{r:?}"
        );
        // Frozen afterwards: a later all-class-1 stream does not move it.
        let mut l = labels(&[0.1, 0.9, 0.1, 0.9], &[0.0, 1.0, 0.0, 1.0], 2);
        cpsl.label(&mut l, 0).unwrap();
        assert_eq!(cpsl.prior(), r);
        // And the assignment gives class 1 its floor of the mass even when every score
        // prefers class 0.
        let scores: Vec<f32> = (0..100).flat_map(|_| [0.9f32, 0.1]).collect();
        let q = balanced_assignment(&scores, 100, &r, 0.05, 50);
        let share1: f32 = (0..100).map(|i| q[i * 2 + 1]).sum::<f32>() / 100.0;
        assert!((share1 - 0.1).abs() < 1e-3, "{share1}");
    }

    #[test]
    fn the_prototypes_are_learnable_and_their_ema_follows() {
        let cfg = config::Cpsl::default();
        let cpsl = Cpsl::new(&cfg, &stats(&[0.5, 0.5])).unwrap();
        let params = cpsl.params();
        assert_eq!(params.len(), 1);
        assert_eq!(params[0].2, 5.0, "CPSL trains its prototypes at lr x5");
        let f = Var::from_tensor(&t(&[0.3, 0.7], (1, 2))).unwrap();
        let lp =
            log_softmax(&(cosine(f.as_tensor(), params[0].1.as_tensor()).unwrap() / 0.08).unwrap())
                .unwrap();
        let g = lp
            .narrow(1, 0, 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gp = g
            .get(params[0].1.as_tensor())
            .expect("P receives a gradient");
        let norm = gp
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0);
    }
}
