//! A dataset folder in one of two layouts, told apart by what `root` holds: `images/`, optional
//! `labels/` (8-bit PNG class indices, same stem) and an optional `manifest.csv` whose `name`
//! column orders the frames and whose columns `--where` filters; or Cityscapes' own layout
//! ([`super::cityscapes`]), filtered by `name`, `split`, `city` and `dir`.

use crate::error::{Error, Result};
use image::RgbImage;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub image: PathBuf,
    pub label: Option<PathBuf>,
    pub encoding: LabelEncoding,
}

/// What a label file's pixel values are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelEncoding {
    /// The dataset's class indices.
    ClassIndex,
    /// Cityscapes label ids, read as train ids through the official table.
    CityscapesIds,
}

impl Sample {
    /// The label plane, as class indices, where the sample has one; checked as [`load_label`]
    /// checks it.
    pub fn read_label(
        &self,
        size: (u32, u32),
        num_classes: usize,
        ignore: u8,
    ) -> Result<Option<Vec<u8>>> {
        let Some(path) = &self.label else {
            return Ok(None);
        };
        match self.encoding {
            LabelEncoding::ClassIndex => load_label(path, size, num_classes, ignore).map(Some),
            LabelEncoding::CityscapesIds => {
                let ids = load_label(path, size, 256, ignore)?;
                let train: Vec<u8> = ids.into_iter().map(super::cityscapes::train_id).collect();
                check_classes(path, &train, size.0, num_classes, ignore)?;
                Ok(Some(train))
            }
        }
    }
}

/// A decoded frame and, when present, its label plane (row-major, one byte per pixel).
pub struct Example {
    pub name: String,
    pub image: RgbImage,
    pub label: Option<Vec<u8>>,
}

pub struct Dataset {
    pub root: PathBuf,
    pub samples: Vec<Sample>,
    /// The class set the layout fixes (Cityscapes' 19), or None where the labels are the
    /// model's class indices unless a label map says otherwise.
    pub classes: Option<&'static [&'static str]>,
}

const EXTS: [&str; 4] = ["jpg", "jpeg", "png", "bmp"];

fn find_image(dir: &Path, stem: &str) -> Option<PathBuf> {
    EXTS.iter()
        .map(|e| dir.join(format!("{stem}.{e}")))
        .find(|p| p.exists())
}

impl Dataset {
    /// Lists the frames of `root`, in manifest order when there is one (name order otherwise),
    /// keeping the rows that pass every `(column, value)` filter. A value `LO..HI` keeps the
    /// range LO to HI inclusive (compared as text, so zero-padded frame numbers work).
    pub fn open(root: &Path, filters: &[(String, String)]) -> Result<Self> {
        if super::cityscapes::detect(root) {
            return Ok(Self {
                root: root.to_path_buf(),
                samples: super::cityscapes::samples(root, filters, matches)?,
                classes: Some(&super::cityscapes::CLASSES),
            });
        }
        let images = root.join("images");
        if !images.is_dir() {
            return Err(Error::data(
                root,
                "no images/ folder (nor Cityscapes' leftImg8bit/)",
            ));
        }
        let labels = root.join("labels");
        let manifest = root.join("manifest.csv");
        let names: Vec<String> = if manifest.exists() {
            read_manifest(&manifest, filters)?
        } else {
            if let Some((col, _)) = filters.first() {
                return Err(Error::data(
                    root,
                    format!("--where {col}=...: no manifest.csv to filter"),
                ));
            }
            let mut v: Vec<String> = std::fs::read_dir(&images)
                .map_err(|e| Error::io(&images, e))?
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| EXTS.contains(&e.to_ascii_lowercase().as_str()))
                })
                .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
                .collect();
            v.sort();
            v
        };
        let mut samples = Vec::with_capacity(names.len());
        for name in names {
            let Some(image) = find_image(&images, &name) else {
                log::error!(
                    "{}: manifest names {name} but no image file; skipped",
                    images.display()
                );
                continue;
            };
            let label = Some(labels.join(format!("{name}.png"))).filter(|p| p.exists());
            samples.push(Sample {
                name,
                image,
                label,
                encoding: LabelEncoding::ClassIndex,
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
            samples,
            classes: None,
        })
    }

    /// Decodes every frame with its label in `model_classes`' indices: as the folder layout
    /// stores them, or through the class names where the layout fixes its own classes (a
    /// dataset class the model lacks becomes `ignore`). Bad files are reported and skipped.
    pub fn load_for(
        &self,
        model_classes: &[String],
        ignore: u8,
        need_labels: bool,
    ) -> Result<Vec<Example>> {
        let Some(set) = self.classes else {
            return Ok(self.load_all(model_classes.len(), ignore, need_labels));
        };
        let map = super::LabelMap::by_name(model_classes, set, super::cityscapes::IGNORE)?;
        let mut to_model = [ignore; 256];
        for (m, &e) in map.model_to_eval.iter().enumerate() {
            to_model[e] = m as u8;
        }
        let mut examples = self.load_all(set.len(), super::cityscapes::IGNORE, need_labels);
        for l in examples.iter_mut().filter_map(|e| e.label.as_mut()) {
            l.iter_mut().for_each(|v| *v = to_model[*v as usize]);
        }
        Ok(examples)
    }

    /// Decodes every frame, reporting and skipping bad files (`num_classes` and `ignore` check
    /// label values). Returns the good examples.
    pub fn load_all(&self, num_classes: usize, ignore: u8, need_labels: bool) -> Vec<Example> {
        self.samples
            .iter()
            .filter_map(
                |s| match load_example(s, num_classes, ignore, need_labels) {
                    Ok(e) => Some(e),
                    Err(e) => {
                        log::error!("skipped: {e}");
                        None
                    }
                },
            )
            .collect()
    }
}

