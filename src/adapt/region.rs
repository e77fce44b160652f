//! HIAST's region-adaptive regularisation: on confident (pseudo-labelled) pixels a smoothing
//! term (KL to uniform up to a constant), on ignored pixels entropy minimisation and a soft
//! consistency to the EMA teacher.

use super::component::{Component, Step};
use super::config;
use crate::model::ops::log_softmax_last_dim as log_softmax;
use crate::model::Student;
use crate::SeededRng;
use candle_core::{DType, Result, Tensor, D};

/// The three region terms as a step component.
pub struct RegionTerms(pub config::Region);

impl Component for RegionTerms {
    fn name(&self) -> &'static str {
        "region"
    }

    fn losses(
        &mut self,
        step: &mut Step,
        _student: &Student,
        _rng: &mut SeededRng,
    ) -> Result<Vec<(&'static str, Tensor)>> {
        let (out, r) = (step.out(), &self.0);
        Ok(vec![
            ("smooth", (smoothing(&out.logits, &out.kept)? * r.smooth)?),
            (
                "entropy",
                (entropy(&out.logits, &out.ignored)? * r.entropy)?,
            ),
            (
                "consistency",
                (consistency(&out.logits, &step.labels.probs, &out.ignored)? * r.consistency)?,
            ),
        ])
    }
}

/// Mean of `per_pixel` [N] over the pixels where `mask` (u8 [N]) is set; 0 when none is.
pub(crate) fn masked_mean(per_pixel: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let w = mask.to_dtype(DType::F32)?;
    let n = w.sum_all()?.to_scalar::<f32>()?;
    if n == 0.0 {
        return per_pixel.zeros_like()?.sum_all();
    }
    (per_pixel * w)?.sum_all()? / n as f64
}

/// Mean over confident pixels of -(1/C) sum_c log p_c. `logits`: [N, C]; `confident`: u8 [N].
pub fn smoothing(logits: &Tensor, confident: &Tensor) -> Result<Tensor> {
    let c = logits.dim(D::Minus1)? as f64;
    let per = (log_softmax(logits)?.sum(D::Minus1)? / -c)?;
    masked_mean(&per, confident)
}

/// Mean over ignored pixels of the prediction entropy -sum p log p.
pub fn entropy(logits: &Tensor, ignored: &Tensor) -> Result<Tensor> {
    let lp = log_softmax(logits)?;
    let per = (lp.exp()? * &lp)?.sum(D::Minus1)?.neg()?;
    masked_mean(&per, ignored)
}

/// Mean over ignored pixels of the soft cross-entropy -sum q_teacher log p_student.
pub fn consistency(
    student_logits: &Tensor,
    teacher_probs: &Tensor,
    ignored: &Tensor,
) -> Result<Tensor> {
    let per = (teacher_probs.detach() * log_softmax(student_logits)?)?
        .sum(D::Minus1)?
        .neg()?;
    masked_mean(&per, ignored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn each_term_is_computed_on_its_own_region() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[2.0f32, 0.0], [0.0, 0.0]], &dev).unwrap();
        let conf = Tensor::new(&[1u8, 0], &dev).unwrap();
        let ign = Tensor::new(&[0u8, 1], &dev).unwrap();
        let p0 = [1.0 / (1.0 + (-2.0f32).exp()), 1.0 / (1.0 + 2.0f32.exp())];
        let s = smoothing(&logits, &conf)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((s - (-(p0[0].ln() + p0[1].ln()) / 2.0)).abs() < 1e-5);
        // Pixel 1 is uniform: entropy ln 2; consistency to a (0.9, 0.1) teacher = -ln 0.5.
        let e = entropy(&logits, &ign).unwrap().to_scalar::<f32>().unwrap();
        assert!((e - 2f32.ln()).abs() < 1e-5);
        let q = Tensor::new(&[[0.5f32, 0.5], [0.9, 0.1]], &dev).unwrap();
        let k = consistency(&logits, &q, &ign)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((k - 2f32.ln()).abs() < 1e-5);
        let none = Tensor::new(&[0u8, 0], &dev).unwrap();
        assert_eq!(
            entropy(&logits, &none).unwrap().to_scalar::<f32>().unwrap(),
            0.0
        );
    }
}
