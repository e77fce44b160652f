//! Cityscapes' layout, read as it ships: `leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`
//! with `gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png` where present, otherwise
//! `<stem>_gtFine_labelIds.png` turned into the 19 train ids by the official table. ACDC and
//! Dark Zurich ship the same tree under `rgb_anon/` and `gt/` (`_rgb_anon.png`,
//! `_gt_labelTrainIds.png`, `_gt_labelIds.png`), folders nested deeper.

use super::dataset::{LabelEncoding, Sample};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The 19 evaluation classes, in train-id order.
pub const CLASSES: [&str; 19] = [
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
];

/// The label value of pixels no class is scored on.
pub const IGNORE: u8 = 255;

/// Label id (0..=33) -> train id, from cityscapesScripts' `labels.py`; every id not listed
/// (void, parking, rail track, guard rail, bridge, tunnel, polegroup, caravan, trailer) and
/// every value past 33 is [`IGNORE`].
pub fn train_id(label_id: u8) -> u8 {
    const SCORED: [u8; 19] = [
        7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33,
    ];
    SCORED
        .iter()
        .position(|&id| id == label_id)
        .map_or(IGNORE, |t| t as u8)
}

/// One naming of the layout: its image and label folders and file suffixes.
struct Naming {
    images: &'static str,
    labels: &'static str,
    image_suffix: &'static str,
    label_prefix: &'static str,
}

const NAMINGS: [Naming; 2] = [
    Naming {
        images: "leftImg8bit",
        labels: "gtFine",
        image_suffix: "_leftImg8bit.png",
        label_prefix: "_gtFine",
    },
    Naming {
        images: "rgb_anon",
        labels: "gt",
        image_suffix: "_rgb_anon.png",
        label_prefix: "_gt",
    },
];

/// The columns `--where` filters a Cityscapes-layout folder on.
pub const COLUMNS: [&str; 4] = ["name", "split", "city", "dir"];

/// Whether `root` is laid out as Cityscapes (or ACDC, Dark Zurich) ship it.
pub fn detect(root: &Path) -> bool {
    NAMINGS.iter().any(|n| root.join(n.images).is_dir())
}

/// Every frame under `root`, in folder then name order, kept where every `(column, value)`
/// filter holds (`matches` compares a cell with a filter value).
pub fn samples(
    root: &Path,
    filters: &[(String, String)],
    matches: fn(&str, &str) -> bool,
) -> Result<Vec<Sample>> {
    if let Some((col, _)) = filters.iter().find(|(c, _)| !COLUMNS.contains(&c.as_str())) {
        return Err(Error::data(
            root,
            format!(
                "--where {col}=...: a Cityscapes-layout folder has the columns {}",
                COLUMNS.join(", ")
            ),
        ));
    }
    let naming = NAMINGS
        .iter()
        .find(|n| root.join(n.images).is_dir())
        .ok_or_else(|| Error::data(root, "no leftImg8bit/ or rgb_anon/ folder"))?;
    let images = root.join(naming.images);
    let mut files = Vec::new();
    walk(&images, &mut files)?;
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let Some(file) = path.file_name().and_then(|f| f.to_str()) else {
            continue;
        };
        let Some(stem) = file.strip_suffix(naming.image_suffix) else {
            continue;
        };
        let dir = path
            .parent()
            .and_then(|p| p.strip_prefix(&images).ok())
            .unwrap_or(Path::new(""));
        let parts: Vec<&str> = dir.iter().filter_map(|p| p.to_str()).collect();
        let dir_s = parts.join("/");
        let split = parts
            .iter()
            .find(|p| ["train", "val", "test", "train_extra", "trainval"].contains(p))
            .copied()
            .unwrap_or("");
        let cells = [stem, split, parts.last().copied().unwrap_or(""), &dir_s];
        let keep = filters.iter().all(|(c, v)| {
            let i = COLUMNS.iter().position(|k| k == c).expect("checked above");
            matches(cells[i], v)
        });
        if !keep {
            continue;
        }
        let labels = root.join(naming.labels).join(dir);
        let label_file =
            |kind: &str| labels.join(format!("{stem}{}_{kind}.png", naming.label_prefix));
        let (label, encoding) = match (label_file("labelTrainIds"), label_file("labelIds")) {
            (t, _) if t.exists() => (Some(t), LabelEncoding::ClassIndex),
            (_, i) if i.exists() => (Some(i), LabelEncoding::CityscapesIds),
            _ => (None, LabelEncoding::ClassIndex),
        };
        out.push(Sample {
            name: stem.to_string(),
            image: path.clone(),
            label,
            encoding,
        });
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_ids_become_the_official_train_ids() {
        let pairs = [
            (7, 0),
            (8, 1),
            (11, 2),
            (17, 5),
            (23, 10),
            (24, 11),
            (26, 13),
            (33, 18),
        ];
        for (id, train) in pairs {
            assert_eq!(train_id(id), train, "label id {id}");
        }
        for void in [0, 1, 6, 9, 10, 14, 15, 16, 18, 29, 30, 34, 255] {
            assert_eq!(train_id(void), IGNORE, "label id {void}");
        }
        let scored = (0..=255u8).filter(|&i| train_id(i) != IGNORE).count();
        assert_eq!(scored, CLASSES.len());
    }
}
