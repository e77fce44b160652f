//! DIDA's labeled instance bank: K slots of (decoder embedding, class), each one source
//! instance (a class's mean embedding in one source image) stored with the source statistics,
//! taken class-balanced; slots move by EMA towards their class's current mean every `interval`
//! steps; the instance-level loss and pseudo-label regeneration run at feature resolution
//! (DIDA's full-resolution maps would need hundreds of MB).
//!
//! Two choices differ from DIDA's code, both written here because the paper leaves them open:
//! similarities are cosines under a softmax with temperature `tau` over the bank (DIDA
//! normalises raw dot products by their sum, which for 256-d non-negative embeddings is close to
//! uniform over the slots and carries little instance information). The slots stay source
//! instances: DIDA moves them towards class means of source features under source labels, so
//! they follow the replayed source crop when source replay is on and stay as stored otherwise.

use super::component::{need, Component, Flow, Geometry, Labels, Step};
use super::config;
use super::contrast::cosine;
use crate::model::ops::log_softmax_last_dim as log_softmax;
use crate::model::Student;
use crate::stats::{Instances, SourceStats};
use crate::SeededRng;
use candle_core::{DType, Device, Result, Tensor, D};

/// DIDA as a step component.
pub struct Dida {
    cfg: config::Dida,
    bank: InstanceBank,
    classes: usize,
}

impl Dida {
    pub fn new(cfg: &config::Dida, classes: usize, stats: &SourceStats) -> Result<Self> {
        let inst = stats.bank.as_ref().ok_or_else(|| {
            candle_core::Error::Msg(
                "DIDA needs the instance bank stored with the source statistics, and this \
                 model's source_stats.safetensors has none: recompute them with \
                 `segadapt stats --model DIR --data SOURCE_DIR`"
                    .into(),
            )
        })?;
        if inst.labels.len() < cfg.bank {
            log::warn!(
                "adapt.dida.bank = {}: the source statistics hold {} instances; using them all",
                cfg.bank,
                inst.labels.len()
            );
        }
        Ok(Self {
            cfg: cfg.clone(),
            bank: InstanceBank::from_instances(inst, cfg.bank, cfg.momentum)?,
            classes,
        })
    }
}

