//! SePiCo's semantic-guided pixel contrast against per-class source statistics: the centroid
//! variant (ProtoCL), the distribution-aware closed form (DistCL) and the anti-collapse
//! regulariser. Features and statistics are as stored with the model (`stats.rs`).

use super::component::{Component, Step};
use super::config::{self, SepicoVariant};
use crate::loss::cross_entropy;
use crate::model::ops::{self, log_softmax_last_dim as log_softmax};
use crate::model::Student;
use crate::stats::SourceStats;
use candle_core::{Result, Tensor};
use rand::rngs::StdRng;

/// SePiCo as a step component: the student's features on the strong view against the source
/// class statistics, under the training labels.
pub struct Sepico {
    cfg: config::Sepico,
    stats: SourceStats,
}

impl Sepico {
    pub fn new(cfg: &config::Sepico, stats: &SourceStats) -> Self {
        Self {
            cfg: cfg.clone(),
            stats: stats.clone(),
        }
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
        _rng: &mut StdRng,
    ) -> Result<Vec<(&'static str, Tensor)>> {
        let (out, s, p) = (step.out(), &self.stats, &self.cfg);
        let l = match p.variant {
            SepicoVariant::Proto => proto_cl(&out.feats, &out.y, &s.mean, p.tau, super::IGNORE)?,
            SepicoVariant::Dist => {
                dist_cl(&out.feats, &out.y, &s.mean, &s.var, p.tau, super::IGNORE)?
            }
        };
        Ok(vec![
            ("sepico", (l * p.weight)?),
            (
                "sepico_reg",
                (proto_reg(&out.feats, &s.mean, p.tau)? * p.reg)?,
            ),
        ])
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

/// The regulariser: the batch-mean feature should be equally similar to every centroid.
/// Cross-entropy of softmax(mean(f) mu^T / tau) against uniform, divided by log C (1 at best).
pub fn proto_reg(f: &Tensor, mu: &Tensor, tau: f64) -> Result<Tensor> {
    let c = mu.dim(0)? as f64;
    let mean = f.mean_keepdim(0)?; // [1, D]
    let lp = log_softmax(&(mean.matmul(&mu.t()?)? / tau)?)?; // [1, C]
    lp.sum_all()?.neg()? / (c * c.ln())
}

/// Cosine similarity matrix of rows: [N, D] x [C, D] -> [N, C].
pub fn cosine(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let na = ops::l2_normalize(a, 1e-12)?;
    let nb = ops::l2_normalize(b, 1e-12)?;
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
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
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
    fn regulariser_is_one_at_uniform_similarity_and_larger_when_collapsed() {
        let mu = t(&[1.0, 0.0, 0.0, 1.0], (2, 2));
        let balanced = t(&[1.0, 1.0, 0.5, 0.5], (2, 2));
        let collapsed = t(&[5.0, 0.0, 4.0, 0.0], (2, 2));
        let r = |f: &Tensor| proto_reg(f, &mu, 1.0).unwrap().to_scalar::<f32>().unwrap();
        assert!((r(&balanced) - 1.0).abs() < 1e-5);
        assert!(r(&collapsed) > 1.5);
    }
}
