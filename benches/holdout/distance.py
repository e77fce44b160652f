#!/usr/bin/env python3
"""How far each target's frames are from the source frames, as the training budgets' shift test
measures it (src/adapt/controller.rs): per frame, each channel's mean, spread and mean absolute
gradient of the normalised 240x180 frame; per window of 8 frames, the mean squared z-score of
the window's mean against the source frames' statistics. Prints the median, lowest and highest
window per target; the profiles' shift threshold is 9.

    python3 benches/holdout/distance.py    # from the repository root, after make.py
"""
import csv
import glob

import numpy as np
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def descriptor(path):
    im = Image.open(path).convert("RGB").resize((240, 180), Image.BILINEAR)
    x = (np.asarray(im, dtype=np.float64) / 255 - MEAN) / STD
    d = []
    for c in range(3):
        p = x[:, :, c]
        grad = (np.abs(p[:-1, 1:] - p[:-1, :-1]) + np.abs(p[1:, :-1] - p[:-1, :-1])).mean()
        d += [p.mean(), p.std(), grad]
    return np.array(d)


def frames(root, column, value):
    rows = [r for r in csv.DictReader(open(root + "/manifest.csv")) if r.get(column) == value]
    return [glob.glob(f"{root}/images/{r['name']}.*")[0] for r in rows]


def main():
    src = np.array([descriptor(p) for p in frames("../shared/data/camvid", "role", "source-train")])
    mu, var = src.mean(0), np.maximum(src.var(0), 1e-4)
    targets = {
        "Seq05VD (clean)": ("../shared/data/camvid", "sequence", "Seq05VD"),
        "dusk": ("../shared/data/camvid", "role", "target"),
    }
    for k in ["fog", "night", "snow", "motion_blur", "contrast"]:
        targets[k] = ("../shared/data/camvid-c", "corruption", k)
    for k in ["gaussian_noise", "defocus_blur", "frost", "brightness", "spatter", "jpeg_compression"]:
        targets[k] = ("runs/data/camvid-h", "corruption", k)
    for name, spec in targets.items():
        d = np.array([descriptor(p) for p in frames(*spec)])
        w = [((d[i : i + 8].mean(0) - mu) ** 2 / var).mean() for i in range(0, len(d) - 7, 8)]
        print(f"{name:<18} median {np.median(w):5.1f}  min {min(w):5.1f}  max {max(w):5.1f}")


if __name__ == "__main__":
    main()
