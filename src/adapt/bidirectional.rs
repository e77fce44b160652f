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
use crate::SeededRng;
use candle_core::{Result, Tensor};
use rand_distr::{Distribution, Normal};

/// BiDA as a step component. Label transfer gives every target pixel a dynamic label (the
/// class of its most similar calibrated source prototype); with `check` a pseudo label is kept
/// only where the classifier agrees with it. Both contrast directions reach the student: target
/// pixels against the calibrated source prototypes, and source pixels (replayed, or drawn from
/// the stored statistics) against target prototypes built from this batch's student features
/// under the transferred labels (the EMA target prototype stands in for a class the batch
/// lacks). The EMA target prototypes and the bias follow the teacher under transferred labels.
pub struct Bida {
    cfg: config::Bida,
    protos: Prototypes,
    /// This step's transferred labels of the teacher's pixels.
    transfer: Vec<u32>,
}

impl Bida {
    /// The source prototypes are the stored class means of the embedding, in the scale of the
    /// target features they are calibrated with (the unit-norm `stats.prototypes` would let
    /// the calibration jump to the target's raw scale).
    pub fn new(cfg: &config::Bida, stats: &SourceStats) -> Result<Self> {
        Ok(Self {
            cfg: cfg.clone(),
            protos: Prototypes::new(&stats.mean, cfg.momentum, cfg.ramp)?,
            transfer: Vec::new(),
        })
    }

    /// Target pixels `f` [N, D] under their labels `y` against the source prototypes as they
    /// are: calibration serves the label transfer, and contrasting with the calibrated ones
    /// would compare the target with itself.
    pub fn target_to_source(&self, f: &Tensor, y: &Tensor) -> Result<Tensor> {
        pixel_to_prototype(f, y, &self.protos.source, self.cfg.tau, super::IGNORE)
    }
}

