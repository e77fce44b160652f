//! Source replay (DAFormer/HAMLET): a bounded buffer of labelled source frames, chosen once by
//! rare-class sampling, that supplies each step's source crop and the pixels ClassMix pastes.

use super::component::{Component, Geometry, Step};
use super::config;
use crate::config::PreprocessConfig;
use crate::data::augment::photometric;
use crate::data::{normalize_into, Example};
use crate::loss::{cross_entropy, flatten_pixels};
use crate::model::Student;
use crate::SeededRng;
use candle_core::Tensor;
use image::{imageops, GrayImage, RgbImage};
use rand::Rng;

/// DAFormer's RCS: a class must cover 3000 pixels of a 1024x512 crop to count as held by a frame,
/// i.e. this share of the frame.
const MIN_SHARE: f64 = 3000.0 / (1024.0 * 512.0);

pub struct Replay {
    /// Frames at the model's input size with their labels (one byte per pixel).
    frames: Vec<(RgbImage, Vec<u8>)>,
    /// For each class, the frames holding at least [`MIN_SHARE`] of it.
    holders: Vec<Vec<usize>>,
    /// RCS class probabilities over the classes some frame holds.
    probs: Vec<f64>,
    pre: PreprocessConfig,
}

/// Label value of unlabelled source pixels inside the buffer (the step's ignore value).
pub const IGNORE: u8 = 255;

/// One source crop for a step: the normalised image [3, H, W] (photometrically distorted, as
/// source training sees it) and its labels [H * W].
pub struct SourceCrop {
    pub image: Vec<f32>,
    pub labels: Vec<u8>,
}

/// A labelled frame at `input` (width, height): image by triangle filter, labels nearest;
/// None without labels.
fn resized(e: &Example, input: (u32, u32)) -> Option<(RgbImage, Vec<u8>)> {
    let (iw, ih) = e.image.dimensions();
    let label = GrayImage::from_raw(iw, ih, e.label.clone()?)?;
    Some((
        imageops::resize(&e.image, input.0, input.1, imageops::FilterType::Triangle),
        imageops::resize(&label, input.0, input.1, imageops::FilterType::Nearest).into_raw(),
    ))
}

/// Labelled frames resized to `input` (width, height) (labels nearest): what a replay buffer
/// keeps, so a large source folder costs only its resized copy while it is chosen from.
pub fn shrink(examples: Vec<Example>, input: (usize, usize)) -> Vec<Example> {
    let input = (input.0 as u32, input.1 as u32);
    examples
        .into_iter()
        .filter_map(|e| {
            let (image, label) = resized(&e, input)?;
            Some(Example {
                name: e.name,
                image,
                label: Some(label),
            })
        })
        .collect()
}

