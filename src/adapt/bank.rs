//! DIDA's labeled instance bank: K fixed slots of (decoder embedding, class), class-balanced,
//! each slot moved by EMA towards its class's current mean; and the instance-level loss,
//! computed at feature resolution (DIDA's full-resolution maps would need hundreds of MB).

use super::component::{need, Component, Geometry, Step};
use super::config;
use crate::model::Student;
use crate::stats::SourceStats;
use candle_core::{Device, Result, Tensor, D};
use rand::rngs::StdRng;

/// DIDA as a step component.
pub struct Dida {
    cfg: config::Dida,
    bank: InstanceBank,
}

impl Dida {
    pub fn new(cfg: &config::Dida, stats: &SourceStats) -> Result<Self> {
        Ok(Self {
            cfg: cfg.clone(),
            bank: InstanceBank::from_source(
                &stats.mean,
                &stats.prior,
                &stats.count,
                cfg.bank,
                cfg.momentum,
            )?,
        })
    }
}

impl Component for Dida {
    fn name(&self) -> &'static str {
        "dida"
    }

    fn losses(
        &mut self,
        step: &mut Step,
        _student: &Student,
        _rng: &mut StdRng,
    ) -> Result<Vec<(&'static str, Tensor)>> {
        let out = step.out();
        let probs = candle_nn::ops::softmax_last_dim(&out.logits)?;
        let l = self.bank.instance_loss(
            &step.labels.feats,
            &out.feats,
            &probs,
            &out.same,
            self.cfg.weight,
        )?;
        Ok(vec![("dida", l)])
    }

    fn update(&mut self, step: &Step, _student: &Student, _rng: &mut StdRng) -> Result<()> {
        self.bank.update(&step.labels.feats, &step.view.labels)
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
    /// K slots shared out across the classes seen in source training, rarest class first (as
    /// DIDA's cache is built), so class counts differ by at most one; each slot starts at its
    /// class's source mean.
    pub fn from_source(
        mean: &Tensor,
        prior: &Tensor,
        count: &Tensor,
        k: usize,
        momentum: f64,
    ) -> Result<Self> {
        let (c, _) = mean.dims2()?;
        let prior: Vec<f32> = prior.to_vec1()?;
        let count: Vec<f32> = count.to_vec1()?;
        let mut classes: Vec<usize> = (0..c).filter(|&i| count[i] > 0.0).collect();
        if classes.is_empty() || k == 0 {
            candle_core::bail!("instance bank: no source classes or K = 0");
        }
        classes.sort_by(|&a, &b| prior[a].total_cmp(&prior[b]));
        let labels: Vec<u32> = (0..k).map(|i| classes[i % classes.len()] as u32).collect();
        let idx = Tensor::new(labels.as_slice(), mean.device())?;
        Ok(Self {
            feats: mean.detach().index_select(&idx, 0)?,
            labels,
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

    /// DIDA's instance loss, per pixel at feature resolution:
    /// P_w = normalise_K(S_w * p_student[label_k]), S_s = normalise_K(f_s . bank),
    /// L = weight * mean_pixels(-sum_k P_w,k log(S_s,k + 1e-10)).
    /// `f_teacher`, `f_student`: [N, D] non-negative (post-ReLU) embeddings; `student_probs`: [N, C];
    /// `same`: u8 [N], the pixels where both views show the same content (pasted pixels have no
    /// teacher feature of their own).
    pub fn instance_loss(
        &self,
        f_teacher: &Tensor,
        f_student: &Tensor,
        student_probs: &Tensor,
        same: &Tensor,
        weight: f64,
    ) -> Result<Tensor> {
        let bank = self.feats.detach();
        let idx = Tensor::new(self.labels.as_slice(), bank.device())?;
        let s_w = f_teacher.detach().matmul(&bank.t()?)?; // [N, K]
        let gathered = student_probs.detach().index_select(&idx, 1)?; // [N, K]
        let p_w = (s_w * gathered)?;
        let p_w = p_w.broadcast_div(&(p_w.sum_keepdim(D::Minus1)? + 1e-10)?)?;
        let s_s = f_student.matmul(&bank.t()?)?;
        let s_s = s_s.broadcast_div(&(s_s.sum_keepdim(D::Minus1)? + 1e-10)?)?;
        let nll = (p_w * (s_s + 1e-10)?.log()?)?.sum(D::Minus1)?.neg()?;
        super::region::masked_mean(&nll, same)? * weight
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    fn bank(k: usize) -> InstanceBank {
        let mean = t(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 9.0, 9.0], (4, 2));
        let prior = Tensor::new(&[0.5f32, 0.1, 0.4, 0.0], &Device::Cpu).unwrap();
        let count = Tensor::new(&[50f32, 10.0, 40.0, 0.0], &Device::Cpu).unwrap();
        InstanceBank::from_source(&mean, &prior, &count, k, 0.5).unwrap()
    }

    #[test]
    fn bank_is_bounded_and_class_balanced() {
        for k in [1, 3, 7, 10, 300] {
            let mut b = bank(k);
            assert_eq!(b.len(), k);
            assert_eq!(b.feats.dims(), [k, 2]);
            let n = b.class_counts(4);
            assert_eq!(n[3], 0, "a class never seen in source gets no slot");
            let seen = &n[..3];
            assert!(
                seen.iter().max().unwrap() - seen.iter().min().unwrap() <= 1,
                "{n:?}"
            );
            if k < 3 {
                assert_eq!(b.labels[0], 1, "the rarest class comes first");
            }
            // Updates never change the size or the class layout.
            let f = t(&[2.0, 2.0, 4.0, 0.0], (2, 2));
            b.update(&f, &[0, 0]).unwrap();
            assert_eq!(b.len(), k);
            assert_eq!(b.class_counts(4), n);
        }
    }

    #[test]
    fn slots_move_towards_their_class_mean_only() {
        let mut b = bank(3); // labels [1, 2, 0]
        let f = t(&[2.0, 2.0, 4.0, 0.0], (2, 2)); // class 0 mean (3, 1)
        b.update(&f, &[0, 0]).unwrap();
        let v = b.feats.to_vec2::<f32>().unwrap();
        assert_eq!(v[0], vec![0.0, 1.0], "class 1 absent: unchanged");
        assert_eq!(v[1], vec![1.0, 1.0], "class 2 absent: unchanged");
        assert_eq!(v[2], vec![2.0, 0.5], "0.5 * (1, 0) + 0.5 * (3, 1)");
    }

    #[test]
    fn instance_loss_is_lowest_when_the_student_matches_the_teacher() {
        let b = bank(3);
        let teacher = t(&[0.0, 3.0], (1, 2)); // near the class 1 slot
        let probs = t(&[0.1, 0.8, 0.1, 0.0], (1, 4));
        let all = Tensor::new(&[1u8], &Device::Cpu).unwrap();
        let loss = |s: &[f32]| {
            b.instance_loss(&teacher, &t(s, (1, 2)), &probs, &all, 0.5)
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
            .instance_loss(&teacher, &t(&[3.0, 0.0], (1, 2)), &probs, &none, 0.5)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(masked, 0.0, "a pasted pixel contributes nothing");
    }
}
