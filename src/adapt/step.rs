//! One online adaptation step on a batch of target frames: the EMA teacher labels the weak view,
//! pseudo labels are selected and rectified, the student learns from the strong view under the
//! switched-on losses, then teacher, thresholds, prototypes, queue, bank and prior move on.
//! Target labels never enter here.

use super::bank::InstanceBank;
use super::bidirectional::{
    bidirectional_loss, pick_source_pixels, sample_source_pixels, Prototypes,
};
use super::contrast::{cosine, dist_cl, proto_cl, proto_reg};
use super::guard::{stochastic_restore, CollapseMonitor};
use super::hpla::CopyPaste;
use super::region;
use super::replay::{cell_labels, Replay};
use super::sinkhorn::balanced_assignment;
use super::thresholds::InstanceThresholds;
use super::AdaptConfig;
use crate::loss::{cross_entropy, flatten_pixels};
use crate::model::ema::{detached_copy, ema_update, ema_update_where};
use crate::model::ops::log_softmax_last_dim as log_softmax;
use crate::model::{Segformer, Student, TensorMap};
use crate::optim::{AdamW, AdamWConfig, ParamGroup, StepOutcome};
use crate::stats::SourceStats;
use candle_core::{DType, Result, Tensor, D};
use rand::rngs::StdRng;
use rand::Rng;
use std::sync::Arc;

pub const IGNORE: u32 = 255;

/// Loss terms of the last step, for logs and tests.
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    pub total: f32,
    pub terms: Vec<(&'static str, f32)>,
    /// Share of pixels kept as pseudo labels.
    pub kept: f32,
    pub outcome: Option<StepOutcome>,
    /// The teacher's predictions left their running band: nothing was updated, and the runner
    /// should roll back.
    pub collapsed: bool,
}

pub struct Adapter {
    pub cfg: AdaptConfig,
    pub student: Student,
    pub teacher: Segformer,
    pub opt: AdamW,
    pub thresholds: InstanceThresholds,
    pub protos: Prototypes,
    pub bank: Option<InstanceBank>,
    pub paste: Option<CopyPaste>,
    /// Labelled source frames (shared, never changed by a step).
    pub replay: Option<Arc<Replay>>,
    pub monitor: CollapseMonitor,
    /// Source values of the trainable parameters, kept for CoTTA's stochastic restore.
    source: Vec<Tensor>,
    /// Running estimate of the target class distribution (CPSL's r).
    pub prior: Vec<f32>,
    /// Teacher features [Q, D] of past pixels for the Sinkhorn assignment (FIFO).
    pub queue: Option<Tensor>,
    pub stats: SourceStats,
    pub step: u64,
}

/// Copies of the student's parameters as they are now (the source weights at start).
fn opt_source(student: &Student) -> Result<Vec<Tensor>> {
    student
        .vars
        .iter()
        .map(|(_, v)| v.as_tensor().copy())
        .collect()
}

impl Adapter {
    pub fn new(
        cfg: AdaptConfig,
        model_cfg: &crate::config::SegformerConfig,
        tensors: &TensorMap,
        stats: SourceStats,
    ) -> Result<Self> {
        let student = Student::with_trainable(model_cfg, tensors, |n| cfg.trains(n))?;
        let teacher = Segformer::new(model_cfg, detached_copy(&student.model)?)?;
        let vars = student
            .vars
            .iter()
            .map(|(n, v)| {
                (
                    n.clone(),
                    v.clone(),
                    crate::train::param_group(n, cfg.head_lr_mult),
                )
            })
            .collect::<Vec<(String, candle_core::Var, ParamGroup)>>();
        let opt = AdamW::new(
            vars,
            AdamWConfig {
                weight_decay: cfg.weight_decay,
                max_grad_norm: Some(cfg.max_grad_norm),
                ..Default::default()
            },
        )?;
        let c = model_cfg.num_labels();
        let protos = Prototypes::new(&stats.prototypes, cfg.bida.momentum, cfg.bida.ramp)?;
        let bank = match cfg.dida.on {
            true => Some(InstanceBank::from_source(
                &stats.mean,
                &stats.prior,
                &stats.count,
                cfg.dida.bank,
                cfg.dida.momentum,
            )?),
            false => None,
        };
        let paste = cfg
            .hpla
            .on
            .then(|| CopyPaste::new(c, cfg.hpla.pool, cfg.hpla.hard, cfg.hpla.rounds));
        let source = match cfg.guard.restore > 0.0 {
            true => opt_source(&student)?,
            false => Vec::new(),
        };
        let prior = stats.prior.to_vec1::<f32>()?;
        let i = &cfg.ias;
        Ok(Self {
            thresholds: InstanceThresholds::new(c, 0.9, i.alpha, i.beta, i.gamma),
            monitor: CollapseMonitor::new(c, cfg.guard.band, cfg.guard.warmup),
            cfg,
            student,
            teacher,
            opt,
            protos,
            bank,
            paste,
            replay: None,
            source,
            prior,
            queue: None,
            stats,
            step: 0,
        })
    }

