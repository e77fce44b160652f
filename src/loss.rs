//! Pixel losses shared by source training and adaptation.

use crate::model::ops;
use candle_core::{DType, Result, Tensor, D};

/// Mean cross-entropy over pixels whose label is not `ignore`.
/// `logits`: [P, C]; `labels`: u32 [P]; `weight`: optional f32 [P] per-pixel weight.
/// The mean divides by the number of non-ignored pixels, as PyTorch's `ignore_index` does.
pub fn cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    weight: Option<&Tensor>,
    ignore: u32,
) -> Result<Tensor> {
    let valid = labels.ne(ignore)?; // u8 [P]

    // The fused kernel is CPU-only; elsewhere the same loss comes from differentiable ops.
    let nll = if ops::cpu_f32(logits) {
        ops::softmax_cross_entropy(logits, labels, ignore)?
    } else {
        let safe = valid.where_cond(labels, &labels.zeros_like()?)?;
        ops::log_softmax_generic(logits)?
            .gather(&safe.unsqueeze(1)?, 1)?
            .squeeze(1)?
            .neg()?
    }; // [P]
    let mut w = valid.to_dtype(DType::F32)?;
    let count = w.sum_all()?.to_scalar::<f32>()?.max(1.0);
    if let Some(pw) = weight {
        w = (w * pw)?;
    }
    (nll * w)?.sum_all()? / count as f64
}

/// Flattens channel-last logits [B, H, W, C] to [B*H*W, C].
pub fn flatten_pixels(logits: &Tensor) -> Result<Tensor> {
    let c = logits.dim(D::Minus1)?;
    logits.reshape(((), c))
}
