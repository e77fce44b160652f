#!/usr/bin/env bash
# A camera pipe that stalls and then vanishes mid-frame: 30 dusk frames as raw RGB, a 5 s
# stall, 10 more, then half a frame and the writer is gone. `adapt --realtime` must keep the
# frames it had, say where the stream broke, end with its summary and write the adapted model.
#   benches/faults/source-gone.sh              (needs ../shared/data/camvid, python3 with Pillow)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$work/frames.rgb" <<'PY'
import csv, sys
from PIL import Image
rows = [r["name"] for r in csv.DictReader(open("../shared/data/camvid/manifest.csv")) if r["role"] == "target"]
with open(sys.argv[1], "wb") as f:
    for n in rows[:41]:
        f.write(Image.open(f"../shared/data/camvid/images/{n}.jpg").convert("RGB").resize((480, 360)).tobytes())
PY
frame=$((480 * 360 * 3))
# head closing its input ends the tail before it with SIGPIPE: expected here.
set +o pipefail
{
  head -c $((30 * frame)) "$work/frames.rgb"
  sleep 5
  tail -c +$((30 * frame + 1)) "$work/frames.rgb" | head -c $((10 * frame + frame / 2))
} | ./target/release/segadapt --quiet adapt --model models/camvid-day --source pipe:480x360:rgb24 \
    --fps 15 --realtime --out "$work/run" > "$work/out.txt" 2> "$work/log.txt" && status=0 || status=$?
set -o pipefail
echo "exit: $status"
grep -E "frames [0-9]+ served" "$work/out.txt"
grep -m1 "stream ended" "$work/log.txt" | sed 's/^\[[^]]*\] //'
test -f "$work/run/model.safetensors" && echo "adapted model written"
