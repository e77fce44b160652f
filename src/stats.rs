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
        })
    }

    /// Runs `model` (eval mode) over `examples`; labels are downsampled (nearest) to the embedding.
    pub fn compute(
        model: &Segformer,
        pre: &PreprocessConfig,
        examples: &[Example],
        ignore: u8,
    ) -> Result<Self> {
        let c = model.cfg.num_labels();
        let d = model.cfg.decoder_hidden_size;
        let mut sum = vec![0f64; c * d];
        let mut sq = vec![0f64; c * d];
        let mut n = vec![0f64; c];
        let mut pixels = vec![0f64; c];
        let mut instances: Vec<Vec<Vec<f32>>> = vec![Vec::new(); c];
        let mut frames = FrameStats::default();
        let mut norm: Option<ClassMoments> = None;
        let mut frame_means = Vec::with_capacity(examples.len());
        for ex in examples {
            let x = image_to_tensor(&ex.image, pre, model.device())?;
            frames.add_frames(&x)?;
            let Some(label) = &ex.label else { continue };
            label
                .iter()
                .filter(|&&v| (v as usize) < c)
                .for_each(|&v| pixels[v as usize] += 1.0);
            let (out, fused) = model.forward_fused(&x)?;
            let emb = out.embed; // [1, h, w, D]
            let (_, h, w, _) = emb.dims4()?;
            let emb: Vec<f32> = emb.flatten_all()?.to_vec1()?;
            let (iw, ih) = ex.image.dimensions();
            let lab = GrayImage::from_raw(iw, ih, label.clone()).expect("label matches image");
            let lab = imageops::resize(&lab, w as u32, h as u32, imageops::FilterType::Nearest);
            let ids: Vec<u32> = lab
                .as_raw()
                .iter()
                .map(|&v| if v == ignore { c as u32 } else { v as u32 })
                .collect();
            let ids = Tensor::from_vec(ids, h * w, model.device())?;
            let m = ClassMoments::of(&fused, &ids, c)?;
            frame_means.push(fused.mean_keepdim(0)?);
            norm = Some(match norm {
                Some(acc) => m.add(&acc)?,
                None => m,
            });
            let mut own = vec![(0usize, vec![0f64; d]); c];
            for (i, px) in lab.as_raw().iter().enumerate() {
                let k = *px as usize;
                if k >= c || *px == ignore {
                    continue;
                }
                n[k] += 1.0;
                own[k].0 += 1;
                let f = &emb[i * d..(i + 1) * d];
                for j in 0..d {
                    sum[k * d + j] += f[j] as f64;
                    sq[k * d + j] += (f[j] as f64) * (f[j] as f64);
                    own[k].1[j] += f[j] as f64;
                }
            }
            for (k, (cnt, s)) in own.into_iter().enumerate() {
                if cnt >= MIN_INSTANCE_PIXELS {
                    instances[k].push(s.iter().map(|v| (v / cnt as f64) as f32).collect());
                }
            }
        }
        let mut mean = vec![0f32; c * d];
        let mut var = vec![0f32; c * d];
        let mut protos = vec![0f32; c * d];
        for k in 0..c {
            if n[k] == 0.0 {
                continue;
            }
            let mut norm = 0f64;
            for j in 0..d {
                let m = sum[k * d + j] / n[k];
                mean[k * d + j] = m as f32;
                var[k * d + j] = (sq[k * d + j] / n[k] - m * m).max(0.0) as f32;
                norm += m * m;
            }
            let norm = norm.sqrt().max(1e-12);
            for j in 0..d {
                protos[k * d + j] = (mean[k * d + j] as f64 / norm) as f32;
            }
        }
        let total: f64 = pixels.iter().sum::<f64>().max(1.0);
        let dev = Device::Cpu;
        Ok(Self {
            mean: Tensor::from_vec(mean, (c, d), &dev)?,
            var: Tensor::from_vec(var, (c, d), &dev)?,
            count: Tensor::from_vec(n.iter().map(|&v| v as f32).collect::<Vec<_>>(), c, &dev)?,
            prior: Tensor::from_vec(
                pixels
                    .iter()
                    .map(|&v| (v / total) as f32)
                    .collect::<Vec<_>>(),
                c,
                &dev,
            )?,
            prototypes: Tensor::from_vec(protos, (c, d), &dev)?,
            bank: Some(instance_bank(instances, &pixels, d)?),
            frames: Some(frames),
            norm: match norm {
                Some(m) => Some(ClassNorm::from_moments(&m, &Tensor::cat(&frame_means, 0)?)?),
                None => None,
            },
        })
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
        let bytes = crate::model::weights::safetensors_bytes(&m, None)?;
        crate::checkpoint::write_atomic(&dir.join(FILE), &bytes)
    }

    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let path = dir.join(FILE);
        let m = candle_core::safetensors::load(&path, device)
            .map_err(|e| Error::data(&path, e.to_string()))?;
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
