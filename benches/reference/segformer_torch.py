"""PyTorch reference for `segadapt bench`: transformers' SegFormer at the same shapes and thread
count, timing inference, one training step (forward, loss, backward, AdamW, EMA) and the EMA update.

    python3 benches/reference/segformer_torch.py --config b0 --size 512x256 --batch 2 [--json]

Needs torch and transformers (not used by CI). Peak memory is the process's peak RSS, which
includes PyTorch itself (about 750 MB on this machine).
"""
import argparse
import copy
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import SegformerConfig, SegformerForSemanticSegmentation

SIZES = {
    "b0": ([32, 64, 160, 256], [2, 2, 2, 2], 256),
    "b1": ([64, 128, 320, 512], [2, 2, 2, 2], 256),
    "b2": ([64, 128, 320, 512], [3, 4, 6, 3], 768),
}


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    ms = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ms), min(ms), max(ms)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="b0", choices=sorted(SIZES))
    ap.add_argument("--size", default="512x256")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    w, h = (int(v) for v in a.size.split("x"))
    hidden, depths, dec = SIZES[a.config]
    cfg = SegformerConfig(hidden_sizes=hidden, depths=depths, decoder_hidden_size=dec, num_labels=a.classes)
    # Peak RSS once torch is loaded and before any tensor exists: what the library itself takes.
    base_rss = peak_rss_mb()
    model = SegformerForSemanticSegmentation(cfg)

    model.eval()
    x1 = torch.randn(1, 3, h, w)

    def infer():
        with torch.no_grad():
            model(pixel_values=x1).logits.argmax(1)

    inf = timed(infer, a.warmup, a.reps)
    inf_rss = peak_rss_mb()

    model.train()
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    head = [p for n, p in model.named_parameters() if n.startswith("decode_head.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("decode_head.")]
    opt = torch.optim.AdamW([{"params": body, "lr": 6e-5}, {"params": head, "lr": 6e-4}], weight_decay=0.01)
    x = torch.randn(a.batch, 3, h, w)
    y = torch.randint(0, a.classes, (a.batch, h, w))
    tparams = list(teacher.parameters())
    sparams = list(model.parameters())

    def ema():
        with torch.no_grad():
            torch._foreach_mul_(tparams, 0.999)
            torch._foreach_add_(tparams, sparams, alpha=0.001)

    def step():
        logits = model(pixel_values=x).logits
        up = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        loss = F.cross_entropy(up, y, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema()

    tr = timed(step, a.warmup, a.reps)
    tr_rss = peak_rss_mb()
    em = timed(ema, a.warmup, a.reps)
    out = {
        "impl": f"pytorch {torch.__version__} transformers",
        "config": a.config,
        "size": a.size,
        "batch": a.batch,
        "threads": a.threads,
        "infer_ms": inf[0],
        "train_step_ms": tr[0],
        "ema_ms": em[0],
        "infer_peak_rss_mb": inf_rss,
        "train_peak_rss_mb": tr_rss,
        "base_rss_mb": base_rss,
    }
    if a.json:
        print(json.dumps(out))
    else:
        print(f"{out['impl']} {a.config} {a.size} batch {a.batch} ({a.threads} threads), median of {a.reps}")
        print(f"inference   {inf[0]:8.1f} ms  (min {inf[1]:.1f}, max {inf[2]:.1f})  peak RSS {inf_rss:.0f} MB")
        print(f"train step  {tr[0]:8.1f} ms  (min {tr[1]:.1f}, max {tr[2]:.1f})  peak RSS {tr_rss:.0f} MB")
        print(f"EMA update  {em[0]:8.2f} ms")


if __name__ == "__main__":
    main()
