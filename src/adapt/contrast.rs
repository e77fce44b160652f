//! SePiCo's semantic-guided pixel contrast (methods.md section 3): a projection head on the
//! decoder embedding, L2-normalised; per-class source statistics in that space; the centroid
//! variant (ProtoCL), the distribution-aware closed form (DistCL) and the regulariser.
//!
//! SePiCo estimates the class statistics every iteration from the EMA teacher's projections of
//! labelled source pixels. No source image is on board here, so the source pixels are drawn
//! from the Gaussian class statistics stored with the model (raw embedding space) and pushed
//! through the teacher's head: the same running estimator (cumulative mean and diagonal
//! variance, w = n / (n + N)) sees samples of the same distribution SePiCo's sees, under the
//! stored Gaussian model. As in SePiCo, the target side uses all pseudo labels (no confidence
//! filter). The temperature is the online one (0.1, `config::Sepico::tau` says why SePiCo's
//! 100 does not carry over).

use super::component::{need, Component, Geometry, Step};
use super::config::{self, SepicoVariant};
use crate::loss::cross_entropy;
use crate::model::ops::{self, log_softmax_last_dim as log_softmax};
use crate::model::Student;
use crate::stats::SourceStats;
use crate::SeededRng;
use candle_core::{Device, Result, Tensor, Var};
use rand::SeedableRng;

/// The projection head: two linear layers with a ReLU between, then L2 normalisation.
/// Weights in the order w1 [D, D], b1 [D], w2 [P, D], b2 [P].
fn project(f: &Tensor, head: &[Tensor]) -> Result<Tensor> {
    let h = ops::linear(f, &head[0], &head[1])?.relu()?;
    ops::l2_normalize(&ops::linear(&h, &head[2], &head[3])?, COSINE_EPS)
}

/// He-uniform weights and zero biases, from a fixed seed (every run starts alike).
fn init_head(d: usize, p: usize) -> Result<Vec<Tensor>> {
    use rand::Rng;
    let mut rng = SeededRng::seed_from_u64(0x5e91c0);
    let dev = &Device::Cpu;
    let mut uniform = |rows: usize, cols: usize| {
        let a = (6.0 / cols as f32).sqrt();
        let v: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-a..a)).collect();
        Tensor::from_vec(v, (rows, cols), dev)
    };
    Ok(vec![
        uniform(d, d)?,
        Tensor::zeros(d, candle_core::DType::F32, dev)?,
        uniform(p, d)?,
        Tensor::zeros(p, candle_core::DType::F32, dev)?,
    ])
}

const HEAD: [&str; 4] = ["w1", "b1", "w2", "b2"];

/// SePiCo as a step component.
pub struct Sepico {
    cfg: config::Sepico,
    /// The student's head (trained) and the teacher's (EMA of it, `ema` momentum).
    head: Vec<Var>,
    teacher: Vec<Tensor>,
    ema: f64,
    lr_mult: f64,
    /// Running projected source statistics: class means [C, P], variances [C, P], counts.
    mean: Tensor,
    var: Tensor,
    count: Vec<f64>,
}

impl Sepico {
    pub fn new(cfg: &config::AdaptConfig, stats: &SourceStats) -> Result<Self> {
        let (c, d) = stats.mean.dims2()?;
        let p = cfg.sepico.dim;
        let init = init_head(d, p)?;
        Ok(Self {
            cfg: cfg.sepico.clone(),
            head: init.iter().map(Var::from_tensor).collect::<Result<_>>()?,
            teacher: init,
            ema: cfg.ema,
            lr_mult: cfg.head_lr_mult,
            mean: Tensor::zeros((c, p), candle_core::DType::F32, &Device::Cpu)?,
            var: Tensor::zeros((c, p), candle_core::DType::F32, &Device::Cpu)?,
            count: vec![0.0; c],
        })
    }

