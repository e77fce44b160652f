//! One online adaptation step on a batch of target frames: the EMA teacher labels the weak view,
//! pseudo labels are selected and rectified, the student learns from the strong view under the
//! switched-on losses, then teacher, thresholds, prototypes, queue, bank and prior move on.
//! Target labels never enter here.

use super::bank::InstanceBank;
use super::bidirectional::{bidirectional_loss, sample_source_pixels, Prototypes};
use super::contrast::{cosine, dist_cl, proto_cl, proto_reg};
use super::region;
use super::sinkhorn::balanced_assignment;
use super::thresholds::InstanceThresholds;
use crate::loss::cross_entropy;
use crate::model::ema::{detached_copy, ema_update};
use crate::model::nn::log_softmax;
use crate::model::{Segformer, Student, TensorMap};
use crate::optim::{AdamW, AdamWConfig, ParamGroup, StepOutcome};
use crate::stats::SourceStats;
use candle_core::{DType, Result, Tensor, D};
use rand::rngs::StdRng;
use rand::Rng;

pub const IGNORE: u32 = 255;

/// How confident pixels are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Threshold {
    /// Plain mean-teacher self-training: one fixed confidence for every class.
    Fixed(f32),
    /// HIAST's instance-adaptive per-class thresholds.
    Instance { alpha: f32, beta: f32, gamma: f32 },
}

#[derive(Debug, Clone, Copy)]
pub struct Cpsl {
    pub tau: f64,
    pub eps: f32,
    pub iters: usize,
    pub queue: usize,
    pub pixels: usize,
    pub weight: f64,
    pub prior_momentum: f64,
}

#[derive(Debug, Clone, Copy)]
pub struct Region {
    pub smooth: f64,
    pub entropy: f64,
    pub consistency: f64,
}

#[derive(Debug, Clone, Copy)]
pub struct Sepico {
    pub tau: f64,
    pub weight: f64,
    pub reg: f64,
    /// ProtoCL (centroids only) instead of DistCL.
    pub centroid_only: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct Bida {
    pub tau: f64,
    pub weight: f64,
    pub momentum: f64,
    pub ramp: u64,
    pub per_class: usize,
    /// Keep only pseudo labels that label transfer agrees with.
    pub check: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct Dida {
    pub bank: usize,
    pub momentum: f64,
    pub weight: f64,
}

/// What one step does; each component is off when `None`.
#[derive(Debug, Clone)]
pub struct AdaptConfig {
    pub lr: f64,
    pub head_lr_mult: f64,
    pub weight_decay: f64,
    pub max_grad_norm: Option<f64>,
    pub ema: f64,
    pub threshold: Threshold,
    pub cpsl: Option<Cpsl>,
    pub region: Option<Region>,
    pub sepico: Option<Sepico>,
    pub bida: Option<Bida>,
    pub dida: Option<Dida>,
    /// TENT instead of self-training: entropy of the model's own predictions, only the norm
    /// layers' affine parameters train, no teacher.
    pub tent: bool,
}

/// Loss terms of the last step, for logs and tests.
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    pub total: f32,
    pub terms: Vec<(&'static str, f32)>,
    /// Share of pixels kept as pseudo labels.
    pub kept: f32,
    pub outcome: Option<StepOutcome>,
}

pub struct Adapter {
    pub cfg: AdaptConfig,
    pub student: Student,
    pub teacher: Segformer,
    pub opt: AdamW,
    pub thresholds: InstanceThresholds,
    pub protos: Prototypes,
    pub bank: Option<InstanceBank>,
    /// Running estimate of the target class distribution (CPSL's r).
    pub prior: Vec<f32>,
    /// Teacher features [Q, D] of past pixels for the Sinkhorn assignment (FIFO).
    pub queue: Option<Tensor>,
    pub stats: SourceStats,
    pub step: u64,
}

fn is_norm_affine(name: &str) -> bool {
    name.contains("norm") && !name.contains("running")
}

impl Adapter {
    pub fn new(
        cfg: AdaptConfig,
        model_cfg: &crate::config::SegformerConfig,
        tensors: &TensorMap,
        stats: SourceStats,
    ) -> Result<Self> {
        let student = Student::new(model_cfg, tensors)?;
        let teacher = Segformer::new(model_cfg, detached_copy(&student.model)?)?;
        let vars = student
            .vars
            .iter()
            .filter(|(n, _)| !cfg.tent || is_norm_affine(n))
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
                max_grad_norm: cfg.max_grad_norm,
                ..Default::default()
            },
        )?;
        let c = model_cfg.num_labels();
        let (alpha, beta, gamma) = match cfg.threshold {
            Threshold::Instance { alpha, beta, gamma } => (alpha, beta, gamma),
            Threshold::Fixed(_) => (0.5, 0.9, 8.0),
        };
        let bida = cfg.bida.map(|b| (b.momentum, b.ramp)).unwrap_or((0.99, 0));
        let protos = Prototypes::new(&stats.prototypes, bida.0, bida.1)?;
        let bank = match cfg.dida {
            Some(d) => Some(InstanceBank::from_source(
                &stats.mean,
                &stats.prior,
                &stats.count,
                d.bank,
                d.momentum,
            )?),
            None => None,
        };
        let prior = stats.prior.to_vec1::<f32>()?;
        Ok(Self {
            cfg,
            student,
            teacher,
            opt,
            thresholds: InstanceThresholds::new(c, 0.9, alpha, beta, gamma),
            protos,
            bank,
            prior,
            queue: None,
            stats,
            step: 0,
        })
    }

