"""ONNX Runtime vs torch eager latency of the exported LPT graph, and what block reuse buys in ORT.

Usage::

    python -m bench.onnx_latency                     # params.yaml geometry; trained model if there is one
    python -m bench.onnx_latency --json reports/bench/onnx_latency.json

Measured side by side in one run (round-robin: one call of each engine per round, many rounds,
so a noisy shared machine slows them alike; figures are the best call of each, the median is kept in
the JSON), with ``--threads`` (default 2) intra-op threads for both
torch and ORT:

- latency at batch 1 and 32: torch eager (``inference_mode``) vs ORT fp32 vs ORT INT8 (dynamic
  quantisation) of the block-reuse graph; ratio ORT / torch (goal <= 0.5 at batch 1); the graphs are
  exported as the export stage does (``export.optimize``, override with ``--optimize/--no-optimize``) and,
  when optimized, ``ort_fp32_unoptimized`` is the plain export beside it;
- ORT ms per image of the block-reuse graph vs a graph exported from ``forward_two_pass`` (no reuse);
  ratio two-pass / reuse (goal >= 1.25). ORT's common-subexpression elimination (on by default) notices
  that the two-pass graph computes patch embedding and blocks 0..S-1 twice on the same input and merges
  them, i.e. it performs the block reuse by itself; so the no-reuse graph is timed with that optimizer
  disabled (``ort_two_pass``: the graph as exported), and once more with ORT's defaults
  (``ort_two_pass_cse``) to show it.

The model is the final trained checkpoint (``load_trained_model``) when it exists, else the same
geometry (params.yaml ``backbone`` + ``model``, phase 2) with random weights: latency does not depend
on the weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from bench.timing import round_robin, write_figures  # noqa: E402
from lpt.config import Params, load_params  # noqa: E402
from lpt.export import export_onnx, quantize_int8  # noqa: E402
from lpt.model.lpt import CheckpointError, LPTModel, create_lpt_model, load_trained_model  # noqa: E402
from lpt.utils import seed_everything  # noqa: E402

GOAL_ORT_VS_TORCH_B1 = 0.5
GOAL_REUSE_SPEEDUP = 1.25


def load_model(params: Params) -> tuple[LPTModel, str]:
    """The trained model if its checkpoint exists, else the params geometry with random weights (phase 2)."""
    seed_everything(params.seed)
    try:
        model, _ = load_trained_model(params)
        return model.eval(), "trained checkpoint"
    except (CheckpointError, OSError, RuntimeError):
        pass
    cfg = params.model_copy(deep=True)
    cfg.backbone.weights = "none"
    cfg.train.method = "lpt"
    num_classes = cfg.data.synthetic.num_classes if cfg.data.source == "synthetic" else 100
    model = create_lpt_model(cfg, num_classes, phase=2)
    return model.eval(), "random weights (no trained checkpoint)"


def ort_session(path: Path, threads: int, cse: bool = True) -> ort.InferenceSession:
    """CPU session with ``threads`` intra-op threads; ``cse=False`` disables common-subexpression elimination."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    disabled = [] if cse else ["CommonSubexpressionElimination"]
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def run(params: Params, threads: int = 2, rounds: int = 30, batches: tuple[int, ...] = (1, 32),
        int8: bool = True, optimize: bool | None = None) -> dict[str, Any]:
    """Export the graphs to a temp folder and time everything; returns the figures.

    ``optimize`` (default ``params.export.optimize``) exports ``ort_fp32``, the two-pass and INT8 graphs
    as the export stage does; when on, ``ort_fp32_unoptimized`` is the same graph without it.
    """
    torch.set_num_threads(threads)
    model, source = load_model(params)
    size = int(model.backbone.patch_embed.img_size[0])
    with tempfile.TemporaryDirectory(prefix="lpt-onnx-bench-") as tmp:
        optimize = params.export.optimize if optimize is None else optimize
        opset = params.export.opset
        reuse = export_onnx(model, Path(tmp) / "reuse.onnx", opset=opset, optimize=optimize)
        # never optimized: with explicit attention torch's exporter CSE merges the duplicated blocks itself
        two_pass = export_onnx(model, Path(tmp) / "two_pass.onnx", opset=opset, two_pass=True)
        sessions = {"ort_fp32": ort_session(reuse, threads)}
        if optimize:  # the graph as exported without export.optimize, side by side
            plain = export_onnx(model, Path(tmp) / "reuse.plain.onnx", opset=opset)
            sessions["ort_fp32_unoptimized"] = ort_session(plain, threads)
        sessions |= {"ort_two_pass": ort_session(two_pass, threads, cse=False),
                     "ort_two_pass_cse": ort_session(two_pass, threads)}
        if int8:
            sessions["ort_int8"] = ort_session(quantize_int8(reuse, Path(tmp) / "reuse.int8.onnx"), threads)

        results: dict[str, Any] = {"model": source, "backbone": params.backbone.name,
                                   "timm_kwargs": params.backbone.timm_kwargs, "input_size": size,
                                   "model_cfg": model.cfg.model_dump(mode="json"), "threads": threads,
                                   "optimize": optimize,
                                   "rounds": rounds, "torch": torch.__version__, "onnxruntime": ort.__version__,
                                   "batches": {}}
        for batch in batches:
            x = torch.randn(batch, 3, size, size)
            feed = {"image": x.numpy()}

            def torch_eager(x: torch.Tensor = x) -> None:
                with torch.inference_mode():
                    model(x)

            fns: dict[str, Callable[[], Any]] = {"torch_eager": torch_eager}
            for name, sess in sessions.items():
                fns[name] = lambda sess=sess, feed=feed: sess.run(None, feed)
            secs = round_robin(fns, rounds if batch == 1 else max(5, rounds // 3))
            ms = {name: 1000 * min(s) for name, s in secs.items()}  # best of N: robust to other load
            plain_name = "ort_fp32_unoptimized" if "ort_fp32_unoptimized" in ms else "ort_fp32"
            entry = {
                "ms_per_batch": ms,
                "ms_per_batch_median": {name: 1000 * statistics.median(s) for name, s in secs.items()},
                "ms_per_image": {name: v / batch for name, v in ms.items()},
                "ort_fp32_vs_torch": ms["ort_fp32"] / ms["torch_eager"],
                # like for like: both graphs as exported without export.optimize
                "reuse_speedup": ms["ort_two_pass"] / ms[plain_name],
                "two_pass_with_ort_cse_vs_reuse": ms["ort_two_pass_cse"] / ms[plain_name],
            }
            if "ort_fp32_unoptimized" in ms:
                entry["ort_fp32_unoptimized_vs_torch"] = ms["ort_fp32_unoptimized"] / ms["torch_eager"]
                entry["optimize_speedup"] = ms["ort_fp32_unoptimized"] / ms["ort_fp32"]
            if "ort_int8" in ms:
                entry["ort_int8_vs_torch"] = ms["ort_int8"] / ms["torch_eager"]
            results["batches"][str(batch)] = entry
    b1 = results["batches"].get("1")
    big = results["batches"][str(max(batches))]
    results["goals"] = {
        "ort_vs_torch_batch1": {"value": b1["ort_fp32_vs_torch"] if b1 else None, "goal": f"<= {GOAL_ORT_VS_TORCH_B1}",
                                "met": bool(b1 and b1["ort_fp32_vs_torch"] <= GOAL_ORT_VS_TORCH_B1)},
        "reuse_speedup": {"value": big["reuse_speedup"], "goal": f">= {GOAL_REUSE_SPEEDUP}",
                          "met": big["reuse_speedup"] >= GOAL_REUSE_SPEEDUP, "batch": max(batches)},
    }
    return results


def format_table(res: dict[str, Any]) -> str:
    """Human-readable table of :func:`run`'s figures."""
    lines = [f"ONNX latency — {res['backbone']} {res['timm_kwargs']} @ {res['input_size']} px, {res['model']}, "
             f"{res['threads']} threads, torch {res['torch']}, onnxruntime {res['onnxruntime']}, "
             f"export.optimize {res['optimize']}",
             f"{'batch':>5}  {'engine':<20} {'ms/batch':>10} {'ms/image':>10} {'vs torch':>9} {'median ms':>10}"]
    for batch, entry in res["batches"].items():
        torch_ms = entry["ms_per_batch"]["torch_eager"]
        for name, ms in entry["ms_per_batch"].items():
            lines.append(f"{batch:>5}  {name:<20} {ms:>10.2f} {entry['ms_per_image'][name]:>10.3f} "
                         f"{ms / torch_ms:>8.2f}x {entry['ms_per_batch_median'][name]:>10.2f}")
        lines.append(f"{'':>5}  block reuse (unoptimized graphs): two-pass / reuse = {entry['reuse_speedup']:.2f}x ms per image "
                     f"(two-pass with ORT's CSE: {entry['two_pass_with_ort_cse_vs_reuse']:.2f}x)")
        if "optimize_speedup" in entry:
            lines.append(f"{'':>5}  export.optimize: unoptimized / optimized = {entry['optimize_speedup']:.2f}x")
    for name, goal in res["goals"].items():
        value = "n/a" if goal["value"] is None else f"{goal['value']:.2f}"
        lines.append(f"goal {name}: {value} (goal {goal['goal']}) -> {'met' if goal['met'] else 'NOT met'}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for torch and ORT")
    ap.add_argument("--rounds", type=int, default=30, help="timed calls per engine at batch 1 (batch 32: a third)")
    ap.add_argument("--no-int8", action="store_true", help="skip the INT8 graph")
    ap.add_argument("--optimize", action=argparse.BooleanOptionalAction, default=None,
                    help="override params export.optimize (the shipped graph's rewrites + folding)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args()
    res = run(load_params(args.params), threads=args.threads, rounds=args.rounds, int8=not args.no_int8,
              optimize=args.optimize)
    print(format_table(res))
    write_figures(args.json, res)


if __name__ == "__main__":
    main()
