"""LPT on every supported timm ViT family: phase-2 / phase-1 train-step time and ONNX export parity.

Usage::

    python -m bench.families                 # every family of lpt.model.families.FAMILIES, CPU
    python -m bench.families --markdown      # also the docs/model.md table rows

Each family is its tiny random-weight test config (``FamilyInfo.tiny_kwargs``, the one
``tests/test_families.py`` builds) with the LPT geometry T = 10, P = 20, S = L/2, k = 2, 100 classes, one
batch of random images. A train step is ``bench.train_step``'s: forward + A-GCL with the key term +
backward + SGD step. Phase 1 and phase 2 (block reuse) of every family are timed round-robin (one step of
each per round, median over rounds), so a loaded machine slows them alike and the ratio stays meaningful.
Parity: the phase-2 model exported as ``lpt export`` does (``optimize=True``), ORT vs torch on
``--parity-images`` random images: max |Δ cosine logit| and top-1 agreement (random weights: the logits
are small; the figure shows the graph computes the same function, not a trained model's margin).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.train_step import Bench, Preset  # noqa: E402
from lpt.config import BackboneConfig, ModelConfig  # noqa: E402
from lpt.model.families import FAMILIES, FamilyInfo, prefix_breakdown  # noqa: E402
from bench.timing import write_figures


def _preset(fam: FamilyInfo, batch: int) -> Preset:
    kw = dict(fam.tiny_kwargs)
    return Preset(fam.name, BackboneConfig(name=fam.example, weights="none", timm_kwargs=kw),
                  ModelConfig(prompt_length=10, pool_size=20, shared_blocks=kw["depth"] // 2, top_k=2),
                  img_size=kw["img_size"], num_classes=100, batch=batch)


def _parity(bench: Bench, images: int) -> tuple[float, float]:
    """(max |Δlogit|, top-1 agreement) of the optimised ONNX export vs torch, phase 2."""
    import onnxruntime as ort

    from lpt.export import export_onnx

    model = bench.models[2]
    model.eval()
    size = bench.preset.img_size
    x = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_onnx(model, Path(tmp) / "model.onnx", input_size=size, optimize=True)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        logits = sess.run(None, {"image": x.numpy()})[0]
    with torch.inference_mode():
        ref = model(x).logits.numpy()
    return float(np.abs(logits - ref).max()), float((logits.argmax(1) == ref.argmax(1)).mean())


def run(batch: int, rounds: int, warmup: int, threads: int, parity_images: int) -> dict[str, Any]:
    """Time phase 1 / phase 2 train steps of every family round-robin, then check export parity."""
    if threads > 0:
        torch.set_num_threads(threads)
    device = torch.device("cpu")
    benches = {fam.name: Bench(_preset(fam, batch), device, False, batch) for fam in FAMILIES}
    for bench in benches.values():
        for phase in (1, 2):
            bench.configure(phase, True, True)
            for _ in range(warmup):
                bench.train_step()
    times: dict[tuple[str, int], list[float]] = {(n, p): [] for n in benches for p in (1, 2)}
    for _ in range(rounds):
        for name, bench in benches.items():
            for phase in (1, 2):
                bench.configure(phase, True, True)
                t0 = time.perf_counter()
                bench.train_step()
                times[(name, phase)].append(time.perf_counter() - t0)
    rows = []
    for fam in FAMILIES:
        bench = benches[fam.name]
        bb = bench.model.backbone
        p1, p2 = statistics.median(times[(fam.name, 1)]), statistics.median(times[(fam.name, 2)])
        diff, agree = _parity(bench, parity_images)
        rows.append({
            "family": fam.name, "example": fam.example, "tiny_kwargs": fam.tiny_kwargs,
            "class": type(bb).__name__, "prefix_tokens": int(bb.num_prefix_tokens), "prefix": prefix_breakdown(bb),
            "pooling": bench.model.family.pooling(bb), "phase1_step_s": p1, "phase2_step_s": p2,
            "phase2_over_phase1": p2 / p1, "parity_max_abs_diff": diff, "parity_top1_agreement": agree,
        })
    return {"batch": batch, "rounds": rounds, "threads": torch.get_num_threads(), "device": "cpu",
            "geometry": "T=10 P=20 S=L/2 k=2 C=100", "families": rows}


def format_table(res: dict[str, Any]) -> str:
    lines = [f"LPT per family (tiny random-weight configs): {res['geometry']}, batch {res['batch']}, "
             f"{res['threads']} threads, {res['rounds']} rounds (median), CPU",
             f"{'family':<15} {'prefix':>6} {'phase-1 ms':>10} {'phase-2 ms':>10} {'p2/p1':>6} {'parity max|Δ|':>14} "
             f"{'top-1 agree':>11}  pooling"]
    for r in res["families"]:
        lines.append(f"{r['family']:<15} {r['prefix_tokens']:>6} {1e3 * r['phase1_step_s']:>10.1f} "
                     f"{1e3 * r['phase2_step_s']:>10.1f} {r['phase2_over_phase1']:>6.2f} "
                     f"{r['parity_max_abs_diff']:>14.2e} {r['parity_top1_agreement']:>11.3f}  {r['pooling']}")
    return "\n".join(lines)


def format_markdown(res: dict[str, Any]) -> str:
    """The docs/model.md family table."""
    lines = ["| family | tiny config in tests | prefix tokens | pooling (query = head feature) | "
             "train step phase-2/phase-1 (CPU) | export parity max \\|Δlogit\\| |",
             "|---|---|---|---|---|---|"]
    for r in res["families"]:
        kw = r["tiny_kwargs"]
        cfg = (f"`{r['example']}` {kw['img_size']} px, patch {kw['patch_size']}, D {kw['embed_dim']}, "
               f"L {kw['depth']}, {kw['num_heads']} heads")
        prefix = " + ".join(f"{v} {k}" for k, v in r["prefix"].items()) or "none"
        lines.append(f"| {r['family']} | {cfg} | {r['prefix_tokens']} ({prefix}) | {r['pooling']} | "
                     f"{r['phase2_over_phase1']:.2f} | {r['parity_max_abs_diff']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.families", description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--parity-images", type=int, default=64)
    ap.add_argument("--markdown", action="store_true", help="also print the docs/model.md table")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    res = run(args.batch, args.rounds, args.warmup, args.threads, args.parity_images)
    print(format_table(res))
    if args.markdown:
        print()
        print(format_markdown(res))
    write_figures(args.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
