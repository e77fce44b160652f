//! `x W^T + b` as one op that calls gemm with W read transposed in place. Through candle the
//! same layer is a transpose node, a matmul and a bias add, and the backward copies every
//! weight gradient through a strided transpose.

use super::{add_bias, as_f32, output_buffer, ColumnSum};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// `x`: [P, I], `w`: [O, I], `b`: [O] -> [P, O].
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if super::cpu_f32(x) {
        x.contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, LinearOp)
    } else {
        add_bias(&x.matmul(&w.t()?)?, b)
    }
}

struct LinearOp;

/// dst[m, n] (row-major, `n` columns) = dst * read + lhs[m, k] * rhs[k, n], where lhs and rhs
/// are read through their strides (row stride, column stride).
#[allow(clippy::too_many_arguments)]
fn gemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    read_dst: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    assert!(dst.len() >= m * n);
    assert!(m == 0 || k == 0 || lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    assert!(n == 0 || k == 0 || rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every index the strides reach inside the slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            read_dst,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let (p, i) = l1.shape().dims2()?;
        let (o, wi) = l2.shape().dims2()?;
        let (x, w, b) = (
            as_f32(s1, l1, self.name())?,
            as_f32(s2, l2, self.name())?,
            as_f32(s3, l3, self.name())?,
        );
        if wi != i || b.len() != o {
            bail!(
                "linear: x [{p}, {i}], weight [{o}, {wi}], bias [{}]",
                b.len()
            );
        }
        // Each row starts as the bias and gemm accumulates x W^T onto it.
        let mut y: Vec<f32> = b.repeat(p);
        gemm((p, o, i), &mut y, true, x, (i, 1), w, (1, i));
        Ok((CpuStorage::F32(y), Shape::from((p, o))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let dx = g.apply_op2_no_bwd(w, &MatMul { rhs_t: false })?; // g W: [P, I]
        let dw = g.apply_op2_no_bwd(x, &MatMul { rhs_t: true })?; // g^T x: [O, I]
        let db = g.apply_op1_no_bwd(&ColumnSum)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The two backward products from contiguous operands: `a b` ([P, O] x [O, I]) or, with
/// `rhs_t`, `a^T b` ([P, O]^T x [P, I]), both straight into a contiguous result.
struct MatMul {
    rhs_t: bool,
}

impl candle_core::CustomOp2 for MatMul {
    fn name(&self) -> &'static str {
        "linear-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _t = crate::profile::scope(self.name());
        let (a, b) = (as_f32(s1, l1, self.name())?, as_f32(s2, l2, self.name())?);
        let (p, o) = l1.shape().dims2()?;
        let (r, i) = l2.shape().dims2()?;
        let (m, n, k, lhs_strides) = if self.rhs_t {
            (o, i, p, (1, o)) // a^T: element (row o, col p) at p * O + o
        } else {
            (p, i, o, (o, 1))
        };
        if r != k {
            bail!("linear-grad: [{p}, {o}] against [{r}, {i}]");
        }
        let mut y = if k == 0 {
            vec![0f32; m * n]
        } else {
            output_buffer(m * n)
        };
        gemm((m, n, k), &mut y, false, a, lhs_strides, b, (i, 1));
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}