fn matches(cell: &str, want: &str) -> bool {
    match want.split_once("..") {
        Some((lo, hi)) => cell >= lo && cell <= hi,
        None => cell == want,
    }
}

fn read_manifest(path: &Path, filters: &[(String, String)]) -> Result<Vec<String>> {
    let mut rdr = csv::Reader::from_path(path).map_err(|e| Error::data(path, e.to_string()))?;
    let headers = rdr
        .headers()
        .map_err(|e| Error::data(path, e.to_string()))?
        .clone();
    let col = |c: &str| headers.iter().position(|h| h == c);
    let name_col = col("name").ok_or_else(|| Error::data(path, "manifest has no `name` column"))?;
    let filters = filters
        .iter()
        .map(|(c, v)| {
            let i = col(c).ok_or_else(|| {
                let cols = headers.iter().collect::<Vec<_>>().join(", ");
                Error::data(
                    path,
                    format!("--where {c}=...: no column {c} (columns: {cols})"),
                )
            })?;
            Ok((i, v.as_str()))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut names = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.map_err(|e| Error::data(path, format!("row {}: {e}", i + 2)))?;
        if filters
            .iter()
            .all(|&(c, v)| rec.get(c).is_some_and(|cell| matches(cell, v)))
        {
            if let Some(n) = rec.get(name_col) {
                names.push(n.to_string());
            }
        }
    }
    Ok(names)
}

pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let img = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .decode()
        .map_err(|e| Error::data(path, format!("cannot decode image: {e}")))?;
    Ok(img.to_rgb8())
}

/// Reads a label PNG: 8-bit single channel, `size` pixels, values < `num_classes` or `ignore`.
pub fn load_label(
    path: &Path,
    size: (u32, u32),
    num_classes: usize,
    ignore: u8,
) -> Result<Vec<u8>> {
    let img = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .decode()
        .map_err(|e| Error::data(path, format!("cannot decode label: {e}")))?;
    let image::DynamicImage::ImageLuma8(l) = img else {
        return Err(Error::data(
            path,
            format!("label must be 8-bit single-channel, got {:?}", img.color()),
        ));
    };
    if l.dimensions() != size {
        return Err(Error::data(
            path,
            format!(
                "label is {}x{}, image is {}x{}",
                l.width(),
                l.height(),
                size.0,
                size.1
            ),
        ));
    }
    check_classes(path, l.as_raw(), size.0, num_classes, ignore)?;
    Ok(l.into_raw())
}

/// Every value is a class (below `num_classes`) or `ignore`; the first that is not is named
/// with its pixel.
fn check_classes(
    path: &Path,
    label: &[u8],
    width: u32,
    num_classes: usize,
    ignore: u8,
) -> Result<()> {
    match label
        .iter()
        .enumerate()
        .find(|(_, &v)| v as usize >= num_classes && v != ignore)
    {
        Some((i, &v)) => Err(Error::data(
            path,
            format!(
                "class index {v} at pixel ({}, {}) is out of range (classes 0..{}, ignore {ignore})",
                i as u32 % width,
                i as u32 / width,
                num_classes - 1
            ),
        )),
        None => Ok(()),
    }
}

fn load_example(s: &Sample, num_classes: usize, ignore: u8, need_labels: bool) -> Result<Example> {
    let image = load_rgb(&s.image)?;
    let label = match s.read_label(image.dimensions(), num_classes, ignore)? {
        Some(l) => Some(l),
        None if need_labels => return Err(Error::data(&s.image, "no label for this frame")),
        None => None,
    };
    Ok(Example {
        name: s.name.clone(),
        image,
        label,
    })
}
