#!/usr/bin/env python3
"""How far apart the held-out shifts are to the training budgets' shift test: the descriptors
of `controller::descriptors` (`distance.py`'s `descriptor`) on every third frame of each shift.
Prints each shift's per-frame spread, and the distance of a window of B's first frames (the
first 11 of those, about 32 frames) from A's statistics, as the shift test measures it (mean
squared z-score; the profiles' threshold is 9). From the repository root, after make.py:

    python3 benches/holdout/descriptors.py runs/data/camvid-h
"""
import csv
import sys

import numpy as np

from distance import descriptor

SHIFTS = ["gaussian_noise", "defocus_blur", "frost", "brightness", "spatter", "jpeg_compression"]


def main(root):
    rows = list(csv.DictReader(open(f"{root}/manifest.csv")))
    frames = {
        k: np.array(
            [descriptor(f"{root}/images/{r['name']}.jpg") for r in rows if r["corruption"] == k][::3]
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
