//! What adaptation needs from the source domain, computed once after source training and stored
//! beside the weights (`source_stats.safetensors`), so the vehicle carries no source images.

use crate::adapt::controller::FrameStats;
use crate::config::PreprocessConfig;
use crate::data::{image_to_tensor, Example};
use crate::error::{Error, Result};
use crate::model::{ClassMoments, ClassNorm, Segformer, TensorMap};
use candle_core::{Device, Tensor};
use image::{imageops, GrayImage};
use std::path::Path;

pub const FILE: &str = "source_stats.safetensors";

/// Most instances stored for DIDA's bank (profiles use up to 500).
pub const BANK_MAX: usize = 512;

/// A class present in an image below this many embedding pixels gives no instance.
const MIN_INSTANCE_PIXELS: usize = 4;

/// DIDA's labeled instances: the class mean of the embedding in one source image each (as
/// DIDA's cache is built), ordered round-robin over the classes, rarest first, so any prefix of
/// K entries is a class-balanced bank of K.
#[derive(Clone)]
pub struct Instances {
    /// [K, D]
    pub feats: Tensor,
    pub labels: Vec<u32>,
}

/// Per-class statistics of the fused decoder embedding on labelled source frames.
#[derive(Clone)]
pub struct SourceStats {
    /// [C, D] class means of the embedding.
    pub mean: Tensor,
    /// [C, D] per-dimension class variances.
    pub var: Tensor,
    /// [C] embedding pixels seen per class.
    pub count: Tensor,
    /// [C] share of labelled source pixels per class (sums to 1).
    pub prior: Tensor,
    /// [C, D] L2-normalised class means: the initial prototypes.
    pub prototypes: Tensor,
    /// None in statistics written before the bank existed (`segadapt stats` adds it).
    pub bank: Option<Instances>,
    /// How the source frames look to the training budgets' shift test. None in statistics
    /// written before it existed (`segadapt stats` adds it).
    pub frames: Option<FrameStats>,
    /// The decode head's BatchNorm input by class, for a teacher that tracks its statistics
    /// under the source's class shares. None in statistics written before it existed
    /// (`segadapt stats` adds it).
    pub norm: Option<ClassNorm>,
    /// What the statistics were made from.
    pub origin: Origin,
}

/// What a statistics file was made from, recorded in its metadata (`origin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Labelled source frames (files written before the origin was recorded are read as this).
    Labels,
    /// Source frames, some labelled and the rest labelled by the model's confident predictions.
    Mixed,
    /// Unlabelled source frames, labelled by the model's confident predictions.
    Predictions,
    /// The first frames of the stream being adapted to, by the model's confident predictions:
    /// no source frame statistics and no class statistics.
    Stream,
}

impl Origin {
    pub fn name(self) -> &'static str {
        match self {
            Origin::Labels => "labels",
            Origin::Mixed => "labels+predictions",
            Origin::Predictions => "predictions",
            Origin::Stream => "stream",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Self::Labels, Self::Mixed, Self::Predictions, Self::Stream]
            .into_iter()
            .find(|o| o.name() == s)
    }
}

/// A pixel the model labels counts for the class statistics at this confidence or above, or at
/// its class's median confidence where that is lower: the classes a source model is least sure
/// of are the rare ones, and a fixed bar would leave them without prototypes or instances.
pub const CONFIDENT: f32 = 0.9;

/// Frames labelled by hand and by the model.
#[derive(Default)]
struct Made {
    labelled: usize,
    predicted: usize,
}

impl Made {
    fn origin(&self) -> Origin {
        match (self.labelled, self.predicted) {
            (_, 0) => Origin::Labels,
            (0, _) => Origin::Predictions,
            _ => Origin::Mixed,
        }
    }
}

impl SourceStats {
    /// The same statistics on `dev`.
    pub fn to_device(&self, dev: &Device) -> Result<Self> {
        Ok(Self {
            mean: self.mean.to_device(dev)?,
            var: self.var.to_device(dev)?,
            count: self.count.to_device(dev)?,
            prior: self.prior.to_device(dev)?,
            prototypes: self.prototypes.to_device(dev)?,
            bank: match &self.bank {
                Some(b) => Some(Instances {
                    feats: b.feats.to_device(dev)?,
                    labels: b.labels.clone(),
                }),
                None => None,
            },
            frames: self.frames.clone(),
            norm: self.norm.as_ref().map(|n| n.to_device(dev)).transpose()?,
            origin: self.origin,
        })
    }

