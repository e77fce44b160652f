//! BiDA-style bidirectional pixel-prototype contrast (reconstructed from the abstract, see
//! methods.md section 4): target pixels against source prototypes and source pixels against
//! target prototypes, non-parametric label transfer, and a gradually applied class-wise bias.
//!
//! By default no source images are on board: the source side is the per-class statistics
//! stored with the model, and source pixels are drawn from N(mu_c, diag var_c) each step. With
//! source replay on (`adapt.replay`), they are the student's own features of the replayed
//! source crop instead, up to `per_class` pixels of each labelled class.

use super::component::{need, Component, Flow, Geometry, Labels, Step};
use super::config;
use super::contrast::cosine;
use crate::loss::cross_entropy;
use crate::model::Student;
use crate::stats::SourceStats;
use candle_core::{Result, Tensor};
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

/// BiDA as a step component: label transfer as a check on the classifier's labels, the two
/// contrast directions as a loss, the prototypes and bias as its state.
pub struct Bida {
    cfg: config::Bida,
    protos: Prototypes,
    stats: SourceStats,
}

impl Bida {
    pub fn new(cfg: &config::Bida, stats: &SourceStats) -> Result<Self> {
        Ok(Self {
            cfg: cfg.clone(),
            protos: Prototypes::new(&stats.prototypes, cfg.momentum, cfg.ramp)?,
            stats: stats.clone(),
        })
    }
}

impl Component for Bida {
    fn name(&self) -> &'static str {
        "bida"
    }

    /// With `check`, a pixel stays only where label transfer agrees with its label.
    fn label(&mut self, l: &mut Labels, t: u64) -> Result<Flow> {
        if self.cfg.check {
            let transfer: Vec<u32> = self.protos.transfer(&l.feats, t)?.0.to_vec1()?;
            l.keep
                .iter_mut()
                .zip(transfer.iter().zip(&l.pred))
                .for_each(|(k, (t, p))| *k &= t == p);
        }
        Ok(Flow::Go)
    }

    fn losses(
        &mut self,
        step: &mut Step,
        _student: &Student,
        rng: &mut StdRng,
    ) -> Result<Vec<(&'static str, Tensor)>> {
        let replayed = step.student.as_mut().and_then(|o| o.source_pixels.take());
        let (fs_src, ys) = match replayed {
            Some(p) => p,
            None => sample_source_pixels(
                &self.stats.mean,
                &self.stats.var,
                &self.stats.count,
                self.cfg.per_class,
                rng,
            )?,
        };
        let out = step.out();
        let l = bidirectional_loss(
            &out.feats,
            &out.y,
            &fs_src,
            &ys,
            &self.protos,
            self.cfg.tau,
            super::IGNORE,
        )?;
        Ok(vec![("bida", (l * self.cfg.weight)?)])
    }

    fn update(&mut self, step: &Step, _student: &Student, _rng: &mut StdRng) -> Result<()> {
        self.protos.update(&step.labels.feats, &step.view.labels)
    }

    fn bytes(&self, g: &Geometry) -> (usize, String) {
        (
            3 * g.classes * g.dim * 4,
            "source and target prototypes, bias".into(),
        )
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![
            ("target".into(), self.protos.target.clone()),
            ("bias".into(), self.protos.bias.clone()),
        ])
    }

    fn load(&mut self, get: &dyn Fn(&str) -> Option<Tensor>) -> Result<()> {
        self.protos.target = need(get, "bida", "target")?;
        self.protos.bias = need(get, "bida", "bias")?;
        Ok(())
    }
}

/// Target prototypes and the source-to-target bias, both tracked by EMA.
#[derive(Debug, Clone)]
pub struct Prototypes {
    /// [C, D] source prototypes (class means of the source statistics).
    pub source: Tensor,
    /// [C, D] target prototypes, EMA of target class means under the transferred labels.
    pub target: Tensor,
    /// [C, D] delta_c = mu^T_c - mu^S_c, EMA.
    pub bias: Tensor,
    pub momentum: f64,
    /// Steps over which the bias is phased in (lambda_t = min(1, t / ramp)).
    pub ramp: u64,
}

impl Prototypes {
    pub fn new(source: &Tensor, momentum: f64, ramp: u64) -> Result<Self> {
        Ok(Self {
            source: source.detach(),
            target: source.detach().copy()?,
            bias: source.zeros_like()?,
            momentum,
            ramp,
        })
    }

    pub fn lambda(&self, step: u64) -> f64 {
        if self.ramp == 0 {
            1.0
        } else {
            (step as f64 / self.ramp as f64).min(1.0)
        }
    }

    /// Calibrated source prototypes mu^S + lambda_t delta.
    pub fn calibrated(&self, step: u64) -> Result<Tensor> {
        &self.source + (&self.bias * self.lambda(step))?
    }