impl Component for Bida {
    fn name(&self) -> &'static str {
        "bida"
    }

    fn label(&mut self, l: &mut Labels, t: u64) -> Result<Flow> {
        self.transfer = self.protos.transfer(&l.feats, t)?.0.to_vec1()?;
        if self.cfg.check {
            l.keep
                .iter_mut()
                .zip(self.transfer.iter().zip(&l.pred))
                .for_each(|(k, (t, p))| *k &= t == p);
        }
        Ok(Flow::Go)
    }

    fn losses(
        &mut self,
        step: &mut Step,
        _student: &Student,
        rng: &mut SeededRng,
    ) -> Result<Vec<(&'static str, Tensor)>> {
        // Source pixels: the replayed crop's cells when source frames are on board, samples of
        // the stored class statistics otherwise.
        let replayed = match step.out().source_cells.as_ref() {
            Some((f, labels)) => {
                let c = step.stats.mean.dim(0)?;
                pick_source_pixels(f, labels, c, self.cfg.per_class, rng)?
            }
            None => None,
        };
        let s = step.stats;
        let (fs_src, ys) = match replayed {
            Some(p) => p,
            None => sample_source_pixels(&s.mean, &s.var, &s.count, self.cfg.per_class, rng)?,
        };
        let out = step.out();
        let (tau, w) = (self.cfg.tau, self.cfg.weight);
        let t2s = self.target_to_source(&out.feats, &out.y)?;
        // Transferred labels of pixels the student sees as the teacher did.
        let labels: Vec<u32> = self
            .transfer
            .iter()
            .zip(&step.view.pasted)
            .map(|(&l, &p)| if p { super::IGNORE } else { l })
            .collect();
        let target = batch_prototypes(&out.feats, &labels, &self.protos.target)?;
        let s2t = pixel_to_prototype(&fs_src, &ys, &target, tau, super::IGNORE)?;
        Ok(vec![("bida_t2s", (t2s * w)?), ("bida_s2t", (s2t * w)?)])
    }

    fn update(&mut self, step: &Step, _student: &Student, _rng: &mut SeededRng) -> Result<()> {
        self.protos.update(&step.labels.feats, &self.transfer)
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

/// Class means of `f` [N, D] under `labels` (values >= C ignored), differentiable in `f`, with
/// the row of `fallback` [C, D] (detached) for each class absent from `labels`.
pub fn batch_prototypes(f: &Tensor, labels: &[u32], fallback: &Tensor) -> Result<Tensor> {
    let (c, _) = fallback.dims2()?;
    let n = labels.len();
    let mut onehot = vec![0f32; n * c];
    let mut count = vec![0f32; c];
    for (i, &l) in labels.iter().enumerate() {
        if (l as usize) < c {
            onehot[i * c + l as usize] = 1.0;
            count[l as usize] += 1.0;
        }
    }
    let dev = f.device();
    let onehot = Tensor::from_vec(onehot, (n, c), dev)?;
    let inv: Vec<f32> = count.iter().map(|&k| 1.0 / k.max(1.0)).collect();
    let present: Vec<f32> = count.iter().map(|&k| f32::from(k > 0.0)).collect();
    let means = onehot
        .t()?
        .matmul(f)?
        .broadcast_mul(&Tensor::from_vec(inv, (c, 1), dev)?)?;
    let present = Tensor::from_vec(present, (c, 1), dev)?;
    means.broadcast_mul(&present)? + fallback.detach().broadcast_mul(&(1.0 - &present)?)?
}

/// Target prototypes and the source-to-target bias, both tracked by EMA.
#[derive(Debug, Clone)]
pub struct Prototypes {
    /// [C, D] source prototypes (class means of the source statistics).
    pub source: Tensor,
    /// [C, D] target prototypes, EMA of target class means under the transferred labels.
    pub target: Tensor,
    /// [C, D] delta_c = mu^T_c - mu^S_c (the target prototypes are the EMA).
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

    /// Moves target prototypes towards this batch's class means (classes present only); the
    /// bias is their difference from the source prototypes.
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
                bias[k * d + j] = tgt[k * d + j] - src[k * d + j];
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

/// `per_class` source "pixels" per class from N(mean_c, diag var_c): [C * per_class, D] and
/// their labels. Classes never seen in source training (zero count) are left out.
pub fn sample_source_pixels(
    mean: &Tensor,
    var: &Tensor,
    count: &Tensor,
    per_class: usize,
    rng: &mut SeededRng,
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
    rng: &mut SeededRng,
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
        let mut rng = SeededRng::seed_from_u64(0);
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
    fn calibration_moves_the_source_prototypes_in_the_scale_of_the_target_features() {
        // Class means of norm 10, as the decoder embedding's are; the unit-norm prototypes
        // stored beside them must not be what is calibrated.
        let mut stats = two_class_stats();
        stats.mean = t(&[10.0, 0.0, 0.0, 10.0], (2, 2));
        let cfg = config::Bida {
            momentum: 0.9,
            ramp: 0,
            ..Default::default()
        };
        let mut b = Bida::new(&cfg, &stats).unwrap();
        // Class 0's target pixels at the same norm, rotated by 37 degrees.
        b.protos.update(&t(&[8.0, 6.0], (1, 2)), &[0]).unwrap();
        let c = b.protos.calibrated(1).unwrap().to_vec2::<f32>().unwrap();
        let angle = (c[0][1] / c[0][0]).atan().to_degrees();
        // One step of momentum 0.9: a tenth of the way, about 3.5 degrees; calibrating the
        // unit-norm prototypes with raw target means went 19 degrees.
        assert!(angle > 1.0 && angle < 5.0, "{angle} degrees");
        // The target-to-source term contrasts with the source prototypes, not the calibrated.
        b.protos.bias = t(&[-10.0, 10.0, 0.0, 0.0], (2, 2));
        let f = t(&[0.0, 1.0], (1, 2));
        let y = Tensor::new(&[0u32], &Device::Cpu).unwrap();
        let got = b
            .target_to_source(&f, &y)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let src = pixel_to_prototype(&f, &y, &stats.mean, cfg.tau, 255).unwrap();
        let cal =
            pixel_to_prototype(&f, &y, &b.protos.calibrated(1).unwrap(), cfg.tau, 255).unwrap();
        assert_eq!(got, src.to_scalar::<f32>().unwrap());
        assert!((got - cal.to_scalar::<f32>().unwrap()).abs() > 1.0);
    }

    fn two_class_stats() -> SourceStats {
        SourceStats {
            mean: t(&[1.0, 0.0, 0.0, 1.0], (2, 2)),
            var: t(&[0.1, 0.1, 0.1, 0.1], (2, 2)),
            count: Tensor::new(&[5f32, 5.0], &Device::Cpu).unwrap(),
            prior: Tensor::new(&[0.5f32, 0.5], &Device::Cpu).unwrap(),
            prototypes: t(&[1.0, 0.0, 0.0, 1.0], (2, 2)),
            bank: None,
            frames: None,
            norm: None,
            origin: crate::stats::Origin::Labels,
        }
    }

    #[test]
    fn the_source_to_target_term_reaches_the_student() {
        // Source pixels drawn from fixed statistics are constants: the gradient must come
        // through the target prototypes built from the student's features.
        let f = candle_core::Var::from_tensor(&t(&[0.9, 0.1, 0.2, 0.8, 0.7, 0.3], (3, 2))).unwrap();
        let ema = t(&[1.0, 0.0, 0.0, 1.0, 0.5, 0.5], (3, 2));
        let target = batch_prototypes(f.as_tensor(), &[0, 1, 0], &ema).unwrap();
        let protos = target.to_vec2::<f32>().unwrap();
        assert!((protos[0][0] - 0.8).abs() < 1e-6 && (protos[0][1] - 0.2).abs() < 1e-6);
        assert_eq!(
            protos[2],
            vec![0.5, 0.5],
            "an absent class keeps its EMA prototype"
        );
        let src = t(&[1.0, 0.1, 0.1, 1.0], (2, 2));
        let ys = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
        let s2t = pixel_to_prototype(&src, &ys, &target, 0.1, 255).unwrap();
        let g = s2t.backward().unwrap();
        let g = g
            .get(f.as_tensor())
            .expect("the student's features get a gradient");
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 1e-6, "{norm}");
    }

    #[test]
    fn label_transfer_checks_pseudo_labels_and_moves_the_target_prototypes() {
        let stats = two_class_stats();
        let cfg = config::Bida {
            momentum: 0.0,
            ..Default::default()
        };
        assert!(cfg.check, "label transfer checks pseudo labels by default");
        let mut b = Bida::new(&cfg, &stats).unwrap();
        // Pixel 0 sits at class 1's source prototype but the classifier says class 0.
        let probs = t(&[0.9, 0.1, 0.9, 0.1], (2, 2));
        let feats = t(&[0.1, 1.0, 1.0, 0.1], (2, 2));
        let mut l = Labels::from_scores(probs.clone(), feats, (1, 1, 2), probs).unwrap();
        b.label(&mut l, 0).unwrap();
        assert_eq!(b.transfer, vec![1, 0]);
        assert_eq!(l.keep, vec![false, true], "disagreement drops the pixel");
        // Momentum 0: the target prototype of class 1 is the pixel it was transferred to.
        b.protos.update(&l.feats, &b.transfer.clone()).unwrap();
        let tgt = b.protos.target.to_vec2::<f32>().unwrap();
        assert_eq!(tgt[1], vec![0.1, 1.0]);
    }

    #[test]
    fn source_pixels_follow_the_stored_statistics() {
        let mean = t(&[1.0, -2.0, 0.0, 0.0, 5.0, 5.0], (3, 2));
        let var = t(&[0.25, 0.25, 1.0, 1.0, 4.0, 0.01], (3, 2));
        let count = Tensor::new(&[10f32, 0.0, 3.0], &Device::Cpu).unwrap();
        let mut rng = SeededRng::seed_from_u64(1);
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