    /// SePiCo's estimator over one batch of projected source pixels: w = n / (n + N),
    /// var <- (1 - w) var + w v + w (1 - w) (mu - m)^2, mu <- (1 - w) mu + w m, N += n.
    fn update_statistics(&mut self, proj: &Tensor, labels: &[u32]) -> Result<()> {
        let (c, p) = self.mean.dims2()?;
        let (m, n) = super::class_means(proj, labels, c)?;
        let sq = super::class_means(&proj.sqr()?, labels, c)?.0;
        let mut mean: Vec<f32> = self.mean.flatten_all()?.to_vec1()?;
        let mut var: Vec<f32> = self.var.flatten_all()?.to_vec1()?;
        for k in (0..c).filter(|&k| n[k] > 0.0) {
            let w = (n[k] as f64 / (n[k] as f64 + self.count[k])) as f32;
            for j in 0..p {
                let i = k * p + j;
                let v = (sq[i] - m[i] * m[i]).max(0.0);
                let d = mean[i] - m[i];
                var[i] = (1.0 - w) * var[i] + w * v + w * (1.0 - w) * d * d;
                mean[i] = (1.0 - w) * mean[i] + w * m[i];
            }
            self.count[k] += n[k] as f64;
        }
        self.mean = Tensor::from_vec(mean, (c, p), &Device::Cpu)?;
        self.var = Tensor::from_vec(var, (c, p), &Device::Cpu)?;
        Ok(())
    }

    /// All pseudo labels of the view: the teacher's (rectified) labels, pasted pixels' own.
    fn all_labels(step: &Step) -> Result<Tensor> {
        let v = &step.view;
        let y: Vec<u32> = step
            .labels
            .pred
            .iter()
            .zip(v.train.iter().zip(&v.pasted))
            .map(|(&p, (&t, &pasted))| if pasted { t } else { p })
            .collect();
        Tensor::from_vec(y, v.train.len(), v.image.device())
    }
}

impl Component for Sepico {
    fn name(&self) -> &'static str {
        "sepico"
    }

    fn losses(
        &mut self,
        step: &mut Step,
        _student: &Student,
        rng: &mut SeededRng,
    ) -> Result<Vec<(&'static str, Tensor)>> {
        let s = step.stats;
        let (src, ys) = super::bidirectional::sample_source_pixels(
            &s.mean,
            &s.var,
            &s.count,
            self.cfg.samples,
            rng,
        )?;
        let proj = project(&src, &self.teacher)?;
        self.update_statistics(&proj, &ys.to_vec1()?)?;
        let head: Vec<Tensor> = self.head.iter().map(|v| v.as_tensor().clone()).collect();
        let f = project(&step.out().feats, &head)?;
        let y = Self::all_labels(step)?;
        let (p, tau) = (&self.cfg, self.cfg.tau);
        let l = match p.variant {
            SepicoVariant::Proto => proto_cl(&f, &y, &self.mean, tau, super::IGNORE)?,
            SepicoVariant::Dist => dist_cl(&f, &y, &self.mean, &self.var, tau, super::IGNORE)?,
        };
        Ok(vec![
            ("sepico", (l * p.weight)?),
            ("sepico_reg", (proto_reg(&f, &self.mean, tau)? * p.reg)?),
        ])
    }

    fn update(&mut self, _step: &Step, _student: &Student, _rng: &mut SeededRng) -> Result<()> {
        let m = self.ema;
        for (t, v) in self.teacher.iter_mut().zip(&self.head) {
            *t = ((&*t * m)? + (v.as_tensor().detach() * (1.0 - m))?)?;
        }
        Ok(())
    }

    fn params(&self) -> Vec<(String, Var, f64)> {
        HEAD.iter()
            .zip(&self.head)
            .map(|(n, v)| (format!("head.{n}"), v.clone(), self.lr_mult))
            .collect()
    }

    fn bytes(&self, g: &Geometry) -> (usize, String) {
        let head = 2 * (g.dim * g.dim + g.dim + self.cfg.dim * g.dim + self.cfg.dim);
        (
            (head + 2 * g.classes * self.cfg.dim) * 4,
            "projection heads, projected statistics".into(),
        )
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut v = vec![
            ("mean".into(), self.mean.clone()),
            ("var".into(), self.var.clone()),
        ];
        let count: Vec<f32> = self.count.iter().map(|&c| c as f32).collect();
        v.push(("count".into(), Tensor::new(count.as_slice(), &Device::Cpu)?));
        for ((n, h), t) in HEAD.iter().zip(&self.head).zip(&self.teacher) {
            v.push((format!("head.{n}"), h.as_tensor().copy()?));
            v.push((format!("teacher.{n}"), t.clone()));
        }
        Ok(v)
    }

    fn load(&mut self, get: &dyn Fn(&str) -> Option<Tensor>) -> Result<()> {
        self.mean = need(get, "sepico", "mean")?;
        self.var = need(get, "sepico", "var")?;
        let count: Vec<f32> = need(get, "sepico", "count")?.to_vec1()?;
        self.count = count.into_iter().map(f64::from).collect();
        for ((n, h), t) in HEAD.iter().zip(&self.head).zip(&mut self.teacher) {
            h.set(&need(get, "sepico", &format!("head.{n}"))?)?;
            *t = need(get, "sepico", &format!("teacher.{n}"))?;
        }
        Ok(())
    }
}