impl Component for Dida {
    fn name(&self) -> &'static str {
        "dida"
    }

    /// Scatter: the instance-level class distribution blended into the class scores.
    fn label(&mut self, l: &mut Labels, _t: u64) -> Result<Flow> {
        if self.cfg.blend > 0.0 {
            let inst = self.bank.scatter(&l.feats, self.cfg.tau, self.classes)?;
            let b = self.cfg.blend;
            l.rescore(((&l.scores * (1.0 - b))? + (inst * b)?)?)?;
        }
        Ok(Flow::Go)
    }

    fn losses(
        &mut self,
        step: &mut Step,
        _student: &Student,
        _rng: &mut SeededRng,
    ) -> Result<Vec<(&'static str, Tensor)>> {
        let out = step.out();
        let probs = candle_nn::ops::softmax_last_dim(&out.logits)?;
        let l = self.bank.instance_loss(
            &step.labels.feats,
            &out.feats,
            &probs,
            &out.same,
            self.cfg.tau,
        )?;
        Ok(vec![("dida", (l * self.cfg.weight)?)])
    }

    fn update(&mut self, step: &Step, _student: &Student, _rng: &mut SeededRng) -> Result<()> {
        if step.t % self.cfg.interval != 0 {
            return Ok(());
        }
        match step.out().source_cells.as_ref() {
            Some((f, labels)) => self.bank.update(f, labels),
            None => Ok(()),
        }
    }

    fn bytes(&self, g: &Geometry) -> (usize, String) {
        (
            self.cfg.bank * (g.dim + 1) * 4,
            format!("bank {}", self.cfg.bank),
        )
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![
            ("feats".into(), self.bank.feats.clone()),
            (
                "labels".into(),
                Tensor::new(self.bank.labels.as_slice(), &Device::Cpu)?,
            ),
        ])
    }

    fn load(&mut self, get: &dyn Fn(&str) -> Option<Tensor>) -> Result<()> {
        self.bank.feats = need(get, "dida", "feats")?;
        self.bank.labels = need(get, "dida", "labels")?.to_vec1()?;
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct InstanceBank {
    /// [K, D] slot embeddings.
    pub feats: Tensor,
    /// Class of each slot.
    pub labels: Vec<u32>,
    pub momentum: f64,
}

impl InstanceBank {
    /// The first `k` stored instances: a class-balanced bank (the store is ordered round-robin
    /// over the classes, rarest first).
    pub fn from_instances(inst: &Instances, k: usize, momentum: f64) -> Result<Self> {
        let k = k.min(inst.labels.len());
        if k == 0 {
            candle_core::bail!("instance bank: no stored instances or K = 0");
        }
        Ok(Self {
            feats: inst.feats.narrow(0, 0, k)?.copy()?,
            labels: inst.labels[..k].to_vec(),
            momentum,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Slots per class.
    pub fn class_counts(&self, classes: usize) -> Vec<usize> {
        let mut n = vec![0; classes];
        self.labels.iter().for_each(|&l| n[l as usize] += 1);
        n
    }

    /// DIDA's dynamic update: f_k <- m f_k + (1 - m) mean_{l_k}. Classes absent from this batch
    /// leave their slots alone (DIDA's code decays them towards zero instead).
    pub fn update(&mut self, f: &Tensor, labels: &[u32]) -> Result<()> {
        let (k, d) = self.feats.dims2()?;
        let classes = self.labels.iter().copied().max().unwrap_or(0) as usize + 1;
        let (mean, n) = super::class_means(f, labels, classes)?;
        let m = self.momentum as f32;
        let mut bank: Vec<f32> = self.feats.flatten_all()?.to_vec1()?;
        for (s, &l) in self.labels.iter().enumerate() {
            let l = l as usize;
            if n[l] == 0.0 {
                continue;
            }
            for j in 0..d {
                bank[s * d + j] = m * bank[s * d + j] + (1.0 - m) * mean[l * d + j];
            }
        }
        self.feats = Tensor::from_vec(bank, (k, d), self.feats.device())?;
        Ok(())
    }

    /// softmax over the slots of cos(f, bank) / tau: [N, K].
    fn similarity(&self, f: &Tensor, tau: f64) -> Result<Tensor> {
        candle_nn::ops::softmax_last_dim(&(cosine(&f.detach(), &self.feats)? / tau)?)
    }

    /// [K, C] one-hot of the slots' classes.
    fn onehot(&self, classes: usize) -> Result<Tensor> {
        let mut v = vec![0f32; self.len() * classes];
        for (s, &l) in self.labels.iter().enumerate() {
            v[s * classes + l as usize] = 1.0;
        }
        Tensor::from_vec(v, (self.len(), classes), self.feats.device())
    }

    /// Scatter: each pixel's instance similarities summed into classes, [N, C] (rows sum to 1).
    pub fn scatter(&self, f: &Tensor, tau: f64, classes: usize) -> Result<Tensor> {
        self.similarity(f, tau)?.matmul(&self.onehot(classes)?)
    }

    /// DIDA's instance loss, per pixel at feature resolution, mean over `same` (u8 [N], the
    /// pixels both views show alike): the teacher's instance similarities calibrated by the
    /// student's class probabilities gathered to the slots (P_w = normalise_K(S_w * p[l_k])),
    /// as the target of the student's instance distribution: -sum_k P_w,k log S_s,k.
    pub fn instance_loss(
        &self,
        f_teacher: &Tensor,
        f_student: &Tensor,
        student_probs: &Tensor,
        same: &Tensor,
        tau: f64,
    ) -> Result<Tensor> {
        let bank = self.feats.detach();
        let idx = Tensor::new(self.labels.as_slice(), bank.device())?;
        let gathered = student_probs.detach().index_select(&idx, 1)?; // [N, K]
        let p_w = (self.similarity(f_teacher, tau)? * gathered)?;
        let p_w = p_w.broadcast_div(&(p_w.sum_keepdim(D::Minus1)? + 1e-10)?)?;
        let log_s = log_softmax(&(cosine(f_student, &bank)? / tau)?)?;
        let nll = (p_w * log_s)?.sum(D::Minus1)?.neg()?;
        super::region::masked_mean(&nll, &same.to_dtype(DType::U8)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    /// Three stored instances: two distinct ones of class 0, one of class 1 (round-robin
    /// order: class 1 is rarer).
    fn stored() -> Instances {
        Instances {
            feats: t(&[0.0, 1.0, 1.0, 0.0, 0.8, 0.2], (3, 2)),
            labels: vec![1, 0, 0],
        }
    }

    #[test]
    fn slots_of_one_class_stay_distinct_instances_after_updates() {
        let mut b = InstanceBank::from_instances(&stored(), 3, 0.5).unwrap();
        assert_eq!(b.class_counts(2), vec![2, 1]);
        let f = t(&[0.6, 0.6, 0.4, 0.4], (2, 2)); // class 0 mean (0.5, 0.5)
        for _ in 0..3 {
            b.update(&f, &[0, 0]).unwrap();
        }
        let v = b.feats.to_vec2::<f32>().unwrap();
        assert_eq!(v[0], vec![0.0, 1.0], "class 1 absent: unchanged");
        // Each class-0 slot moved 7/8 of the way to (0.5, 0.5) from where it started.
        let moved = |x0: f32| 0.125 * x0 + 0.875 * 0.5;
        assert!((v[1][0] - moved(1.0)).abs() < 1e-6 && (v[2][0] - moved(0.8)).abs() < 1e-6);
        assert_ne!(v[1], v[2], "two instances of one class stay two");
        let k1 = InstanceBank::from_instances(&stored(), 2, 0.5).unwrap();
        assert_eq!(k1.labels, vec![1, 0], "a prefix keeps one of each class");
    }

    #[test]
    fn scatter_sums_instance_similarities_into_classes() {
        let b = InstanceBank::from_instances(&stored(), 3, 0.5).unwrap();
        let f = t(&[0.9, 0.1, 0.0, 1.0], (2, 2));
        let q = b.scatter(&f, 0.1, 2).unwrap().to_vec2::<f32>().unwrap();
        for row in &q {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        assert!(q[0][0] > 0.99, "near the class-0 instances: {q:?}");
        assert!(q[1][1] > 0.99, "on the class-1 instance: {q:?}");
    }

    #[test]
    fn instance_loss_is_lowest_when_the_student_matches_the_teacher() {
        let b = InstanceBank::from_instances(&stored(), 3, 0.5).unwrap();
        let teacher = t(&[0.0, 3.0], (1, 2)); // on the class 1 instance
        let probs = t(&[0.2, 0.8], (1, 2));
        let all = Tensor::new(&[1u8], &Device::Cpu).unwrap();
        let loss = |s: &[f32]| {
            b.instance_loss(&teacher, &t(s, (1, 2)), &probs, &all, 0.1)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let same = loss(&[0.0, 3.0]);
        let other = loss(&[3.0, 0.0]);
        assert!(same < other, "{same} vs {other}");
        assert!(same.is_finite() && other.is_finite());
        let none = Tensor::new(&[0u8], &Device::Cpu).unwrap();
        let masked = b
            .instance_loss(&teacher, &t(&[3.0, 0.0], (1, 2)), &probs, &none, 0.1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(masked, 0.0, "a pasted pixel contributes nothing");
    }
}
