#!/usr/bin/env python3
"""How far apart the held-out shifts are to the training budgets' shift test: the descriptors
of `controller::descriptors` (each channel's mean, standard deviation and mean absolute
gradient, on frames resized to 240x180 and normalised as the model's preprocessor does), on
every third frame of each shift. Prints each shift's per-frame spread, and the distance of a
window of B's first frames (the first 11 of those, about 32 frames) from A's statistics, as
the shift test measures it (mean squared z-score; the profiles' threshold is 9):

    python3 benches/holdout/descriptors.py runs/data/camvid-h
"""
import csv
import sys

import numpy as np
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
SHIFTS = ["gaussian_noise", "defocus_blur", "frost", "brightness", "spatter", "jpeg_compression"]


def descriptors(path):
    im = Image.open(path).convert("RGB").resize((240, 180), Image.BILINEAR)
    x = ((np.asarray(im, dtype=np.float32) / 255.0 - MEAN) / STD).astype(np.float32)
    d = []
    for c in range(3):
        p = x[:, :, c]
        grad = (np.abs(p[:-1, 1:] - p[:-1, :-1]) + np.abs(p[1:, :-1] - p[:-1, :-1])).mean()
        d += [p.mean(), p.std(), grad]
    return np.array(d)


def main(root):
    rows = list(csv.DictReader(open(f"{root}/manifest.csv")))
    frames = {
        k: np.array(
            [descriptors(f"{root}/images/{r['name']}.jpg") for r in rows if r["corruption"] == k][::3]
        )
        for k in SHIFTS
    }
    print("per-frame standard deviation of each descriptor:")
    for k in SHIFTS:
        print(f"{k:18}", np.round(frames[k].std(0), 3))
    print("distance of B's first window (columns) from A's statistics (rows):")
    print(" " * 18 + " ".join(f"{b[:8]:>8}" for b in SHIFTS))
    for a in SHIFTS:
        var = np.maximum(frames[a].var(0), 1e-4)
        mean = frames[a].mean(0)
        row = [(((frames[b][:11].mean(0) - mean) ** 2) / var).mean() for b in SHIFTS]
        print(f"{a:18}" + " ".join(f"{v:8.1f}" for v in row))


if __name__ == "__main__":
    main(sys.argv[1])
