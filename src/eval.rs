//! Scoring a model on a labelled folder at each image's native resolution.

use crate::config::PreprocessConfig;
use crate::data::{image_to_tensor, Example, LabelMap};
use crate::metrics::{Confusion, Scores};
use crate::model::{ops, Segformer};
use candle_core::{Device, Result, Tensor, D};

/// Class indices [H, W] at `size` (width, height) from channel-last logits [1, h, w, C].
pub fn predict_classes(logits: &Tensor, size: (u32, u32)) -> Result<Vec<u8>> {
    let up = ops::resize_bilinear(logits, size.1 as usize, size.0 as usize)?;
    let idx = up.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?;
    Ok(idx.into_iter().map(|v| v as u8).collect())
}

/// The predicted class map of one image at its own resolution.
pub fn predict_image(
    model: &Segformer,
    pre: &PreprocessConfig,
    img: &image::RgbImage,
    dev: &Device,
) -> Result<Vec<u8>> {
    let x = image_to_tensor(img, pre, dev)?;
    let out = model.forward(&x, None)?;
    predict_classes(&out.logits, img.dimensions())
}

pub fn evaluate(
    model: &Segformer,
    pre: &PreprocessConfig,
    examples: &[Example],
    map: &LabelMap,
    dev: &Device,
) -> Result<Scores> {
    evaluate_with(model, pre, examples, map, dev, &mut || {})
}

/// [`evaluate`], calling `tick` after each frame (a progress bar).
pub fn evaluate_with(
    model: &Segformer,
    pre: &PreprocessConfig,
    examples: &[Example],
    map: &LabelMap,
    dev: &Device,
    tick: &mut dyn FnMut(),
) -> Result<Scores> {
    let mut conf = Confusion::new(map.classes.len());
    for ex in examples {
        tick();
        let Some(label) = &ex.label else { continue };
        let pred: Vec<u8> = predict_image(model, pre, &ex.image, dev)?
            .into_iter()
            .map(|p| map.model_to_eval[p as usize] as u8)
            .collect();
        conf.add(&pred, label, &map.ignore);
    }
    Ok(conf.scores(&map.classes))
}