    /// One step on `weak` / `strong` views of the same frames ([B, 3, H, W], same geometry).
    pub fn step(&mut self, weak: &Tensor, strong: &Tensor, rng: &mut StdRng) -> Result<StepReport> {
        crate::model::ops::on_pool(|| self.step_on_pool(weak, strong, rng))
    }

    fn step_on_pool(
        &mut self,
        weak: &Tensor,
        strong: &Tensor,
        rng: &mut StdRng,
    ) -> Result<StepReport> {
        if self.cfg.tent {
            return self.tent_step(strong, rng);
        }
        let c = self.prior.len();
        let phase = crate::profile::scope("adapt: teacher");
        let t_out = self.teacher.forward(weak, None)?;
        let (b, h, w, _) = t_out.logits.dims4()?;
        let d = t_out.embed.dim(3)?;
        let n = b * h * w;
        let p_t = candle_nn::ops::softmax_last_dim(&t_out.logits.reshape((n, c))?)?; // [N, C]
        let f_t = t_out.embed.reshape((n, d))?; // [N, D]

        drop(phase);
        // Pseudo labels: CPSL prototype rectification, then the confidence selection.
        let phase = crate::profile::scope("adapt: pseudo labels and views");
        let cpsl = self.cfg.cpsl.clone();
        let proto_t = if cpsl.on {
            Some(candle_nn::ops::softmax_last_dim(
                &(cosine(&f_t, &self.protos.target)? / cpsl.tau)?,
            )?)
        } else {
            None
        };
        let scores = match &proto_t {
            Some(wgt) => (wgt * &p_t)?,
            None => p_t.clone(),
        };
        let pred: Vec<u32> = scores.argmax(D::Minus1)?.to_vec1()?;
        let conf: Vec<f32> = p_t.max(D::Minus1)?.to_vec1()?;

        if self.cfg.guard.collapse {
            let mut shares = vec![0f64; c];
            pred.iter()
                .for_each(|&p| shares[p as usize] += 1.0 / n as f64);
            let mean_conf = conf.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            if self.monitor.observe(&shares, mean_conf) {
                return Ok(StepReport {
                    collapsed: true,
                    ..Default::default()
                });
            }
        }

        let pred_u8: Vec<u8> = pred.iter().map(|&p| p as u8).collect();
        let mut keep = if self.cfg.ias.on {
            let per = h * w;
            for i in 0..b {
                self.thresholds.update(
                    &conf[i * per..(i + 1) * per],
                    &pred_u8[i * per..(i + 1) * per],
                );
            }
            self.thresholds.select(&conf, &pred_u8)
        } else {
            conf.iter()
                .map(|&p| p >= self.cfg.threshold)
                .collect::<Vec<bool>>()
        };
        if self.cfg.bida.on && self.cfg.bida.check {
            let (transfer, _) = self.protos.transfer(&f_t, self.step)?;
            let transfer: Vec<u32> = transfer.to_vec1()?;
            keep.iter_mut()
                .zip(transfer.iter().zip(&pred))
                .for_each(|(k, (t, p))| *k &= t == p);
        }
        let labels: Vec<u32> = pred
            .iter()
            .zip(&keep)
            .map(|(&p, &k)| if k { p } else { IGNORE })
            .collect();
        let dev = weak.device();

        // HPLA: hard-class pixels of recent frames pasted into the student's view.
        let mut train_labels = labels.clone();
        let mut pasted = vec![false; n];
        let mut strong = strong.clone();
        if let Some(cp) = &mut self.paste {
            cp.update_confidence(&conf, &labels);
            let dims = strong.dims().to_vec();
            let plane = dims[1] * dims[2] * dims[3];
            let original: Vec<f32> = strong.flatten_all()?.to_vec1()?;
            let mut img = original.clone();
            for i in 0..b {
                let r = cp.paste(
                    &mut img[i * plane..(i + 1) * plane],
                    &mut train_labels[i * h * w..(i + 1) * h * w],
                    (h, w),
                    rng,
                );
                pasted[i * h * w..(i + 1) * h * w].copy_from_slice(&r.mask);
            }
            for i in 0..b {
                cp.push(
                    original[i * plane..(i + 1) * plane].to_vec(),
                    labels[i * h * w..(i + 1) * h * w].to_vec(),
                );
            }
            strong = Tensor::from_vec(img, dims, dev)?;
        }
        // Source replay: a source crop per frame for the source cross-entropy, half its classes
        // pasted onto the student's target view (ClassMix) with their true labels.
        let mut source: Option<(Tensor, Tensor)> = None;
        if self.cfg.replay.on {
            let replay = self.replay.as_ref().ok_or_else(|| {
                candle_core::Error::Msg(
                    "adapt.replay.on needs labelled source frames (adapt --replay DIR)".into(),
                )
            })?;
            (strong, source) = replay.apply(
                &strong,
                &mut train_labels,
                &mut pasted,
                (h, w),
                self.cfg.replay.mix,
                rng,
            )?;
        }
        let keep_train: Vec<bool> = keep.iter().zip(&pasted).map(|(k, p)| *k || *p).collect();
        let kept = keep_train.iter().filter(|&&k| k).count() as f32 / n.max(1) as f32;
        let y = Tensor::from_vec(train_labels.clone(), n, dev)?;
        let mask = |v: &[bool]| Tensor::from_vec(v.iter().map(|&k| k as u8).collect(), n, dev);
        let keep_t = mask(&keep_train)?;
        let ignored_t = mask(&keep_train.iter().map(|k| !k).collect::<Vec<_>>())?;
        // Pixels the teacher saw as the student sees them (not pasted by HPLA or ClassMix).
        let same_t = mask(&pasted.iter().map(|p| !p).collect::<Vec<_>>())?;

        drop(phase);
        // Student on the strong view.
        let phase = crate::profile::scope("adapt: student forward");
        let s_out = self.student.model.forward(&strong, Some(rng))?;
        let logits = s_out.logits.reshape((n, c))?;
        let f_s = s_out.embed.reshape((n, d))?;
        let mut terms: Vec<(&'static str, Tensor)> =
            vec![("ce", cross_entropy(&logits, &y, None, IGNORE)?)];
        let mut src_pixels: Option<(Tensor, Tensor)> = None;
        if let Some((xs, ys)) = &source {
            let (_, _, ih, iw) = xs.dims4()?;
            // BatchNorm's running statistics are what the teacher serves the target with: the
            // source crop normalises with its own batch statistics but must not move them.
            let running: Vec<(&Tensor, Tensor)> = self
                .student
                .model
                .raw_tensors()
                .iter()
                .filter(|(n, _)| n.contains("running_"))
                .map(|(_, t)| Ok((t, t.copy()?)))
                .collect::<Result<_>>()?;
            let out = self.student.model.forward(xs, Some(rng))?;
            for (t, saved) in &running {
                t.slice_set(saved, 0, 0)?;
            }
            let up = crate::model::ops::resize_bilinear(&out.logits, ih, iw)?;
            let l = cross_entropy(&flatten_pixels(&up)?, ys, None, IGNORE)?;
            terms.push(("source", (l * self.cfg.replay.weight)?));
            if self.cfg.bida.on {
                let (k, fh, fw, _) = out.embed.dims4()?;
                let yv: Vec<u32> = ys.to_vec1()?;
                let cells: Vec<u32> = yv
                    .chunks(ih * iw)
                    .flat_map(|plane| cell_labels(plane, (ih, iw), (fh, fw)))
                    .collect();
                src_pixels = pick_source_pixels(
                    &out.embed.reshape((k * fh * fw, d))?,
                    &cells,
                    c,
                    self.cfg.bida.per_class,
                    rng,
                )?;
            }
        }
        drop(phase);
        let phase = crate::profile::scope("adapt: losses");
        let r = self.cfg.region.clone();
        if r.on {
            terms.push(("smooth", (region::smoothing(&logits, &keep_t)? * r.smooth)?));
            terms.push((
                "entropy",
                (region::entropy(&logits, &ignored_t)? * r.entropy)?,
            ));
            terms.push((
                "consistency",
                (region::consistency(&logits, &p_t, &ignored_t)? * r.consistency)?,
            ));
        }
        let sp = self.cfg.sepico.clone();
        if sp.on {
            let l = if sp.variant == "proto" {
                proto_cl(&f_s, &y, &self.stats.mean, sp.tau, IGNORE)?
            } else {
                dist_cl(&f_s, &y, &self.stats.mean, &self.stats.var, sp.tau, IGNORE)?
            };
            terms.push(("sepico", (l * sp.weight)?));
            terms.push((
                "sepico_reg",
                (proto_reg(&f_s, &self.stats.mean, sp.tau)? * sp.reg)?,
            ));
        }
        let mut picked: Option<Tensor> = None;
        if cpsl.on {
            // Self-labeling: Sinkhorn assignments of teacher features (with the queue) towards
            // the running target prior supervise the student's prototype scores. Pasted pixels
            // have no teacher feature of their own and are left out.
            let free: Vec<u32> = (0..n as u32).filter(|&i| !pasted[i as usize]).collect();
            let idx: Vec<u32> = (0..cpsl.pixels.min(free.len()))
                .map(|_| free[rng.random_range(0..free.len())])
                .collect();
            if !idx.is_empty() {
                let idx = Tensor::new(idx.as_slice(), dev)?;
                let ft = f_t.index_select(&idx, 0)?;
                let all = match &self.queue {
                    Some(q) => Tensor::cat(&[q, &ft], 0)?,
                    None => ft.clone(),
                };
                let rows = all.dim(0)?;
                let sc: Vec<f32> = cosine(&all, &self.protos.target)?
                    .flatten_all()?
                    .to_vec1()?;
                let q = balanced_assignment(&sc, rows, &self.prior, cpsl.eps, cpsl.iters);
                let m = ft.dim(0)?;
                let q = Tensor::from_vec(q[(rows - m) * c..].to_vec(), (m, c), dev)?;
                let fs = f_s.index_select(&idx, 0)?;
                let lp = log_softmax(&(cosine(&fs, &self.protos.target)? / cpsl.tau)?)?;
                let l = (q * lp)?.sum(D::Minus1)?.mean_all()?.neg()?;
                terms.push(("cpsl", (l * cpsl.weight)?));
                picked = Some(ft);
            }
            if cpsl.consistency > 0.0 {
                let pt = proto_t.as_ref().expect("computed when CPSL is on");
                let ls = log_softmax(&(cosine(&f_s, &self.protos.target)? / cpsl.tau)?)?;
                let lt = pt.clamp(1e-8, 1.0)?.log()?;
                let kl = (pt * (lt - ls)?)?.sum(D::Minus1)?;
                let l = region::masked_mean(&kl, &same_t)?;
                terms.push(("cpsl_consist", (l * cpsl.consistency)?));
            }
        }
        let bd = self.cfg.bida.clone();
        if bd.on {
            let (fs_src, ys) = match src_pixels.take() {
                Some(p) => p,
                None => sample_source_pixels(
                    &self.stats.mean,
                    &self.stats.var,
                    &self.stats.count,
                    bd.per_class,
                    rng,
                )?,
            };
            let l = bidirectional_loss(&f_s, &y, &fs_src, &ys, &self.protos, bd.tau, IGNORE)?;
            terms.push(("bida", (l * bd.weight)?));
        }
        if let Some(bank) = &self.bank {
            let probs = candle_nn::ops::softmax_last_dim(&logits)?;
            terms.push((
                "dida",
                bank.instance_loss(&f_t, &f_s, &probs, &same_t, self.cfg.dida.weight)?,
            ));
        }
        let mut total = terms[0].1.clone();
        for (_, t) in &terms[1..] {
            total = (total + t)?;
        }
        let total_v = total.to_scalar::<f32>()?;
        drop(phase);
        let outcome = if total_v.is_finite() {
            let grads = {
                let _t = crate::profile::scope("adapt: backward");
                total.backward()?
            };
            let _t = crate::profile::scope("adapt: optimizer");
            self.opt.step(&grads, self.cfg.lr)?
        } else {
            StepOutcome::NonFinite
        };
        let report = StepReport {
            total: total_v,
            terms: terms
                .iter()
                .map(|(k, t)| (*k, t.to_scalar::<f32>().unwrap_or(f32::NAN)))
                .collect(),
            kept,
            outcome: Some(outcome),
            collapsed: false,
        };
        log::debug!("step {}: {:?}", self.step, report.terms);
        if outcome == StepOutcome::NonFinite {
            return Ok(report);
        }
        self.restore_towards_source(rng)?;
        let _t = crate::profile::scope("adapt: EMA and state");
        // The teacher starts as a trained model, not a random one: no momentum warm-up.
        ema_update_where(&self.teacher, &self.student.model, self.cfg.ema, |n| {
            self.cfg.trains(n)
        })?;
        // State that follows the teacher: prototypes, bank, queue, class prior.
        self.protos.update(&f_t, &labels)?;
        if let Some(bank) = &mut self.bank {
            bank.update(&f_t, &labels)?;
        }
        if let Some(ft) = picked {
            let q = match self.queue.take() {
                Some(q) => Tensor::cat(&[&q, &ft], 0)?,
                None => ft,
            };
            let len = q.dim(0)?;
            self.queue = Some(if len > cpsl.queue {
                q.narrow(0, len - cpsl.queue, cpsl.queue)?.copy()?
            } else {
                q
            });
        }
        if cpsl.on {
            let mut hist = vec![0f32; c];
            pred.iter()
                .for_each(|&p| hist[p as usize] += 1.0 / n as f32);
            let m = cpsl.prior_momentum as f32;
            self.prior
                .iter_mut()
                .zip(&hist)
                .for_each(|(r, h)| *r = m * *r + (1.0 - m) * h);
        }
        self.step += 1;
        Ok(report)
    }

    fn restore_towards_source(&self, rng: &mut StdRng) -> Result<()> {
        if self.source.is_empty() {
            return Ok(());
        }
        let vars: Vec<candle_core::Var> =
            self.student.vars.iter().map(|(_, v)| v.clone()).collect();
        stochastic_restore(&vars, &self.source, self.cfg.guard.restore, rng)
    }

    /// TENT: minimise the entropy of the model's own predictions; only norm affines move.
    fn tent_step(&mut self, x: &Tensor, rng: &mut StdRng) -> Result<StepReport> {
        let out = self.student.model.forward(x, Some(rng))?;
        let c = out.logits.dim(3)?;
        let logits = out.logits.reshape(((), c))?;
        let all = Tensor::ones(logits.dim(0)?, DType::U8, x.device())?;
        let loss = region::entropy(&logits, &all)?;
        let v = loss.to_scalar::<f32>()?;
        let outcome = if v.is_finite() {
            self.opt.step(&loss.backward()?, self.cfg.lr)?
        } else {
            StepOutcome::NonFinite
        };
        // The served model is the adapted one itself.
        if outcome != StepOutcome::NonFinite {
            ema_update(&self.teacher, &self.student.model, 0.0)?;
        }
        self.step += 1;
        Ok(StepReport {
            total: v,
            terms: vec![("entropy", v)],
            kept: 1.0,
            outcome: Some(outcome),
            collapsed: false,
        })
    }
}

impl Adapter {
    /// Everything a restarted run needs: both models, optimizer, thresholds, prototypes and
    /// bias, bank, prior, queue and the step count.
    pub fn state(&self) -> Result<TensorMap> {
        let dev = candle_core::Device::Cpu;
        let mut m = crate::model::prefixed(self.student.model.tensors()?, "student.");
        m.extend(crate::model::prefixed(self.teacher.tensors()?, "teacher."));
        m.extend(self.opt.state()?);
        m.insert(
            "adapt.thresholds".into(),
            Tensor::new(self.thresholds.theta.as_slice(), &dev)?,
        );
        m.insert(
            "adapt.prior".into(),
            Tensor::new(self.prior.as_slice(), &dev)?,
        );
        m.insert("adapt.protos.target".into(), self.protos.target.clone());
        m.insert("adapt.protos.bias".into(), self.protos.bias.clone());
        if let Some(b) = &self.bank {
            m.insert("adapt.bank.feats".into(), b.feats.clone());
            m.insert(
                "adapt.bank.labels".into(),
                Tensor::new(b.labels.as_slice(), &dev)?,
            );
        }
        if let Some(q) = &self.queue {
            m.insert("adapt.queue".into(), q.clone());
        }
        if let Some(p) = &self.paste {
            for (k, t) in p.state()? {
                m.insert(format!("adapt.hpla.{k}"), t);
            }
        }
        m.insert("adapt.step".into(), Tensor::new(self.step as i64, &dev)?);
        Ok(m)
    }