/// RCS: P(c) = softmax((1 - f_c) / T) over the pixel frequencies `freq` (absent classes: 0).
pub fn rcs_probs(freq: &[f64], temp: f64) -> Vec<f64> {
    let logits: Vec<f64> = freq
        .iter()
        .map(|&f| {
            if f > 0.0 {
                (1.0 - f) / temp
            } else {
                f64::NEG_INFINITY
            }
        })
        .collect();
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits.iter().map(|&l| (l - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

fn pick(probs: &[f64], rng: &mut SeededRng) -> usize {
    let mut u = rng.random::<f64>();
    for (k, &p) in probs.iter().enumerate() {
        if u < p {
            return k;
        }
        u -= p;
    }
    probs.iter().rposition(|&p| p > 0.0).unwrap_or(0)
}

fn holds(labels: &[u8], classes: usize) -> Vec<bool> {
    let mut cnt = vec![0usize; classes];
    labels
        .iter()
        .filter(|&&l| (l as usize) < classes)
        .for_each(|&l| cnt[l as usize] += 1);
    let min = (MIN_SHARE * labels.len() as f64).max(1.0) as usize;
    cnt.iter().map(|&c| c >= min).collect()
}

impl Replay {
    /// Keeps at most `size` of the labelled `examples` (resized to `input` (width, height)),
    /// drawn by RCS at temperature `temp` so rare classes are in the buffer. Label values of
    /// `classes` and above become [`IGNORE`].
    pub fn new(
        examples: &[Example],
        pre: &PreprocessConfig,
        input: (u32, u32),
        size: usize,
        temp: f64,
        classes: usize,
        rng: &mut SeededRng,
    ) -> Self {
        let all: Vec<(RgbImage, Vec<u8>)> = examples
            .iter()
            .filter_map(|e| {
                let (image, mut label) = resized(e, input)?;
                label
                    .iter_mut()
                    .filter(|l| **l as usize >= classes)
                    .for_each(|l| *l = IGNORE);
                Some((image, label))
            })
            .collect();
        let probs = Self::class_probs(&all, classes, temp);
        let held: Vec<Vec<bool>> = all.iter().map(|(_, l)| holds(l, classes)).collect();
        let mut chosen: Vec<usize> = Vec::new();
        let mut taken = vec![false; all.len()];
        // Draw a class by RCS, then a frame holding it not yet kept; a class whose holders are
        // all kept stops being drawn.
        let mut p = probs.clone();
        while chosen.len() < size.min(all.len()) && p.iter().any(|&v| v > 0.0) {
            let c = pick(&p, rng);
            let free: Vec<usize> = (0..all.len())
                .filter(|&i| held[i][c] && !taken[i])
                .collect();
            if free.is_empty() {
                p[c] = 0.0;
                let s: f64 = p.iter().sum();
                p.iter_mut().for_each(|v| *v /= s.max(f64::MIN_POSITIVE));
                continue;
            }
            let i = free[rng.random_range(0..free.len())];
            taken[i] = true;
            chosen.push(i);
        }
        let frames: Vec<(RgbImage, Vec<u8>)> = chosen.iter().map(|&i| all[i].clone()).collect();
        let mut holders = vec![Vec::new(); classes];
        for (k, &i) in chosen.iter().enumerate() {
            for (c, _) in held[i].iter().enumerate().filter(|(_, &h)| h) {
                holders[c].push(k);
            }
        }
        let probs = Self::class_probs(&frames, classes, temp)
            .into_iter()
            .zip(&holders)
            .map(|(p, h)| if h.is_empty() { 0.0 } else { p })
            .collect::<Vec<_>>();
        let s: f64 = probs.iter().sum();
        Self {
            frames,
            holders,
            probs: probs.iter().map(|p| p / s.max(f64::MIN_POSITIVE)).collect(),
            pre: pre.clone(),
        }
    }

    fn class_probs(frames: &[(RgbImage, Vec<u8>)], classes: usize, temp: f64) -> Vec<f64> {
        let mut cnt = vec![0f64; classes];
        for (_, l) in frames {
            l.iter()
                .filter(|&&v| (v as usize) < classes)
                .for_each(|&v| cnt[v as usize] += 1.0);
        }
        let total: f64 = cnt.iter().sum::<f64>().max(1.0);
        rcs_probs(&cnt.iter().map(|c| c / total).collect::<Vec<_>>(), temp)
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.frames
            .iter()
            .map(|(i, l)| i.as_raw().len() + l.len())
            .sum()
    }

    /// The class of each kept frame's labels, for tests: how many frames hold class `c`.
    pub fn holders(&self, c: usize) -> usize {
        self.holders.get(c).map_or(0, |h| h.len())
    }

    /// A (width, height) crop by RCS: a class, a frame holding it, up to 10 crops until one
    /// holds half the class's minimum share; flipped with probability 1/2.
    pub fn draw(&self, crop: (usize, usize), rng: &mut SeededRng) -> Option<SourceCrop> {
        if self.frames.is_empty() {
            return None;
        }
        let c = pick(&self.probs, rng);
        let hs = &self.holders[c];
        let f = if hs.is_empty() {
            rng.random_range(0..self.frames.len())
        } else {
            hs[rng.random_range(0..hs.len())]
        };
        let (img, lab) = &self.frames[f];
        let (iw, ih) = (img.width() as usize, img.height() as usize);
        let (cw, ch) = (crop.0.min(iw), crop.1.min(ih));
        let want = (MIN_SHARE * 0.5 * (cw * ch) as f64) as usize;
        let mut pos = (0, 0);
        for _ in 0..10 {
            pos = (rng.random_range(0..=iw - cw), rng.random_range(0..=ih - ch));
            let n = (pos.1..pos.1 + ch)
                .flat_map(|y| lab[y * iw + pos.0..y * iw + pos.0 + cw].iter())
                .filter(|&&v| v as usize == c)
                .count();
            if n > want {
                break;
            }
        }
        let mut im =
            imageops::crop_imm(img, pos.0 as u32, pos.1 as u32, cw as u32, ch as u32).to_image();
        let mut labels: Vec<u8> = (pos.1..pos.1 + ch)
            .flat_map(|y| lab[y * iw + pos.0..y * iw + pos.0 + cw].iter().copied())
            .collect();
        if rng.random_bool(0.5) {
            imageops::flip_horizontal_in_place(&mut im);
            labels.chunks_mut(cw).for_each(|r| r.reverse());
        }
        photometric(&mut im, rng);
        let mut image = vec![0f32; 3 * cw * ch];
        normalize_into(&im, &self.pre, &mut image);
        // Pad to the crop size when the frame is smaller (labels ignored there).
        if (cw, ch) != crop {
            let (w, h) = crop;
            let mut pi = vec![0f32; 3 * w * h];
            let mut pl = vec![IGNORE; w * h];
            for k in 0..3 {
                for y in 0..ch {
                    pi[(k * h + y) * w..(k * h + y) * w + cw]
                        .copy_from_slice(&image[(k * ch + y) * cw..(k * ch + y + 1) * cw]);
                }
            }
            for y in 0..ch {
                pl[y * w..y * w + cw].copy_from_slice(&labels[y * cw..(y + 1) * cw]);
            }
            return Some(SourceCrop {
                image: pi,
                labels: pl,
            });
        }
        Some(SourceCrop { image, labels })
    }
}

impl Replay {
    /// One source crop per frame of the student's view `strong` [B, 3, H, W]: with `mix`, half
    /// its classes are pasted in (`labels` [B * h * w] at the logits' `cells` resolution take
    /// their classes and `pasted` marks them). Returns the view and the source batch (images
    /// [B, 3, H, W], labels u32 [B * H * W]) for the source cross-entropy.
    pub fn apply(
        &self,
        strong: &Tensor,
        labels: &mut [u32],
        pasted: &mut [bool],
        cells: (usize, usize),
        mix: bool,
        rng: &mut SeededRng,
    ) -> candle_core::Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let (b, _, ih, iw) = strong.dims4()?;
        let (plane, per) = (3 * ih * iw, cells.0 * cells.1);
        let dev = strong.device();
        let mut img: Vec<f32> = strong.flatten_all()?.to_vec1()?;
        let (mut xs, mut ys) = (
            Vec::with_capacity(b * plane),
            Vec::with_capacity(b * ih * iw),
        );
        for i in 0..b {
            let Some(src) = self.draw((iw, ih), rng) else {
                break;
            };
            if mix {
                let m = class_mix(
                    &mut img[i * plane..(i + 1) * plane],
                    &mut labels[i * per..(i + 1) * per],
                    &src,
                    (ih, iw),
                    cells,
                    rng,
                );
                pasted[i * per..(i + 1) * per]
                    .iter_mut()
                    .zip(m)
                    .for_each(|(p, m)| *p |= m);
            }
            xs.extend_from_slice(&src.image);
            ys.extend(src.labels.iter().map(|&l| l as u32));
        }
        let view = Tensor::from_vec(img, (b, 3, ih, iw), dev)?;
        if xs.is_empty() {
            return Ok((view, None));
        }
        let k = xs.len() / plane;
        Ok((
            view,
            Some((
                Tensor::from_vec(xs, (k, 3, ih, iw), dev)?,
                Tensor::from_vec(ys, k * ih * iw, dev)?,
            )),
        ))
    }
}

/// Source replay as a step component: a source crop per frame, ClassMix onto the student's
/// view, the source cross-entropy, and the replayed crop's embedding cells for the components
/// that use labelled source features.
pub struct SourceReplay {
    cfg: config::Replay,
}

impl SourceReplay {
    pub fn new(cfg: &config::Replay) -> Self {
        Self { cfg: cfg.clone() }
    }

    /// The student on the source crop: its logits' cross-entropy and its embedding [K, h, w, D].
    /// BatchNorm's running statistics are what the teacher serves the target with: the source
    /// crop normalises with its own batch statistics but must not move them.
    fn source_forward(
        student: &Student,
        xs: &Tensor,
        ys: &Tensor,
        rng: &mut SeededRng,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (_, _, ih, iw) = xs.dims4()?;
        let running: Vec<(&Tensor, Tensor)> = student
            .model
            .raw_tensors()
            .iter()
            .filter(|(n, _)| n.contains("running_"))
            .map(|(_, t)| Ok((t, t.copy()?)))
            .collect::<candle_core::Result<_>>()?;
        let out = student.model.forward(xs, Some(rng))?;
        for (t, saved) in &running {
            t.slice_set(saved, 0, 0)?;
        }
        let up = crate::model::ops::resize_bilinear(&out.logits, ih, iw)?;
        let l = cross_entropy(&flatten_pixels(&up)?, ys, None, super::IGNORE)?;
        Ok((l, out.embed))
    }
}

impl Component for SourceReplay {
    fn name(&self) -> &'static str {
        "replay"
    }

    fn view(&mut self, step: &mut Step, rng: &mut SeededRng) -> candle_core::Result<()> {
        let replay = step.replay.ok_or_else(|| {
            candle_core::Error::Msg(
                "adapt.replay.on needs labelled source frames (adapt --replay DIR)".into(),
            )
        })?;
        let (_, h, w) = step.labels.grid;
        let v = &mut step.view;
        (v.image, v.source) = replay.apply(
            &v.image,
            &mut v.train,
            &mut v.pasted,
            (h, w),
            self.cfg.mix,
            rng,
        )?;
        Ok(())
    }

    fn losses(
        &mut self,
        step: &mut Step,
        student: &Student,
        rng: &mut SeededRng,
    ) -> candle_core::Result<Vec<(&'static str, Tensor)>> {
        let Some((xs, ys)) = &step.view.source else {
            return Ok(Vec::new());
        };
        let (l, embed) = Self::source_forward(student, xs, ys, rng)?;
        let (_, _, ih, iw) = xs.dims4()?;
        let (k, fh, fw, d) = embed.dims4()?;
        let yv: Vec<u32> = ys.to_vec1()?;
        let cells: Vec<u32> = yv
            .chunks(ih * iw)
            .flat_map(|plane| cell_labels(plane, (ih, iw), (fh, fw)))
            .collect();
        if let Some(out) = step.student.as_mut() {
            out.source_cells = Some((embed.reshape((k * fh * fw, d))?, cells));
        }
        Ok(vec![("source", (l * self.cfg.weight)?)])
    }

    fn bytes(&self, g: &Geometry) -> (usize, String) {
        // RGB bytes and a label byte per pixel at the input size.
        (
            self.cfg.size * g.input.0 * g.input.1 * 4,
            format!("replay {} frames", self.cfg.size),
        )
    }
}

/// Labels of an `image` (height, width) plane at the `cells` (height, width) resolution of the
/// logits: each cell takes the label of the pixel at its centre.
pub fn cell_labels<T: Copy>(labels: &[T], image: (usize, usize), cells: (usize, usize)) -> Vec<T> {
    let ((ih, iw), (h, w)) = (image, cells);
    (0..h * w)
        .map(|q| {
            let (i, j) = (q / w, q % w);
            let y = ((2 * i + 1) * ih / (2 * h)).min(ih - 1);
            let x = ((2 * j + 1) * iw / (2 * w)).min(iw - 1);
            labels[y * iw + x]
        })
        .collect()
}

/// ClassMix (DACS) at label resolution: half the classes of the source crop (rounded up) are
/// pasted onto the target view. `target` [3, H, W] and `labels` [h * w] (the pseudo labels at
/// the logits' resolution) change in place; each label cell takes its class from the source
/// pixel at the cell's centre and carries its whole pixel block. Returns the pasted cells.
pub fn class_mix(
    target: &mut [f32],
    labels: &mut [u32],
    src: &SourceCrop,
    image: (usize, usize),
    cells: (usize, usize),
    rng: &mut SeededRng,
) -> Vec<bool> {
    let ((ih, iw), (h, w)) = (image, cells);
    let cell = cell_labels(&src.labels, image, cells);
    let mut present: Vec<u8> = cell.iter().copied().filter(|&l| l != IGNORE).collect();
    present.sort_unstable();
    present.dedup();
    let n = present.len().div_ceil(2);
    for k in 0..n {
        let j = rng.random_range(k..present.len());
        present.swap(k, j);
    }
    let chosen = &present[..n];
    let mut mask = vec![false; h * w];
    for i in 0..h {
        for j in 0..w {
            let l = cell[i * w + j];
            if !chosen.contains(&l) {
                continue;
            }
            mask[i * w + j] = true;
            labels[i * w + j] = l as u32;
            let (y0, y1) = (i * ih / h, ((i + 1) * ih / h).min(ih));
            let (x0, x1) = (j * iw / w, ((j + 1) * iw / w).min(iw));
            for k in 0..3 {
                for y in y0..y1 {
                    let r = (k * ih + y) * iw;
                    target[r + x0..r + x1].copy_from_slice(&src.image[r + x0..r + x1]);
                }
            }
        }
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn rcs_favours_rare_classes_and_skips_absent_ones() {
        let p = rcs_probs(&[0.6, 0.39, 0.01, 0.0], 0.01);
        assert!(p[2] > 0.99, "{p:?}");
        assert_eq!(p[3], 0.0);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // A high temperature flattens towards uniform over present classes.
        let q = rcs_probs(&[0.6, 0.39, 0.01, 0.0], 1e6);
        assert!((q[0] - 1.0 / 3.0).abs() < 1e-6, "{q:?}");
    }

    fn example(w: u32, h: u32, classes: &[u8]) -> Example {
        // Vertical stripes, one per class.
        let label: Vec<u8> = (0..h)
            .flat_map(|_| (0..w).map(|x| classes[(x as usize * classes.len()) / w as usize]))
            .collect();
        let image = RgbImage::from_fn(w, h, |x, _| {
            let c = classes[(x as usize * classes.len()) / w as usize];
            image::Rgb([c * 20, 100, 200 - c * 10])
        });
        Example {
            name: String::new(),
            image,
            label: Some(label),
        }
    }

    #[test]
    fn buffer_is_bounded_and_keeps_the_rare_class() {
        // Nine frames of common classes, one holding the rare class 3.
        let mut ex: Vec<Example> = (0..9).map(|_| example(32, 16, &[0, 1])).collect();
        ex.push(example(32, 16, &[0, 3]));
        let mut rng = SeededRng::seed_from_u64(0);
        let pre = PreprocessConfig::default();
        let r = Replay::new(&ex, &pre, (32, 16), 3, 0.01, 4, &mut rng);
        assert_eq!(r.len(), 3);
        assert_eq!(r.holders(3), 1, "RCS keeps the only frame with class 3");
        assert!(r.bytes() <= 3 * 32 * 16 * 4);
    }

    #[test]
    fn draws_follow_rcs_and_mix_pastes_half_the_classes() {
        let ex = vec![example(32, 16, &[0, 1, 2, 3])];
        let mut rng = SeededRng::seed_from_u64(1);
        let pre = PreprocessConfig::default();
        let r = Replay::new(&ex, &pre, (32, 16), 4, 0.01, 4, &mut rng);
        let s = r.draw((16, 16), &mut rng).expect("a crop");
        assert_eq!(s.image.len(), 3 * 16 * 16);
        assert_eq!(s.labels.len(), 16 * 16);
        let src = SourceCrop {
            image: vec![1.0; 3 * 16 * 32],
            labels: example(32, 16, &[0, 1, 2, 3]).label.unwrap(),
        };
        let mut target = vec![0.0f32; 3 * 16 * 32];
        let mut labels = vec![9u32; 4 * 8];
        let mask = class_mix(&mut target, &mut labels, &src, (16, 32), (4, 8), &mut rng);
        let pasted: Vec<u32> = {
            let mut v: Vec<u32> = labels.iter().copied().filter(|&l| l != 9).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        assert_eq!(pasted.len(), 2, "half of four classes: {pasted:?}");
        for (k, &m) in mask.iter().enumerate() {
            assert_eq!(m, labels[k] != 9);
            // The cell's pixel block came with it.
            let (i, j) = (k / 8, k % 8);
            assert_eq!(target[(i * 4) * 32 + j * 4], if m { 1.0 } else { 0.0 });
        }
    }
}