    /// Runs `model` (eval mode) over `examples`. A labelled frame's label is downsampled
    /// (nearest) to the embedding; an unlabelled frame is labelled by the model's confident
    /// predictions ([`confidence_thresholds`]).
    pub fn compute(
        model: &Segformer,
        pre: &PreprocessConfig,
        examples: &[Example],
        ignore: u8,
    ) -> Result<Self> {
        let c = model.cfg.num_labels();
        let thresholds = match examples.iter().any(|e| e.label.is_none()) {
            true => confidence_thresholds(model, pre, examples)?,
            false => vec![CONFIDENT; c],
        };
        let mut acc = Moments::new(c, model.cfg.decoder_hidden_size);
        let mut frames = FrameStats::default();
        let mut made = Made::default();
        for ex in examples {
            let x = image_to_tensor(&ex.image, pre, model.device())?;
            frames.add_frames(&x)?;
            let (out, fused) = model.forward_fused(&x)?;
            let (_, h, w, _) = out.embed.dims4()?;
            let (ids, pixels) = match &ex.label {
                Some(label) => {
                    made.labelled += 1;
                    label_ids(label, ex.image.dimensions(), (w, h), c, ignore)
                }
                None => {
                    made.predicted += 1;
                    let (iw, ih) = ex.image.dimensions();
                    let scale = (iw * ih) as f64 / (w * h) as f64;
                    predicted_ids(&out.logits, &thresholds, scale)?
                }
            };
            acc.add(&out.embed, &fused, ids, &pixels)?;
        }
        acc.finish(frames, made.origin())
    }

    /// Statistics of the first frames of the stream being adapted to, by the model's confident
    /// predictions: prototypes, prior and instances, for a model that came without source
    /// statistics. The frames are not the source's, so the shift test's source frames and the
    /// decode head's class statistics are left out.
    pub fn of_stream(
        model: &Segformer,
        pre: &PreprocessConfig,
        mut frames: Vec<Example>,
    ) -> Result<Self> {
        // Target labels only score.
        frames.iter_mut().for_each(|e| e.label = None);
        let mut s = Self::compute(model, pre, &frames, u8::MAX)?;
        s.frames = None;
        s.norm = None;
        s.origin = Origin::Stream;
        Ok(s)
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut m = TensorMap::new();
        m.insert("class_mean".into(), self.mean.clone());
        m.insert("class_var".into(), self.var.clone());
        m.insert("class_count".into(), self.count.clone());
        m.insert("class_prior".into(), self.prior.clone());
        m.insert("prototypes".into(), self.prototypes.clone());
        if let Some(b) = &self.bank {
            m.insert("bank_feats".into(), b.feats.clone());
            m.insert(
                "bank_labels".into(),
                Tensor::new(b.labels.as_slice(), &Device::Cpu)?,
            );
        }
        if let Some(f) = &self.frames {
            m.insert(
                "frame_stats".into(),
                Tensor::new(f.to_vec().as_slice(), &Device::Cpu)?,
            );
        }
        if let Some(n) = &self.norm {
            m.insert("norm_class_mean".into(), n.mean.clone());
            m.insert("norm_class_var".into(), n.var.clone());
            m.insert("norm_class_count".into(), n.count.flatten_all()?);
            m.insert(
                "norm_frame_spread".into(),
                Tensor::new(&[n.spread as f32], &Device::Cpu)?,
            );
        }
        let meta = [("origin".to_string(), self.origin.name().to_string())];
        let bytes = crate::model::weights::safetensors_bytes(&m, Some(meta.into()))?;
        crate::checkpoint::write_atomic(&dir.join(FILE), &bytes)
    }

    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let path = dir.join(FILE);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let m = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| Error::data(&path, e.to_string()))?;
        let origin = read_origin(&path, &bytes)?;
        let m: crate::model::TensorMap = m.into_iter().collect();
        crate::model::weights::check_finite(&path, &m)?;
        let get = |k: &str| {
            m.get(k)
                .cloned()
                .ok_or_else(|| Error::data(&path, format!("missing tensor {k}")))
        };
        Ok(Self {
            mean: get("class_mean")?,
            var: get("class_var")?,
            count: get("class_count")?,
            prior: get("class_prior")?,
            prototypes: get("prototypes")?,
            bank: match (m.get("bank_feats"), m.get("bank_labels")) {
                (Some(f), Some(l)) => Some(Instances {
                    feats: f.clone(),
                    labels: l.to_vec1()?,
                }),
                _ => None,
            },
            frames: match m.get("frame_stats") {
                Some(t) => {
                    let v: Vec<f32> = t.to_vec1()?;
                    let v: Vec<f64> = v.into_iter().map(f64::from).collect();
                    Some(FrameStats::from_slice(&v).ok_or_else(|| {
                        Error::data(&path, format!("frame_stats: {} values", v.len()))
                    })?)
                }
                None => None,
            },
            norm: load_class_norm(&path, &m, &get("class_mean")?)?,
            origin,
        })
    }

    /// The statistics in `dir`, or None where it has no statistics file.
    pub fn load_if_present(dir: &Path, device: &Device) -> Result<Option<Self>> {
        match dir.join(FILE).exists() {
            true => Self::load(dir, device).map(Some),
            false => Ok(None),
        }
    }
}