    /// Goes back to a saved state in place (the collapse monitor starts over).
    pub fn rollback(&mut self, state: &TensorMap) -> Result<()> {
        let cfg = self.teacher.cfg.clone();
        let replay = self.replay.take();
        *self = Adapter::restore(self.cfg.clone(), &cfg, self.stats.clone(), state)?;
        // The source frames are not part of the saved state: they stay on board.
        self.replay = replay;
        Ok(())
    }

    /// Rebuilds an adapter from [`Adapter::state`]; `cfg` must switch on the same parts.
    pub fn restore(
        cfg: AdaptConfig,
        model_cfg: &crate::config::SegformerConfig,
        stats: SourceStats,
        state: &TensorMap,
    ) -> Result<Self> {
        let get = |k: &str| {
            state
                .get(k)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg(format!("adaptation state lacks {k}")))
        };
        let mut a = Adapter::new(
            cfg,
            model_cfg,
            &crate::model::with_prefix(state, "student."),
            stats,
        )?;
        a.teacher = Segformer::new(model_cfg, crate::model::with_prefix(state, "teacher."))?;
        a.opt.load_state(state)?;
        a.thresholds.theta = get("adapt.thresholds")?.to_vec1()?;
        a.prior = get("adapt.prior")?.to_vec1()?;
        a.protos.target = get("adapt.protos.target")?;
        a.protos.bias = get("adapt.protos.bias")?;
        if let Some(b) = &mut a.bank {
            b.feats = get("adapt.bank.feats")?;
            b.labels = get("adapt.bank.labels")?.to_vec1()?;
        }
        a.queue = state.get("adapt.queue").cloned();
        if let Some(p) = &mut a.paste {
            p.load_state(|k| state.get(&format!("adapt.hpla.{k}")).cloned())?;
        }
        a.step = get("adapt.step")?
            .to_dtype(DType::I64)?
            .to_scalar::<i64>()? as u64;
        Ok(a)
    }
}