    /// Non-parametric label transfer: each pixel takes the class of its most similar calibrated
    /// source prototype. `f`: [N, D] -> (labels u32 [N], top-1 cosine [N]).
    pub fn transfer(&self, f: &Tensor, step: u64) -> Result<(Tensor, Tensor)> {
        let sim = cosine(f, &self.calibrated(step)?)?;
        Ok((sim.argmax(1)?, sim.max(1)?))
    }

    /// Moves target prototypes towards this batch's class means (classes present only) and
    /// the bias towards their difference from the source prototypes.
    pub fn update(&mut self, f: &Tensor, labels: &[u32]) -> Result<()> {
        let (c, d) = self.source.dims2()?;
        let (mean, n) = super::class_means(f, labels, c)?;
        let m = self.momentum as f32;
        let mut tgt: Vec<f32> = self.target.flatten_all()?.to_vec1()?;
        let src: Vec<f32> = self.source.flatten_all()?.to_vec1()?;
        let mut bias: Vec<f32> = self.bias.flatten_all()?.to_vec1()?;
        for k in 0..c {
            if n[k] == 0.0 {
                continue;
            }
            for j in 0..d {
                tgt[k * d + j] = m * tgt[k * d + j] + (1.0 - m) * mean[k * d + j];
                bias[k * d + j] =
                    m * bias[k * d + j] + (1.0 - m) * (tgt[k * d + j] - src[k * d + j]);
            }
        }
        let dev = self.source.device();
        self.target = Tensor::from_vec(tgt, (c, d), dev)?;
        self.bias = Tensor::from_vec(bias, (c, d), dev)?;
        Ok(())
    }
}

/// One direction: -log softmax(cos(f, protos) / tau)[y], averaged over non-ignored pixels.
pub fn pixel_to_prototype(
    f: &Tensor,
    y: &Tensor,
    protos: &Tensor,
    tau: f64,
    ignore: u32,
) -> Result<Tensor> {
    cross_entropy(&(cosine(f, protos)? / tau)?, y, None, ignore)
}

/// L_T->S + L_S->T: target pixels (pseudo labels) against source prototypes, and source
/// pixels (ground truth, or drawn from the statistics) against target prototypes.
pub fn bidirectional_loss(
    f_t: &Tensor,
    y_t: &Tensor,
    f_s: &Tensor,
    y_s: &Tensor,
    protos: &Prototypes,
    tau: f64,
    ignore: u32,
) -> Result<Tensor> {
    let t2s = pixel_to_prototype(f_t, y_t, &protos.source, tau, ignore)?;
    let s2t = pixel_to_prototype(f_s, y_s, &protos.target.detach(), tau, ignore)?;
    t2s + s2t
}

/// `per_class` source "pixels" per class from N(mean_c, diag var_c): [C * per_class, D] and
/// their labels. Classes never seen in source training (zero count) are left out.
pub fn sample_source_pixels(
    mean: &Tensor,
    var: &Tensor,
    count: &Tensor,
    per_class: usize,
    rng: &mut StdRng,
) -> Result<(Tensor, Tensor)> {
    let (c, d) = mean.dims2()?;
    let mu: Vec<f32> = mean.flatten_all()?.to_vec1()?;
    let sd: Vec<f32> = var
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| v.max(0.0).sqrt())
        .collect();
    let n: Vec<f32> = count.to_vec1()?;
    let normal = Normal::new(0f32, 1.0).expect("unit normal");
    let (mut feats, mut labels) = (Vec::new(), Vec::new());
    for k in (0..c).filter(|&k| n[k] > 0.0) {
        for _ in 0..per_class {
            feats.extend((0..d).map(|j| mu[k * d + j] + sd[k * d + j] * normal.sample(rng)));
            labels.push(k as u32);
        }
    }
    let rows = labels.len();
    Ok((
        Tensor::from_vec(feats, (rows, d), mean.device())?,
        Tensor::from_vec(labels, rows, mean.device())?,
    ))
}