fn read_origin(path: &Path, bytes: &[u8]) -> Result<Origin> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::data(path, e.to_string()))?;
    match meta.metadata().as_ref().and_then(|m| m.get("origin")) {
        None => Ok(Origin::Labels),
        Some(o) => Origin::parse(o)
            .ok_or_else(|| Error::data(path, format!("metadata origin {o:?}: not an origin"))),
    }
}

/// Per-class thresholds on the model's confidence for labelling unlabelled frames: the lower of
/// [`CONFIDENT`] and the class's median confidence over the pixels it wins (from a 100-bin
/// histogram).
fn confidence_thresholds(
    model: &Segformer,
    pre: &PreprocessConfig,
    examples: &[Example],
) -> Result<Vec<f32>> {
    const BINS: usize = 100;
    let c = model.cfg.num_labels();
    let mut hist = vec![[0u64; BINS]; c];
    for ex in examples.iter().filter(|e| e.label.is_none()) {
        let x = image_to_tensor(&ex.image, pre, model.device())?;
        let (conf, ids) = confidence(&model.forward(&x, None)?.logits)?;
        for (p, k) in conf.into_iter().zip(ids) {
            hist[k as usize][((p * BINS as f32) as usize).min(BINS - 1)] += 1;
        }
    }
    Ok(hist
        .iter()
        .map(|h| {
            let n: u64 = h.iter().sum();
            let mut seen = 0;
            let median = h.iter().position(|&v| {
                seen += v;
                2 * seen >= n
            });
            match (n, median) {
                (0, _) | (_, None) => CONFIDENT,
                (_, Some(b)) => CONFIDENT.min(b as f32 / BINS as f32),
            }
        })
        .collect())
}

/// Each pixel's top probability and class, from [1, h, w, C] logits.
fn confidence(logits: &Tensor) -> Result<(Vec<f32>, Vec<u32>)> {
    let probs = candle_nn::ops::softmax_last_dim(&logits.flatten_to(2)?.squeeze(0)?)?;
    Ok((probs.max(1)?.to_vec1()?, probs.argmax(1)?.to_vec1()?))
}

/// A labelled frame's classes at the embedding's `(w, h)` (the class count `c` for unlabelled
/// pixels) and its labelled pixels per class at full size.
fn label_ids(
    label: &[u8],
    (iw, ih): (u32, u32),
    (w, h): (usize, usize),
    c: usize,
    ignore: u8,
) -> (Vec<u32>, Vec<f64>) {
    let mut pixels = vec![0f64; c];
    label
        .iter()
        .filter(|&&v| (v as usize) < c)
        .for_each(|&v| pixels[v as usize] += 1.0);
    let lab = GrayImage::from_raw(iw, ih, label.to_vec()).expect("label matches image");
    let lab = imageops::resize(&lab, w as u32, h as u32, imageops::FilterType::Nearest);
    let ids = lab
        .as_raw()
        .iter()
        .map(|&v| match (v as usize) < c && v != ignore {
            true => v as u32,
            false => c as u32,
        })
        .collect();
    (ids, pixels)
}