/// ProtoCL: CE(f mu^T / tau, y). `f`: [N, D]; `y`: u32 [N]; `mu`: [C, D].
pub fn proto_cl(f: &Tensor, y: &Tensor, mu: &Tensor, tau: f64, ignore: u32) -> Result<Tensor> {
    let logits = (f.matmul(&mu.t()?)? / tau)?;
    cross_entropy(&logits, y, None, ignore)
}

/// DistCL, the closed-form bound for infinitely many positives and negatives drawn from
/// N(mu_c, diag var_c): logit_c = f.mu_c / tau + 0.5 sum_d f_d^2 var_cd / tau^2, and
/// L = CE(logits, y) + 0.5 sum_d f_d^2 var_yd / tau^2 (the true class's variance bonus removed).
pub fn dist_cl(
    f: &Tensor,
    y: &Tensor,
    mu: &Tensor,
    var: &Tensor,
    tau: f64,
    ignore: u32,
) -> Result<Tensor> {
    let f2 = f.sqr()?; // [N, D]
    let spread = (f2.matmul(&var.t()?)? * (0.5 / (tau * tau)))?; // [N, C]
    let logits = ((f.matmul(&mu.t()?)? / tau)? + &spread)?;
    let ce = cross_entropy(&logits, y, None, ignore)?;
    // The positive's spread, averaged over the same (non-ignored) pixels as the CE.
    let valid = y.ne(ignore)?;
    let safe = valid.where_cond(y, &y.zeros_like()?)?;
    let own = spread.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?;
    let w = valid.to_dtype(own.dtype())?;
    let n = w.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
    ce + ((own * w)?.sum_all()? / n)?
}

/// The regulariser as SePiCo's released code computes it (`proto_reg`): with the batch-mean
/// feature f, sum_c log softmax(f mu^T / tau)_c / (C log C), added to the loss. Its value is
/// -1 when f is equally similar to every centroid and lower otherwise.
pub fn proto_reg(f: &Tensor, mu: &Tensor, tau: f64) -> Result<Tensor> {
    let c = mu.dim(0)? as f64;
    let mean = f.mean_keepdim(0)?; // [1, D]
    let lp = log_softmax(&(mean.matmul(&mu.t()?)? / tau)?)?; // [1, C]
    lp.sum_all()? / (c * c.ln())
}

/// Rows shorter than this are scaled by its inverse instead of normalised: a near-zero
/// embedding then has a bounded gradient (1e12 times the incoming one at 1e-12).
pub const COSINE_EPS: f64 = 1e-4;

