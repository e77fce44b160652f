//! HIAST's hard-aware pseudo-label augmentation: pixels of the least confident classes, with
//! their pseudo labels, are copied from a bounded pool of recent frames into the student's view.

use super::component::{Component, Geometry, Step};
use super::config;
use crate::SeededRng;
use candle_core::{Result, Tensor};
use rand::Rng;
use std::collections::VecDeque;

/// HPLA as a step component: pastes hard-class pixels of recent frames into the student's view,
/// then pools this batch's view and pseudo labels.
pub struct Hpla {
    cfg: config::Hpla,
    paste: CopyPaste,
}

impl Hpla {
    pub fn new(cfg: &config::Hpla, classes: usize) -> Self {
        Self {
            cfg: cfg.clone(),
            paste: CopyPaste::new(classes, cfg.pool, cfg.hard, cfg.rounds),
        }
    }
}

impl Component for Hpla {
    fn name(&self) -> &'static str {
        "hpla"
    }

    fn view(&mut self, step: &mut Step, rng: &mut SeededRng) -> Result<()> {
        let cp = &mut self.paste;
        let (b, h, w) = step.labels.grid;
        let v = &mut step.view;
        cp.update_confidence(&step.labels.conf, &v.labels);
        let dims = v.image.dims().to_vec();
        let plane = dims[1] * dims[2] * dims[3];
        let original: Vec<f32> = v.image.flatten_all()?.to_vec1()?;
        let mut img = original.clone();
        for i in 0..b {
            let r = cp.paste(
                &mut img[i * plane..(i + 1) * plane],
                &mut v.train[i * h * w..(i + 1) * h * w],
                (h, w),
                (dims[2], dims[3]),
                rng,
            );
            v.pasted[i * h * w..(i + 1) * h * w].copy_from_slice(&r.mask);
        }
        for i in 0..b {
            cp.push(
                original[i * plane..(i + 1) * plane].to_vec(),
                v.labels[i * h * w..(i + 1) * h * w].to_vec(),
            );
        }
        v.image = Tensor::from_vec(img, dims, v.image.device())?;
        Ok(())
    }

    fn bytes(&self, g: &Geometry) -> (usize, String) {
        (
            self.cfg.pool * g.crop.0 * g.crop.1 * (3 + 1) * 4,
            format!("paste pool {}", self.cfg.pool),
        )
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self
            .paste
            .state()?
            .into_iter()
            .map(|(k, t)| (k.to_string(), t))
            .collect())
    }

    fn load(&mut self, get: &dyn Fn(&str) -> Option<Tensor>) -> Result<()> {
        self.paste.load_state(get)
    }
}

/// One pooled frame: its strong view [3, H, W] and pseudo labels at feature resolution [h, w].
struct Pooled {
    image: Vec<f32>,
    labels: Vec<u32>,
}

pub struct CopyPaste {
    pool: VecDeque<Pooled>,
    capacity: usize,
    hard: usize,
    rounds: usize,
    /// EMA (0.99) of each class's mean confidence over its selected pixels.
    pub class_conf: Vec<f32>,
}

/// What one paste changed: the view and labels in place, and which label pixels were pasted.
pub struct Pasted {
    pub mask: Vec<bool>,
    pub classes: Vec<usize>,
}

impl CopyPaste {
    pub fn new(classes: usize, capacity: usize, hard: usize, rounds: usize) -> Self {
        Self {
            pool: VecDeque::with_capacity(capacity),
            capacity: capacity.max(1),
            hard: hard.clamp(1, classes),
            rounds,
            class_conf: vec![1.0; classes],
        }
    }

    pub fn len(&self) -> usize {
        self.pool.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pool.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.pool
            .iter()
            .map(|p| p.image.len() * 4 + p.labels.len() * 4)
            .sum()
    }

    /// Follows each class's mean confidence over its selected pixels (classes absent this time
    /// keep their value).
    pub fn update_confidence(&mut self, conf: &[f32], labels: &[u32]) {
        let c = self.class_conf.len();
        let (mut sum, mut n) = (vec![0f64; c], vec![0usize; c]);
        for (&p, &l) in conf.iter().zip(labels) {
            if (l as usize) < c {
                sum[l as usize] += p as f64;
                n[l as usize] += 1;
            }
        }
        for k in 0..c {
            if n[k] > 0 {
                let m = (sum[k] / n[k] as f64) as f32;
                self.class_conf[k] = 0.99 * self.class_conf[k] + 0.01 * m;
            }
        }
    }