/// An unlabelled frame's classes where the model is confident (the class count elsewhere) and
/// its predicted pixels per class, each counting `scale` pixels of the full frame.
fn predicted_ids(logits: &Tensor, thresholds: &[f32], scale: f64) -> Result<(Vec<u32>, Vec<f64>)> {
    let c = thresholds.len();
    let (conf, ids) = confidence(logits)?;
    let mut pixels = vec![0f64; c];
    let ids = conf
        .into_iter()
        .zip(ids)
        .map(|(p, k)| {
            pixels[k as usize] += scale;
            match p >= thresholds[k as usize] {
                true => k,
                false => c as u32,
            }
        })
        .collect();
    Ok((ids, pixels))
}

/// Running class sums of the embedding, the decode head's BatchNorm input and the instances.
struct Moments {
    c: usize,
    d: usize,
    sum: Vec<f64>,
    sq: Vec<f64>,
    n: Vec<f64>,
    pixels: Vec<f64>,
    instances: Vec<Vec<Vec<f32>>>,
    norm: Option<ClassMoments>,
    frame_means: Vec<Tensor>,
}

impl Moments {
    fn new(c: usize, d: usize) -> Self {
        Self {
            c,
            d,
            sum: vec![0f64; c * d],
            sq: vec![0f64; c * d],
            n: vec![0f64; c],
            pixels: vec![0f64; c],
            instances: vec![Vec::new(); c],
            norm: None,
            frame_means: Vec::new(),
        }
    }

    /// One frame: `emb` [1, h, w, D], `fused` [h*w, D], `ids` [h*w] (`c`: no class), `pixels`
    /// per class at full size.
    fn add(&mut self, emb: &Tensor, fused: &Tensor, ids: Vec<u32>, pixels: &[f64]) -> Result<()> {
        let (c, d) = (self.c, self.d);
        self.pixels
            .iter_mut()
            .zip(pixels)
            .for_each(|(a, b)| *a += b);
        let emb: Vec<f32> = emb.flatten_all()?.to_vec1()?;
        let mut own = vec![(0usize, vec![0f64; d]); c];
        for (i, &k) in ids.iter().enumerate() {
            let k = k as usize;
            if k >= c {
                continue;
            }
            self.n[k] += 1.0;
            own[k].0 += 1;
            let f = &emb[i * d..(i + 1) * d];
            let sum = &mut self.sum[k * d..(k + 1) * d];
            let sq = &mut self.sq[k * d..(k + 1) * d];
            for (j, &v) in f.iter().enumerate() {
                let v = v as f64;
                sum[j] += v;
                sq[j] += v * v;
                own[k].1[j] += v;
            }
        }
        for (k, (cnt, s)) in own.into_iter().enumerate() {
            if cnt >= MIN_INSTANCE_PIXELS {
                self.instances[k].push(s.iter().map(|v| (v / cnt as f64) as f32).collect());
            }
        }
        let n = ids.len();
        let m = ClassMoments::of(fused, &Tensor::from_vec(ids, n, fused.device())?, c)?;
        self.frame_means.push(fused.mean_keepdim(0)?);
        self.norm = Some(match self.norm.take() {
            Some(acc) => m.add(&acc)?,
            None => m,
        });
        Ok(())
    }