    /// One step on `weak` / `strong` views of the same frames ([B, 3, H, W], same geometry).
    pub fn step(&mut self, weak: &Tensor, strong: &Tensor, rng: &mut StdRng) -> Result<StepReport> {
        if self.cfg.tent {
            return self.tent_step(strong, rng);
        }
        let c = self.prior.len();
        let t_out = self.teacher.forward(weak, None)?;
        let (b, h, w, _) = t_out.logits.dims4()?;
        let d = t_out.embed.dim(3)?;
        let n = b * h * w;
        let p_t = candle_nn::ops::softmax_last_dim(&t_out.logits.reshape((n, c))?)?; // [N, C]
        let f_t = t_out.embed.reshape((n, d))?; // [N, D]

        // Pseudo labels: CPSL prototype rectification, then the confidence selection.
        let scores = if self.cfg.cpsl.is_some() {
            let tau = self.cfg.cpsl.map(|k| k.tau).unwrap_or(0.08);
            let wgt =
                candle_nn::ops::softmax_last_dim(&(cosine(&f_t, &self.protos.target)? / tau)?)?;
            (wgt * &p_t)?
        } else {
            p_t.clone()
        };
        let pred: Vec<u32> = scores.argmax(D::Minus1)?.to_vec1()?;
        let conf: Vec<f32> = p_t.max(D::Minus1)?.to_vec1()?;
        let pred_u8: Vec<u8> = pred.iter().map(|&p| p as u8).collect();
        let mut keep = match self.cfg.threshold {
            Threshold::Fixed(t) => conf.iter().map(|&p| p >= t).collect::<Vec<bool>>(),
            Threshold::Instance { .. } => {
                let per = h * w;
                for i in 0..b {
                    self.thresholds.update(
                        &conf[i * per..(i + 1) * per],
                        &pred_u8[i * per..(i + 1) * per],
                    );
                }
                self.thresholds.select(&conf, &pred_u8)
            }
        };
        if let Some(bd) = self.cfg.bida {
            if bd.check {
                let (transfer, _) = self.protos.transfer(&f_t, self.step)?;
                let transfer: Vec<u32> = transfer.to_vec1()?;
                keep.iter_mut()
                    .zip(transfer.iter().zip(&pred))
                    .for_each(|(k, (t, p))| *k &= t == p);
            }
        }
        let labels: Vec<u32> = pred
            .iter()
            .zip(&keep)
            .map(|(&p, &k)| if k { p } else { IGNORE })
            .collect();
        let kept = keep.iter().filter(|&&k| k).count() as f32 / n.max(1) as f32;
        let dev = weak.device();
        let y = Tensor::from_vec(labels.clone(), n, dev)?;
        let keep_t = Tensor::from_vec(keep.iter().map(|&k| k as u8).collect::<Vec<_>>(), n, dev)?;
        let ignored_t =
            Tensor::from_vec(keep.iter().map(|&k| (!k) as u8).collect::<Vec<_>>(), n, dev)?;

        // Student on the strong view.
        let s_out = self.student.model.forward(strong, Some(rng))?;
        let logits = s_out.logits.reshape((n, c))?;
        let f_s = s_out.embed.reshape((n, d))?;
        let mut terms: Vec<(&'static str, Tensor)> =
            vec![("ce", cross_entropy(&logits, &y, None, IGNORE)?)];
        if let Some(r) = self.cfg.region {
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
        if let Some(sp) = self.cfg.sepico {
            let l = if sp.centroid_only {
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
        if let Some(k) = self.cfg.cpsl {
            let idx: Vec<u32> = (0..k.pixels.min(n))
                .map(|_| rng.random_range(0..n as u32))
                .collect();
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
            let q = balanced_assignment(&sc, rows, &self.prior, k.eps, k.iters);
            let m = ft.dim(0)?;
            let q = Tensor::from_vec(q[(rows - m) * c..].to_vec(), (m, c), dev)?;
            let fs = f_s.index_select(&idx, 0)?;
            let lp = log_softmax(&(cosine(&fs, &self.protos.target)? / k.tau)?)?;
            let l = (q * lp)?.sum(D::Minus1)?.mean_all()?.neg()?;
            terms.push(("cpsl", (l * k.weight)?));
            picked = Some(ft);
        }
        if let Some(bd) = self.cfg.bida {
            let (fs_src, ys) = sample_source_pixels(
                &self.stats.mean,
                &self.stats.var,
                &self.stats.count,
                bd.per_class,
                rng,
            )?;
            let l = bidirectional_loss(&f_s, &y, &fs_src, &ys, &self.protos, bd.tau, IGNORE)?;
            terms.push(("bida", (l * bd.weight)?));
        }
        if let (Some(dd), Some(bank)) = (self.cfg.dida, &self.bank) {
            let probs = candle_nn::ops::softmax_last_dim(&logits)?;
            terms.push(("dida", bank.instance_loss(&f_t, &f_s, &probs, dd.weight)?));
        }
        let mut total = terms[0].1.clone();
        for (_, t) in &terms[1..] {
            total = (total + t)?;
        }
        let total_v = total.to_scalar::<f32>()?;
        let outcome = if total_v.is_finite() {
            let grads = total.backward()?;
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
        };
        if outcome == StepOutcome::NonFinite {
            return Ok(report);
        }
        // The teacher starts as a trained model, not a random one: no momentum warm-up.
        ema_update(&self.teacher, &self.student.model, self.cfg.ema)?;
        // State that follows the teacher: prototypes, bank, queue, class prior.
        self.protos.update(&f_t, &labels)?;
        if let Some(bank) = &mut self.bank {
            bank.update(&f_t, &labels)?;
        }
        if let (Some(k), Some(ft)) = (self.cfg.cpsl, picked) {
            let q = match self.queue.take() {
                Some(q) => Tensor::cat(&[&q, &ft], 0)?,
                None => ft,
            };
            let len = q.dim(0)?;
            self.queue = Some(if len > k.queue {
                q.narrow(0, len - k.queue, k.queue)?.copy()?
            } else {
                q
            });
            let mut hist = vec![0f32; c];
            pred.iter()
                .for_each(|&p| hist[p as usize] += 1.0 / n as f32);
            let m = k.prior_momentum as f32;
            self.prior
                .iter_mut()
                .zip(&hist)
                .for_each(|(r, h)| *r = m * *r + (1.0 - m) * h);
        }
        self.step += 1;
        Ok(report)
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
        })
    }
}

/// The method presets of the ablation: baselines, each component alone on top of plain
/// mean-teacher self-training, and everything together.
pub fn preset(name: &str) -> Option<AdaptConfig> {
    let base = AdaptConfig {
        lr: 6e-5,
        head_lr_mult: 10.0,
        weight_decay: 0.01,
        max_grad_norm: Some(10.0),
        ema: 0.999,
        threshold: Threshold::Fixed(0.968),
        cpsl: None,
        region: None,
        sepico: None,
        bida: None,
        dida: None,
        tent: false,
    };
    let ias = Threshold::Instance {
        alpha: 0.5,
        beta: 0.9,
        gamma: 8.0,
    };
    let cpsl = Cpsl {
        tau: 0.08,
        eps: 0.05,
        iters: 3,
        queue: 4096,
        pixels: 256,
        weight: 0.1,
        prior_momentum: 0.99,
    };
    let region = Region {
        smooth: 0.1,
        entropy: 1.0,
        consistency: 0.5,
    };
    let sepico = Sepico {
        tau: 100.0,
        weight: 1.0,
        reg: 1.0,
        centroid_only: false,
    };
    let bida = Bida {
        tau: 0.1,
        weight: 0.1,
        momentum: 0.99,
        ramp: 500,
        per_class: 16,
        check: false,
    };
    let dida = Dida {
        bank: 100,
        momentum: 0.999,
        weight: 0.5,
    };
    Some(match name {
        "tent" => AdaptConfig {
            tent: true,
            lr: 1e-4,
            ..base
        },
        "plain" => base,
        "ias" => AdaptConfig {
            threshold: ias,
            ..base
        },
        "cpsl" => AdaptConfig {
            cpsl: Some(cpsl),
            ..base
        },
        "region" => AdaptConfig {
            region: Some(region),
            ..base
        },
        "sepico" => AdaptConfig {
            sepico: Some(sepico),
            ..base
        },
        "protocl" => AdaptConfig {
            sepico: Some(Sepico {
                centroid_only: true,
                ..sepico
            }),
            ..base
        },
        "bida" => AdaptConfig {
            bida: Some(bida),
            ..base
        },
        "dida" => AdaptConfig {
            dida: Some(dida),
            ..base
        },
        "full" => AdaptConfig {
            threshold: ias,
            cpsl: Some(cpsl),
            region: Some(region),
            sepico: Some(sepico),
            bida: Some(bida),
            dida: Some(dida),
            ..base
        },
        _ => return None,
    })
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
        m.insert("adapt.step".into(), Tensor::new(self.step as i64, &dev)?);
        Ok(m)
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
        a.step = get("adapt.step")?
            .to_dtype(DType::I64)?
            .to_scalar::<i64>()? as u64;
        Ok(a)
    }
}
