//! The EMA teacher update, in place: teacher <- a * teacher + (1 - a) * student for parameters,
//! BatchNorm statistics copied, with DAFormer's warm-up a_t = min(1 - 1 / (t + 1), a).

use super::ops::as_f32;
use super::segformer::Segformer;
use candle_core::{bail, CpuStorage, InplaceOp2, Layout, Result, Tensor};

/// The momentum used at step `t` (0-based) for target momentum `alpha`.
pub fn ema_momentum(alpha: f64, t: u64) -> f64 {
    alpha.min(1.0 - 1.0 / (t as f64 + 1.0))
}

struct Blend {
    alpha: f32,
}

impl InplaceOp2 for Blend {
    fn name(&self) -> &'static str {
        "ema-blend"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let src = as_f32(s2, l2, "ema-blend")?;
        let (a, b) = match l1.contiguous_offsets() {
            Some(o) => o,
            None => bail!("ema-blend: teacher tensor must be contiguous"),
        };
        let CpuStorage::F32(dst) = s1 else {
            bail!("ema-blend: teacher must be f32");
        };
        let (k, j) = (self.alpha, 1.0 - self.alpha);
        // Memory-bound: large tensors are split over the cores, small ones are not worth it.
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 16;
        dst[a..b]
            .par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(t, s)| *t = k * *t + j * s));
        Ok(())
    }
}

/// One EMA step of `teacher` towards `student` with momentum `alpha` (already warmed up).
pub fn ema_update(teacher: &Segformer, student: &Segformer, alpha: f64) -> Result<()> {
    ema_update_where(teacher, student, alpha, |_| true)
}

/// As [`ema_update`], moving only the tensors `moves` names: parameters the student does not
/// train are equal in both models already (blending them would only add rounding), and a
/// teacher may keep BatchNorm statistics of its own.
pub fn ema_update_where(
    teacher: &Segformer,
    student: &Segformer,
    alpha: f64,
    moves: impl Fn(&str) -> bool + Sync,
) -> Result<()> {
    let (t, s) = (teacher.raw_tensors(), student.raw_tensors());
    use rayon::prelude::*;
    teacher.specs().par_iter().try_for_each(|spec| {
        let (tt, st) = (&t[&spec.name], &s[&spec.name]);
        if !moves(&spec.name) {
            Ok(())
        } else if spec.trainable {
            blend(tt, st, alpha)
        } else if spec.shape.is_empty() {
            Ok(()) // the BatchNorm counter is informational
        } else {
            tt.slice_set(&st.detach(), 0, 0)
        }
    })
}

fn blend(t: &Tensor, s: &Tensor, alpha: f64) -> Result<()> {
    if crate::model::ops::fast_cpu(t.device()) {
        t.inplace_op2(
            &s.detach().contiguous()?,
            &Blend {
                alpha: alpha as f32,
            },
        )
    } else {
        let mixed = ((t * alpha)? + (s.detach() * (1.0 - alpha))?)?;
        t.slice_set(&mixed, 0, 0)
    }
}

/// A plain (graph-free) deep copy of a model's tensors: the teacher's starting point.
pub fn detached_copy(model: &Segformer) -> Result<super::TensorMap> {
    model
        .tensors()?
        .into_iter()
        .map(|(k, v)| Ok((k, v.detach().copy()?)))
        .collect()
}