    fn finish(self, frames: FrameStats, origin: Origin) -> Result<SourceStats> {
        let (c, d, n) = (self.c, self.d, &self.n);
        let mut mean = vec![0f32; c * d];
        let mut var = vec![0f32; c * d];
        let mut protos = vec![0f32; c * d];
        for k in (0..c).filter(|&k| n[k] > 0.0) {
            let mut norm = 0f64;
            for j in 0..d {
                let m = self.sum[k * d + j] / n[k];
                mean[k * d + j] = m as f32;
                var[k * d + j] = (self.sq[k * d + j] / n[k] - m * m).max(0.0) as f32;
                norm += m * m;
            }
            let norm = norm.sqrt().max(1e-12);
            for j in 0..d {
                protos[k * d + j] = (mean[k * d + j] as f64 / norm) as f32;
            }
        }
        let total: f64 = self.pixels.iter().sum::<f64>().max(1.0);
        let prior: Vec<f32> = self.pixels.iter().map(|&v| (v / total) as f32).collect();
        let dev = Device::Cpu;
        Ok(SourceStats {
            mean: Tensor::from_vec(mean, (c, d), &dev)?,
            var: Tensor::from_vec(var, (c, d), &dev)?,
            count: Tensor::from_vec(n.iter().map(|&v| v as f32).collect::<Vec<_>>(), c, &dev)?,
            prior: Tensor::from_vec(prior, c, &dev)?,
            prototypes: Tensor::from_vec(protos, (c, d), &dev)?,
            bank: Some(instance_bank(self.instances, &self.pixels, d)?),
            frames: Some(frames),
            norm: match self.norm {
                Some(m) => Some(ClassNorm::from_moments(
                    &m,
                    &Tensor::cat(&self.frame_means, 0)?,
                )?),
                None => None,
            },
            origin,
        })
    }
}

/// The decode head's class statistics, if the file has them: all three tensors or none, the
/// mean and variance shaped as the class embeddings' mean ([C, D]: the head's input is as wide as
/// its output), one count per class.
fn load_class_norm(
    path: &Path,
    m: &crate::model::TensorMap,
    class_mean: &Tensor,
) -> Result<Option<ClassNorm>> {
    let names = [
        "norm_class_mean",
        "norm_class_var",
        "norm_class_count",
        "norm_frame_spread",
    ];
    let [mean, var, count, spread] = names.map(|k| m.get(k));
    let (mean, var, count, spread) = match (mean, var, count, spread) {
        (None, None, None, None) => return Ok(None),
        (Some(mean), Some(var), Some(count), Some(spread)) => (mean, var, count, spread),
        _ => {
            let missing: Vec<&str> = names.into_iter().filter(|k| !m.contains_key(*k)).collect();
            return Err(Error::data(
                path,
                format!("class statistics cut short: missing {}", missing.join(", ")),
            ));
        }
    };
    let shape_ok = mean.dims() == class_mean.dims()
        && var.dims() == mean.dims()
        && count.elem_count() == mean.dims()[0]
        && spread.elem_count() == 1;
    if !shape_ok {
        return Err(Error::data(
            path,
            format!(
                "class statistics disagree with class_mean {:?}: norm_class_mean {:?}, \
                 norm_class_var {:?}, norm_class_count {:?}, norm_frame_spread {:?}",
                class_mean.dims(),
                mean.dims(),
                var.dims(),
                count.dims(),
                spread.dims()
            ),
        ));
    }
    let spread = spread.flatten_all()?.to_vec1::<f32>()?[0] as f64;
    Ok(Some(ClassNorm::new(
        mean.clone(),
        var.clone(),
        count.clone(),
        spread,
    )?))
}

/// Per-class instance lists (image order) as a bank of at most [`BANK_MAX`]: round-robin over
/// the classes that have instances, rarest (fewest pixels) first.
fn instance_bank(per_class: Vec<Vec<Vec<f32>>>, pixels: &[f64], d: usize) -> Result<Instances> {
    let mut order: Vec<usize> = (0..per_class.len())
        .filter(|&k| !per_class[k].is_empty())
        .collect();
    order.sort_by(|&a, &b| pixels[a].total_cmp(&pixels[b]));
    let (mut feats, mut labels) = (Vec::new(), Vec::new());
    for round in 0.. {
        let before = labels.len();
        for &k in &order {
            if labels.len() == BANK_MAX {
                break;
            }
            if let Some(f) = per_class[k].get(round) {
                feats.extend_from_slice(f);
                labels.push(k as u32);
            }
        }
        if labels.len() == before || labels.len() == BANK_MAX {
            break;
        }
    }
    let k = labels.len();
    Ok(Instances {
        feats: Tensor::from_vec(feats, (k, d), &Device::Cpu)?,
        labels,
    })
}