/// Cosine similarity matrix of rows: [N, D] x [C, D] -> [N, C].
pub fn cosine(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let na = ops::l2_normalize(a, COSINE_EPS)?;
    let nb = ops::l2_normalize(b, COSINE_EPS)?;
    na.matmul(&nb.t()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};

    fn t(v: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn distcl_equals_its_closed_form_and_the_gaussian_limit() {
        let tau = 2.0f64;
        let f = [0.8f32, -0.3, 0.5];
        let mu = [[1.0f32, 0.0, 0.2], [0.0, 1.0, -0.4]];
        let var = [[0.3f32, 0.1, 0.2], [0.05, 0.4, 0.6]];
        let y = Tensor::new(&[1u32], &Device::Cpu).unwrap();
        let got = dist_cl(
            &t(&f, (1, 3)),
            &y,
            &t(&mu.concat(), (2, 3)),
            &t(&var.concat(), (2, 3)),
            tau,
            255,
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
        // By hand: -f.mu_y/tau + log sum_c exp(f.mu_c/tau + 0.5 f^T S_c f / tau^2).
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x * y) as f64).sum::<f64>();
        let quad = |s: &[f32]| {
            f.iter()
                .zip(s)
                .map(|(x, v)| (x * x * v) as f64)
                .sum::<f64>()
        };
        let lse = (0..2)
            .map(|c| (dot(&f, &mu[c]) / tau + 0.5 * quad(&var[c]) / (tau * tau)).exp())
            .sum::<f64>()
            .ln();
        let want = -dot(&f, &mu[1]) / tau + lse;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        // The log-sum-exp term is the limit over sampled negatives/positives: E exp(f.z / tau)
        // for z ~ N(mu_c, diag var_c). Check it by Monte Carlo.
        let mut rng = crate::SeededRng::seed_from_u64(0);
        let n = Normal::new(0.0f64, 1.0).unwrap();
        let mc: f64 = (0..2)
            .map(|c| {
                let s: f64 = (0..200_000)
                    .map(|_| {
                        let z: Vec<f32> = (0..3)
                            .map(|d| {
                                (mu[c][d] as f64 + var[c][d].sqrt() as f64 * n.sample(&mut rng))
                                    as f32
                            })
                            .collect();
                        (dot(&f, &z) / tau).exp()
                    })
                    .sum();
                s / 200_000.0
            })
            .sum::<f64>()
            .ln();
        assert!(
            (mc - lse).abs() < 1e-2,
            "Monte Carlo {mc} vs closed form {lse}"
        );
    }

    #[test]
    fn at_the_default_temperature_the_contrast_tells_the_classes_apart() {
        // Unit pixels on their own class's mean: the loss must be near zero, not near log C as
        // at SePiCo's 100, where every logit is within 0.01 of the others.
        let tau = config::Sepico::default().tau;
        let mu = t(&[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0], (3, 3));
        let y = Tensor::new(&[0u32, 1, 2], &Device::Cpu).unwrap();
        let loss = |tau: f64| {
            proto_cl(&mu, &y, &mu, tau, 255)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(loss(tau) < 0.01, "{}", loss(tau));
        assert!(loss(100.0) > 0.99 * 3f32.ln(), "{}", loss(100.0));
    }

    #[test]
    fn distcl_without_variance_is_protocl_and_ignores_pixels() {
        let f = t(&[0.2, 0.4, -0.1, 0.9, 0.3, 0.3], (3, 2));
        let mu = t(&[1.0, 0.0, 0.0, 1.0], (2, 2));
        let zero = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
        let y = Tensor::new(&[0u32, 1, 255], &Device::Cpu).unwrap();
        let a = dist_cl(&f, &y, &mu, &zero, 0.5, 255)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let b = proto_cl(&f, &y, &mu, 0.5, 255)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((a - b).abs() < 1e-6);
        let y2 = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
        let c = proto_cl(&f.narrow(0, 0, 2).unwrap(), &y2, &mu, 0.5, 255)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((b - c).abs() < 1e-6, "the ignored pixel must not count");
    }

    #[test]
    fn cosine_of_a_near_zero_row_has_a_bounded_gradient() {
        let tiny = candle_core::Var::from_tensor(&t(&[1e-9, -2e-9, 1e-9], (1, 3))).unwrap();
        let protos = t(&[1.0, 0.0, 0.0, 0.0, 1.0, 0.0], (2, 3));
        let s = cosine(tiny.as_tensor(), &protos).unwrap();
        let g = s.sum_all().unwrap().backward().unwrap();
        let g: Vec<f32> = g
            .get(tiny.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let worst = g.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(worst <= 1.0 / COSINE_EPS as f32 + 1.0, "{g:?}");
        // Ordinary rows are normalised exactly.
        let a = t(&[3.0, 4.0, 0.0], (1, 3));
        let c: Vec<f32> = cosine(&a, &protos)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            (c[0] - 0.6).abs() < 1e-6 && (c[1] - 0.8).abs() < 1e-6,
            "{c:?}"
        );
    }

    #[test]
    fn regulariser_has_the_released_sign() {
        // SePiCo's proto_reg: + sum_c log p_c / (C log C): -1 at uniform similarity, lower
        // (more negative) when the mean feature leans towards one centroid.
        let mu = t(&[1.0, 0.0, 0.0, 1.0], (2, 2));
        let balanced = t(&[1.0, 1.0, 0.5, 0.5], (2, 2));
        let leaning = t(&[5.0, 0.0, 4.0, 0.0], (2, 2));
        let r = |f: &Tensor| proto_reg(f, &mu, 1.0).unwrap().to_scalar::<f32>().unwrap();
        assert!((r(&balanced) + 1.0).abs() < 1e-5);
        let p0 = 1.0 / (1.0 + (-4.5f32).exp());
        let want = (p0.ln() + (1.0 - p0).ln()) / (2.0 * 2f32.ln());
        assert!(
            (r(&leaning) - want).abs() < 1e-5,
            "{} vs {want}",
            r(&leaning)
        );
    }

    #[test]
    fn projections_are_unit_norm_and_the_statistics_follow_the_estimator() {
        let head = init_head(3, 4).unwrap();
        let f = t(&[0.2, -0.5, 1.0, 3.0, 0.1, 0.0], (2, 3));
        let p = project(&f, &head).unwrap().to_vec2::<f32>().unwrap();
        for row in &p {
            let n: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((n - 1.0).abs() < 1e-5 || n == 0.0, "{n}");
        }
        let stats = SourceStats {
            mean: t(&[1.0, 0.0, 0.0, 0.0, 1.0, 0.0], (2, 3)),
            var: t(&[0.1; 6], (2, 3)),
            count: Tensor::new(&[5f32, 5.0], &Device::Cpu).unwrap(),
            prior: Tensor::new(&[0.5f32, 0.5], &Device::Cpu).unwrap(),
            prototypes: t(&[1.0, 0.0, 0.0, 0.0, 1.0, 0.0], (2, 3)),
            bank: None,
            frames: None,
            norm: None,
            origin: crate::stats::Origin::Labels,
        };
        let cfg = config::AdaptConfig {
            sepico: config::Sepico {
                dim: 2,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut s = Sepico::new(&cfg, &stats).unwrap();
        // Two batches of class 0: {(1, 0), (0, 1)} then {(1, 0)}; running mean (2/3, 1/3),
        // variance of all three values per dimension (2/9).
        let a = t(&[1.0, 0.0, 0.0, 1.0], (2, 2));
        s.update_statistics(&a, &[0, 0]).unwrap();
        s.update_statistics(&t(&[1.0, 0.0], (1, 2)), &[0]).unwrap();
        let m = s.mean.to_vec2::<f32>().unwrap();
        let v = s.var.to_vec2::<f32>().unwrap();
        assert!((m[0][0] - 2.0 / 3.0).abs() < 1e-6 && (m[0][1] - 1.0 / 3.0).abs() < 1e-6);
        assert!((v[0][0] - 2.0 / 9.0).abs() < 1e-6 && (v[0][1] - 2.0 / 9.0).abs() < 1e-6);
        assert_eq!(s.count, vec![3.0, 0.0]);
        assert_eq!(m[1], vec![0.0, 0.0], "an unseen class stays empty");
    }
}
