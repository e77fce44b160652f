#!/usr/bin/env bash
# A collapsing stream: the dusk frames, then 60 black frames, then the dusk frames again. The
# black frames must not reach training (they are served and counted as frames without
# content), and the model must not end below source-only on the dusk frames (scored with their
# labels, never trained on).
#   benches/faults/collapse.sh                 (needs ../shared/data/camvid, python3 with Pillow)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$work/drive" <<'PY'
import csv, os, shutil, sys
from PIL import Image
d = sys.argv[1]
os.makedirs(f"{d}/images")
rows = [r["name"] for r in csv.DictReader(open("../shared/data/camvid/manifest.csv")) if r["role"] == "target"]
names = []
for k, n in enumerate(rows + [None] * 60 + rows):
    name = f"{len(names):04d}"
    if n is None:
        Image.new("RGB", (480, 360)).save(f"{d}/images/{name}.png")
    else:
        shutil.copy(f"../shared/data/camvid/images/{n}.jpg", f"{d}/images/{name}.jpg")
    names.append(name)
open(f"{d}/manifest.csv", "w").write("name\n" + "\n".join(names) + "\n")
PY
# The deployed profile, and the same with one set of weights carried through (no budgets).
sed 's/^budget.on = true/budget.on = false/' firmware-configs/x86-64-cpu.toml > "$work/one-set.toml"
for profile in x86-64-cpu "$work/one-set.toml"; do
  echo "== profile $(basename "$profile")"
  ./target/release/segadapt --quiet adapt --model models/camvid-day --source "folder:$work/drive" \
    --profile "$profile" --steps-per-frame 1 --eval-data ../shared/data/camvid --eval-where role=target \
    --out "$work/run" > "$work/out.txt" 2> "$work/log.txt"
  grep -E "training steps|without content|mIoU" "$work/out.txt"
  echo "rollbacks logged: $(grep -c 'rolling back' "$work/log.txt")"
  rm -rf "$work/run"
done
