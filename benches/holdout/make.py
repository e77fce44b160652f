#!/usr/bin/env python3
"""Held-out shifts of CamVid's day test sequence, for checking defaults on targets nobody chose
them on (benches/suites/holdout.toml). Six ImageNet-C corruptions that CamVid-C does not have,
each applied to the 171 frames of Seq05VD, seeded from the frame's name:

    pip install imagecorruptions
    python3 benches/holdout/make.py ../shared/data/camvid runs/data/camvid-h

Writes images/KIND_Seq05VD_fNNNNN.jpg (q92), the unchanged labels, and a manifest with a
`corruption` column, in the layout of ../shared/data/camvid-c.
"""
import csv
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
from imagecorruptions import corrupt
from PIL import Image

SHIFTS = [
    ("gaussian_noise", 3),
    ("defocus_blur", 3),
    ("frost", 3),
    ("brightness", 4),
    ("spatter", 3),
    ("jpeg_compression", 4),
]


def main(src: Path, out: Path) -> None:
    rows = [r for r in csv.DictReader(open(src / "manifest.csv")) if r["sequence"] == "Seq05VD"]
    rows.sort(key=lambda r: r["frame"])
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "corruption", "severity", "sequence", "frame"])
        for kind, severity in SHIFTS:
            for r in rows:
                name = f"{kind}_Seq05VD_{r['frame']}"
                np.random.seed(zlib.crc32(name.encode()))
                img = np.array(Image.open(next((src / "images").glob(r["name"] + ".*"))).convert("RGB"))
                bad = corrupt(img, corruption_name=kind, severity=severity)
                Image.fromarray(np.uint8(bad)).save(out / "images" / f"{name}.jpg", quality=92)
                shutil.copy(src / "labels" / f"{r['name']}.png", out / "labels" / f"{name}.png")
                w.writerow([name, kind, severity, "Seq05VD", r["frame"]])
            print(f"{kind}: {len(rows)} frames", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