/// Up to `per_class` rows of `feats` [N, D] per class of `labels` [N] (values >= `classes`
/// skipped), drawn without replacement: the source side from a replayed crop.
pub fn pick_source_pixels(
    feats: &Tensor,
    labels: &[u32],
    classes: usize,
    per_class: usize,
    rng: &mut StdRng,
) -> Result<Option<(Tensor, Tensor)>> {
    use rand::seq::SliceRandom;
    let mut rows: Vec<Vec<u32>> = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        if (l as usize) < classes {
            rows[l as usize].push(i as u32);
        }
    }
    let (mut idx, mut ys) = (Vec::new(), Vec::new());
    for (k, r) in rows.iter_mut().enumerate() {
        r.shuffle(rng);
        for &i in r.iter().take(per_class) {
            idx.push(i);
            ys.push(k as u32);
        }
    }
    if idx.is_empty() {
        return Ok(None);
    }
    let dev = feats.device();
    let n = ys.len();
    Ok(Some((
        feats.index_select(&Tensor::from_vec(idx, n, dev)?, 0)?,
        Tensor::from_vec(ys, n, dev)?,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::SeedableRng;

    #[test]
    fn picked_source_pixels_are_bounded_per_class_and_keep_their_rows() {
        let f = t(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0], (5, 2));
        let mut rng = StdRng::seed_from_u64(0);
        let (x, y) = pick_source_pixels(&f, &[1, 1, 1, 255, 0], 2, 2, &mut rng)
            .unwrap()
            .unwrap();
        let y: Vec<u32> = y.to_vec1().unwrap();
        assert_eq!(
            y.iter().filter(|&&l| l == 1).count(),
            2,
            "capped at per_class"
        );
        assert_eq!(y.iter().filter(|&&l| l == 0).count(), 1);
        let x: Vec<Vec<f32>> = x.to_vec2().unwrap();
        for (row, l) in x.iter().zip(&y) {
            let i = (row[0] / 2.0) as usize;
            assert_eq!([1, 1, 1, 255, 0][i], *l, "row {i} keeps its label");
        }
        assert!(pick_source_pixels(&f, &[255; 5], 2, 2, &mut rng)
            .unwrap()
            .is_none());
    }

    fn t(v: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn label_transfer_follows_the_calibrated_prototypes() {
        // Source prototypes on the axes; the target domain is shifted so class 0 pixels sit
        // nearer to class 1's source prototype until the bias is learned and phased in.
        let src = t(&[1.0, 0.0, 0.0, 1.0], (2, 2));
        let mut p = Prototypes::new(&src, 0.0, 10).unwrap();
        let f = t(&[0.6, 0.8], (1, 2));
        assert_eq!(
            p.transfer(&f, 0).unwrap().0.to_vec1::<u32>().unwrap(),
            vec![1]
        );
        // Momentum 0: one update sets target prototype 0 to the batch mean and the bias to its
        // offset from the source prototype.
        p.update(&f, &[0]).unwrap();
        let bias = p.bias.to_vec2::<f32>().unwrap();
        assert!((bias[0][0] - (0.6 - 1.0)).abs() < 1e-6 && (bias[0][1] - 0.8).abs() < 1e-6);
        assert_eq!(bias[1], vec![0.0, 0.0], "absent classes keep their bias");
        assert_eq!(p.lambda(5), 0.5);
        assert_eq!(
            p.transfer(&f, 10).unwrap().0.to_vec1::<u32>().unwrap(),
            vec![0]
        );
    }

    #[test]
    fn both_directions_contribute_and_are_low_when_aligned() {
        let src = t(&[1.0, 0.0, 0.0, 1.0], (2, 2));
        let p = Prototypes::new(&src, 0.9, 0).unwrap();
        let y = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
        let aligned = t(&[1.0, 0.0, 0.0, 1.0], (2, 2));
        let swapped = t(&[0.0, 1.0, 1.0, 0.0], (2, 2));
        let l = |ft: &Tensor, fs: &Tensor| {
            bidirectional_loss(ft, &y, fs, &y, &p, 0.1, 255)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let (good, t_bad, s_bad) = (
            l(&aligned, &aligned),
            l(&swapped, &aligned),
            l(&aligned, &swapped),
        );
        assert!(good < 1e-3, "{good}");
        assert!(t_bad > 5.0 && s_bad > 5.0, "{t_bad} {s_bad}");
    }

    #[test]
    fn source_pixels_follow_the_stored_statistics() {
        let mean = t(&[1.0, -2.0, 0.0, 0.0, 5.0, 5.0], (3, 2));
        let var = t(&[0.25, 0.25, 1.0, 1.0, 4.0, 0.01], (3, 2));
        let count = Tensor::new(&[10f32, 0.0, 3.0], &Device::Cpu).unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let (f, y) = sample_source_pixels(&mean, &var, &count, 4000, &mut rng).unwrap();
        let y = y.to_vec1::<u32>().unwrap();
        assert_eq!(y.len(), 8000, "the unseen class is left out");
        assert!(!y.contains(&1));
        let f = f.to_vec2::<f32>().unwrap();
        let class2: Vec<&Vec<f32>> = f
            .iter()
            .zip(&y)
            .filter(|(_, &l)| l == 2)
            .map(|(r, _)| r)
            .collect();
        let m: f32 = class2.iter().map(|r| r[0]).sum::<f32>() / class2.len() as f32;
        let v: f32 =
            class2.iter().map(|r| (r[0] - m) * (r[0] - m)).sum::<f32>() / class2.len() as f32;
        assert!(
            (m - 5.0).abs() < 0.1 && (v - 4.0).abs() < 0.3,
            "mean {m} var {v}"
        );
    }
}