    /// The `hard` classes with the lowest running confidence.
    pub fn hard_classes(&self) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.class_conf.len()).collect();
        idx.sort_by(|&a, &b| self.class_conf[a].total_cmp(&self.class_conf[b]));
        idx.truncate(self.hard);
        idx
    }

    /// The pool and class confidences as flat tensors, for a checkpoint.
    pub fn state(&self) -> candle_core::Result<Vec<(&'static str, candle_core::Tensor)>> {
        use candle_core::{Device, Tensor};
        let dev = &Device::Cpu;
        let mut out = vec![("conf", Tensor::new(self.class_conf.as_slice(), dev)?)];
        if let Some(first) = self.pool.front() {
            let (p, hw) = (self.pool.len(), first.labels.len());
            let img: Vec<f32> = self.pool.iter().flat_map(|e| e.image.clone()).collect();
            let lab: Vec<u32> = self.pool.iter().flat_map(|e| e.labels.clone()).collect();
            out.push((
                "images",
                Tensor::from_vec(img, (p, first.image.len()), dev)?,
            ));
            out.push(("labels", Tensor::from_vec(lab, (p, hw), dev)?));
        }
        Ok(out)
    }

    /// Reads what [`CopyPaste::state`] wrote (`get` looks a part up by name).
    pub fn load_state(
        &mut self,
        get: impl Fn(&str) -> Option<candle_core::Tensor>,
    ) -> candle_core::Result<()> {
        if let Some(c) = get("conf") {
            self.class_conf = c.to_vec1()?;
        }
        self.pool.clear();
        if let (Some(img), Some(lab)) = (get("images"), get("labels")) {
            let (img, lab): (Vec<Vec<f32>>, Vec<Vec<u32>>) = (img.to_vec2()?, lab.to_vec2()?);
            for (image, labels) in img.into_iter().zip(lab) {
                self.push(image, labels);
            }
        }
        Ok(())
    }

    /// Keeps a frame's view and pseudo labels, dropping the oldest beyond the capacity.
    pub fn push(&mut self, image: Vec<f32>, labels: Vec<u32>) {
        if self.pool.len() == self.capacity {
            self.pool.pop_front();
        }
        self.pool.push_back(Pooled { image, labels });
    }

    /// Pastes into one view `image` [3, H, W] with labels [h, w] on the feature grid (any
    /// sizes: label cell (y, x) covers image rows y H / h .. (y + 1) H / h and the same for
    /// columns): up to `rounds` times draw a hard class with probability proportional to
    /// (1 - conf)^2, pick a pooled frame whose labels contain it, copy all its pixels of that
    /// class; stop once half the hard classes are in, drawing later rounds only from those not
    /// yet pasted.
    pub fn paste(
        &self,
        image: &mut [f32],
        labels: &mut [u32],
        (h, w): (usize, usize),
        (big_h, big_w): (usize, usize),
        rng: &mut SeededRng,
    ) -> Pasted {
        let mut out = Pasted {
            mask: vec![false; labels.len()],
            classes: Vec::new(),
        };
        let plane = big_h * big_w;
        let mut left = self.hard_classes();
        for _ in 0..self.rounds {
            if left.is_empty() || out.classes.len() * 2 >= self.hard {
                break;
            }
            let weights: Vec<f32> = left
                .iter()
                .map(|&k| (1.0 - self.class_conf[k]).max(0.0).powi(2) + 1e-6)
                .collect();
            let mut r = rng.random::<f32>() * weights.iter().sum::<f32>();
            let mut pick = left.len() - 1;
            for (i, wt) in weights.iter().enumerate() {
                if r < *wt {
                    pick = i;
                    break;
                }
                r -= wt;
            }
            let k = left.remove(pick);
            let having: Vec<&Pooled> = self
                .pool
                .iter()
                .filter(|p| p.labels.contains(&(k as u32)))
                .collect();
            if having.is_empty() {
                continue;
            }
            let src = having[rng.random_range(0..having.len())];
            for (i, &l) in src.labels.iter().enumerate() {
                if l != k as u32 {
                    continue;
                }
                labels[i] = k as u32;
                out.mask[i] = true;
                let (y, x) = (i / w, i % w);
                let (y0, y1) = (y * big_h / h, ((y + 1) * big_h / h).min(big_h));
                let (x0, x1) = (x * big_w / w, ((x + 1) * big_w / w).min(big_w));
                for ch in 0..3 {
                    for yy in y0..y1 {
                        let row = ch * plane + yy * big_w;
                        image[row + x0..row + x1].copy_from_slice(&src.image[row + x0..row + x1]);
                    }
                }
            }
            out.classes.push(k);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn pastes_all_pixels_of_a_hard_class_with_their_labels_and_stays_bounded() {
        let (h, w, s) = (2, 3, 2);
        let mut cp = CopyPaste::new(3, 2, 1, 3);
        // Class 2 is the least confident: the only hard class.
        cp.class_conf = vec![0.9, 0.8, 0.3];
        let src_img: Vec<f32> = (0..3 * h * s * w * s).map(|v| v as f32).collect();
        cp.push(vec![0.0; src_img.len()], vec![0; h * w]);
        cp.push(src_img.clone(), vec![0, 2, 0, 0, 0, 2]);
        cp.push(src_img.clone(), vec![0, 2, 0, 0, 0, 2]);
        assert_eq!(cp.len(), 2, "the pool keeps its capacity");
        let mut img = vec![-1f32; src_img.len()];
        let mut lab = vec![1u32; h * w];
        let mut rng = SeededRng::seed_from_u64(0);
        let p = cp.paste(&mut img, &mut lab, (h, w), (h * s, w * s), &mut rng);
        assert_eq!(p.classes, vec![2]);
        assert_eq!(lab, vec![1, 2, 1, 1, 1, 2]);
        assert_eq!(p.mask, vec![false, true, false, false, false, true]);
        let plane = h * s * w * s;
        for ch in 0..3 {
            for yy in 0..h * s {
                for xx in 0..w * s {
                    let i = ch * plane + yy * w * s + xx;
                    let pasted = lab[(yy / s) * w + xx / s] == 2;
                    assert_eq!(
                        img[i],
                        if pasted { src_img[i] } else { -1.0 },
                        "{ch} {yy} {xx}"
                    );
                }
            }
        }
    }

    #[test]
    fn pastes_into_crops_whose_sides_are_not_multiples_of_the_grid() {
        // A 50x70 view has a 13x18 feature grid (ceil of a quarter): cells cover 3 or 4 pixels.
        let ((h, w), (ih, iw)) = ((13, 18), (50, 70));
        let mut cp = CopyPaste::new(2, 1, 1, 1);
        cp.class_conf = vec![0.9, 0.2];
        let src: Vec<f32> = (0..3 * ih * iw).map(|v| v as f32).collect();
        let mut src_lab = vec![0u32; h * w];
        src_lab[h * w - 1] = 1; // the bottom-right cell
        cp.push(src.clone(), src_lab);
        let mut img = vec![-1f32; 3 * ih * iw];
        let mut lab = vec![0u32; h * w];
        let mut rng = SeededRng::seed_from_u64(0);
        let p = cp.paste(&mut img, &mut lab, (h, w), (ih, iw), &mut rng);
        assert_eq!(p.classes, vec![1]);
        assert_eq!(lab[h * w - 1], 1);
        // The last cell covers rows 46..50 and columns 66..70, up to the image's edge.
        for ch in 0..3 {
            for y in 0..ih {
                for x in 0..iw {
                    let i = ch * ih * iw + y * iw + x;
                    let inside = y >= 46 && x >= 66;
                    assert_eq!(img[i], if inside { src[i] } else { -1.0 }, "{ch} {y} {x}");
                }
            }
        }
    }

    #[test]
    fn class_confidence_follows_selected_pixels_and_ranks_hard_classes() {
        let mut cp = CopyPaste::new(3, 4, 2, 3);
        cp.update_confidence(&[0.5, 0.7, 0.2, 0.9], &[0, 0, 1, 255]);
        assert!((cp.class_conf[0] - (0.99 + 0.01 * 0.6)).abs() < 1e-6);
        assert!((cp.class_conf[1] - (0.99 + 0.01 * 0.2)).abs() < 1e-6);
        assert_eq!(cp.class_conf[2], 1.0, "absent classes keep their value");
        assert_eq!(cp.hard_classes(), vec![1, 0]);
    }
}
