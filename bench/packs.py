"""Task packs vs separate single-task exports: memory, disk and latency, side by side in one run.

Usage::

    python -m bench.packs                              # params.yaml geometry, 1 / 4 / 16 tasks
    python -m bench.packs --threads 1 --json bench/results/packs.json

Three ways to serve N tasks of one frozen backbone, all built here from the params geometry (``backbone``
+ ``model``, method ``lpt``, phase 2) with random backbone weights and random task tensors per task
(memory and latency do not depend on the values; no training needed):

- ``single``: N single-task exports (``lpt export``'s graph, ``export.optimize`` as in params), one
  ONNX Runtime session each (:class:`lpt.runtime.Predictor`), i.e. N copies of the backbone;
- ``packs``: one backbone graph with the task tensors as inputs + N packs (what ``lpt pack`` writes),
  one session (``Predictor(backbone, packs=[...])``): the shipped design;
- ``shared_init``: the alternative that was measured against it: one session per task whose graph holds
  that task's tensors as initializers while the backbone weights are ONNX Runtime values shared by every
  session (``SessionOptions.add_external_initializers``), with one arena allocator shared by all sessions
  (``session.use_env_allocators``), which is this alternative at its leanest.

Figures:

- resident memory (``VmRSS`` from ``/proc/self/status``; ``VmHWM`` = peak) of a fresh Python process per
  configuration, after loading and after one batch of ``--mem-batch`` images per task (activation arenas
  grown), beside a baseline process that only imports the same modules; disk = the files each way ships;
  goal: 16 tasks as packs <= 1.2x the memory of one single-task model (whole process), also shown above
  the baseline;
- latency per image per task at batch 1 and 32, every image run for ``--latency-tasks`` tasks (round-robin:
  one call of each way per round, best of N): packs / single (goal <= 1.1x) and shared_init / single.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.timing import round_robin, write_figures  # noqa: E402  (torch-free: the memory children import this module)

GOAL_MEMORY_16 = 1.2
GOAL_LATENCY = 1.1
CONFIGS = ("single", "packs", "shared_init")


# ------------------------------------------------------------------------------------------ the child
def _status_mb(key: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MB (``/proc/self/status`` is in kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


def _shared_init_sessions(folder: Path, n: int, threads: int) -> list[Any]:
    """``shared_init``: one session per task, the backbone weights shared as ORT values across sessions."""
    import numpy as np
    import onnxruntime as ort
    from safetensors.numpy import load_file

    weights = load_file(str(folder / "shared_init" / "backbone_weights.safetensors"))
    values = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    ort.create_and_register_allocator(  # one arena for every session (else each session grows its own)
        ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT),
        ort.OrtArenaCfg(0, -1, -1, -1))
    sessions = []
    for i in range(n):
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3
        options.add_session_config_entry("session.use_env_allocators", "1")
        options.add_external_initializers(list(values), list(values.values()))
        model = (folder / "shared_init" / f"task{i:02d}.onnx").read_bytes()
        sessions.append(ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]))
    return sessions


def child(config: str, n: int, folder: Path, threads: int, batch: int) -> dict[str, Any]:
    """Load ``n`` tasks the ``config`` way, run one batch per task; RSS after each step (fresh process)."""
    import numpy as np
    import onnxruntime  # noqa: F401  every configuration (and the baseline) imports the same modules
    import safetensors.numpy  # noqa: F401

    from lpt.runtime import Predictor

    out: dict[str, Any] = {"config": config, "tasks": n, "rss_imports_mb": _status_mb("VmRSS")}
    x = np.random.default_rng(0).standard_normal((batch, 3, *_input_hw(folder))).astype(np.float32)
    runs: list[Callable[[], Any]] = []
    if config == "single":
        predictors = [Predictor(folder / "single" / f"task{i:02d}.onnx", providers=["CPUExecutionProvider"],
                                intra_op_num_threads=threads) for i in range(n)]
        runs = [lambda p=p: p.run(x) for p in predictors]
    elif config == "packs":
        packs = [folder / "packs" / f"task{i:02d}.pack" for i in range(n)]
        predictor = Predictor(folder / "packs" / "backbone.onnx", packs=packs, providers=["CPUExecutionProvider"],
                              intra_op_num_threads=threads) if n else None
        runs = [lambda i=i: predictor.run(x, task=i) for i in range(n)]
    elif config == "shared_init":
        sessions = _shared_init_sessions(folder, n, threads) if n else []
        runs = [lambda s=s: s.run(None, {"image": x}) for s in sessions]
    elif config != "baseline":
        raise SystemExit(f"unknown configuration {config!r}")
    out["rss_loaded_mb"] = _status_mb("VmRSS")
    for run in runs:
        run()
    out["rss_mb"] = _status_mb("VmRSS")
    out["hwm_mb"] = _status_mb("VmHWM")
    return out


def _input_hw(folder: Path) -> tuple[int, int]:
    size = json.loads((folder / "geometry.json").read_text())["input_size"]
    return size, size


# ------------------------------------------------------------------------------------------ the parent
def build(params: Any, folder: Path, n: int, seed: int = 0) -> dict[str, Any]:
    """Write ``n`` single-task exports, the backbone graph + ``n`` packs, and the shared-initializer models."""
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper
    from safetensors.numpy import save_file

    from lpt.export import build_metadata, export_onnx, write_metadata
    from lpt.model.lpt import create_lpt_model
    from lpt.pack import (backbone_graph_metadata, build_pack_metadata, export_backbone_graph, pack_geometry,
                          pack_tensors, write_pack)
    from lpt.utils import seed_everything

    cfg = params.model_copy(deep=True)
    cfg.backbone.weights = "none"
    cfg.train.method = "lpt"
    num_classes = cfg.data.synthetic.num_classes if cfg.data.source == "synthetic" else 100
    seed_everything(seed)
    model = create_lpt_model(cfg, num_classes, phase=2).eval()
    size = cfg.transforms.input_size
    geometry = pack_geometry(model, size)
    (folder / "geometry.json").write_text(json.dumps(geometry))
    class_names = [f"class_{c}" for c in range(num_classes)]
    ckpt = {"backbone": {"name": cfg.backbone.name, "timm_kwargs": dict(cfg.backbone.timm_kwargs),
                         "ln_eps": cfg.backbone.ln_eps}}
    for sub in ("single", "packs", "shared_init"):
        (folder / sub).mkdir(parents=True, exist_ok=True)

    graph = export_backbone_graph(model, folder / "packs" / "backbone.onnx", opset=cfg.export.opset,
                                  optimize=cfg.export.optimize, input_size=size)
    write_metadata(graph, backbone_graph_metadata(model, ckpt, geometry, opset=cfg.export.opset,
                                                  optimize=cfg.export.optimize))
    # shared_init: the backbone graph with the task inputs turned into initializers, per task; the backbone's
    # own initializers marked external (their values come from the shared ORT values, never from a file)
    base = onnx.load(str(graph))
    task_inputs = set(geometry["task_inputs"])
    # (weights only: small shape constants stay inline, ORT's shape inference reads them at load)
    shared = {i.name: numpy_helper.to_array(i) for i in base.graph.initializer
              if i.name not in task_inputs and i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) >= 256}
    save_file({k: np.ascontiguousarray(v) for k, v in shared.items()},
              str(folder / "shared_init" / "backbone_weights.safetensors"))
    for init in base.graph.initializer:
        if init.name not in shared:
            continue
        init.ClearField("raw_data")
        init.data_location = onnx.TensorProto.EXTERNAL
        entry = init.external_data.add()
        entry.key, entry.value = "location", "shared-by-the-session-options.bin"
    kept_inputs = [i for i in base.graph.input if i.name not in task_inputs]
    del base.graph.input[:]
    base.graph.input.extend(kept_inputs)

    gen = torch.Generator().manual_seed(seed + 1)
    timings = {"single_export_s": 0.0}
    for i in range(n):
        with torch.no_grad():  # a new task: new random prompts, keys and head on the same backbone
            for p in (model.shared_prompt.prompt, model.group_pool.prompts, model.group_pool.keys, model.head.weight):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        t0 = time.perf_counter()
        single = export_onnx(model, folder / "single" / f"task{i:02d}.onnx", opset=cfg.export.opset,
                             input_size=size, optimize=cfg.export.optimize)
        write_metadata(single, build_metadata(cfg, model, class_names, ckpt))
        timings["single_export_s"] += time.perf_counter() - t0
        tensors = pack_tensors(model)
        meta = build_pack_metadata(cfg, model, class_names, ckpt, metrics={}, verdict={"passed": None},
                                   geometry=geometry)
        meta["name"] = f"task{i:02d}"
        write_pack(folder / "packs" / f"task{i:02d}.pack", tensors, meta)
        task_model = onnx.ModelProto()
        task_model.CopyFrom(base)
        task_model.graph.initializer.extend(numpy_helper.from_array(v.numpy(), k) for k, v in tensors.items())
        (folder / "shared_init" / f"task{i:02d}.onnx").write_bytes(task_model.SerializeToString())
    return timings


def disk(folder: Path, n: int) -> dict[str, int]:
    """Bytes each way ships for ``n`` tasks."""
    size = lambda p: p.stat().st_size  # noqa: E731
    return {
        "single": sum(size(folder / "single" / f"task{i:02d}.onnx") for i in range(n)),
        "packs": size(folder / "packs" / "backbone.onnx") + sum(size(folder / "packs" / f"task{i:02d}.pack")
                                                                for i in range(n)),
        "shared_init": size(folder / "shared_init" / "backbone_weights.safetensors")
        + sum(size(folder / "shared_init" / f"task{i:02d}.onnx") for i in range(n)),
    }


def memory(folder: Path, task_counts: list[int], threads: int, batch: int) -> list[dict[str, Any]]:
    """One fresh process per (configuration, task count), plus the imports-only baseline."""
    rows = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    for config, n in [("baseline", 0)] + [(c, n) for n in task_counts for c in CONFIGS]:
        proc = subprocess.run([sys.executable, "-m", "bench.packs", "--child", config, str(n), str(folder),
                               "--threads", str(threads), "--mem-batch", str(batch)],
                              capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode:
            raise RuntimeError(f"memory child {config} {n} failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def latency(folder: Path, tasks: int, threads: int, rounds: int, batches: tuple[int, ...]) -> dict[str, Any]:
    """ms per image per task, each way running ``tasks`` tasks on every batch, round-robin."""
    import numpy as np

    from lpt.runtime import Predictor

    singles = [Predictor(folder / "single" / f"task{i:02d}.onnx", providers=["CPUExecutionProvider"],
                         intra_op_num_threads=threads) for i in range(tasks)]
    packs = Predictor(folder / "packs" / "backbone.onnx", providers=["CPUExecutionProvider"],
                      packs=[folder / "packs" / f"task{i:02d}.pack" for i in range(tasks)],
                      intra_op_num_threads=threads)
    shared = _shared_init_sessions(folder, tasks, threads)
    out: dict[str, Any] = {}
    for batch in batches:
        x = np.random.default_rng(batch).standard_normal((batch, 3, *_input_hw(folder))).astype(np.float32)
        for i in range(tasks):  # same outputs, whichever way (the packs are these tasks)
            ref = singles[i].run(x)[0]
            assert np.abs(packs.run(x, task=i)[0] - ref).max() < 1e-4
            assert np.abs(shared[i].run(None, {"image": x})[0] - ref).max() < 1e-4
        fns = {"single": lambda x=x: [p.run(x) for p in singles],
               "packs": lambda x=x: [packs.run(x, task=i) for i in range(tasks)],
               "shared_init": lambda x=x: [s.run(None, {"image": x}) for s in shared]}
        secs = round_robin(fns, rounds if batch == 1 else max(5, rounds // 3))
        per_image_task = {k: 1000 * min(v) / (batch * tasks) for k, v in secs.items()}  # best of N
        out[str(batch)] = {
            "ms_per_image_per_task": per_image_task,
            "ms_per_image_per_task_median": {k: 1000 * statistics.median(v) / (batch * tasks) for k, v in secs.items()},
            "packs_vs_single": per_image_task["packs"] / per_image_task["single"],
            "shared_init_vs_single": per_image_task["shared_init"] / per_image_task["single"],
        }
    return out


def run(params: Any, task_counts: list[int], threads: int = 2, rounds: int = 30, latency_tasks: int = 4,
        batches: tuple[int, ...] = (1, 32), mem_batch: int = 32) -> dict[str, Any]:
    """Build everything in a temp folder, then measure disk, memory (child processes) and latency."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="lpt-packs-bench-") as tmp:
        folder = Path(tmp)
        n = max(task_counts + [latency_tasks])
        build_times = build(params, folder, n, seed=params.seed)
        geometry = json.loads((folder / "geometry.json").read_text())
        mem = memory(folder, task_counts, threads, mem_batch)
        lat = latency(folder, latency_tasks, threads, rounds, batches)
        res: dict[str, Any] = {
            "backbone": params.backbone.name, "timm_kwargs": params.backbone.timm_kwargs, "geometry": geometry,
            "model_cfg": params.model.model_dump(mode="json"), "threads": threads, "rounds": rounds,
            "latency_tasks": latency_tasks, "mem_batch": mem_batch, "onnxruntime": ort.__version__,
            "optimize": params.export.optimize, "build": build_times,
            "disk_bytes": {str(k): disk(folder, k) for k in task_counts}, "memory": mem, "latency": lat,
        }
    base = next(r for r in mem if r["config"] == "baseline")["rss_mb"]
    by = {(r["config"], r["tasks"]): r for r in mem}
    one = by[("single", 1)]["rss_mb"]
    res["memory_ratios"] = {
        f"{c}_{k}": {"rss_vs_one_single": by[(c, k)]["rss_mb"] / one,
                     "above_baseline_vs_one_single": (by[(c, k)]["rss_mb"] - base) / (one - base)}
        for k in task_counts for c in CONFIGS}
    k_max = max(task_counts)
    mem_value = res["memory_ratios"][f"packs_{k_max}"]["rss_vs_one_single"]
    lat_value = max(v["packs_vs_single"] for v in lat.values())
    res["goals"] = {
        f"memory_{k_max}_packs_vs_one_single": {"value": mem_value, "goal": f"<= {GOAL_MEMORY_16}",
                                                "met": mem_value <= GOAL_MEMORY_16},
        "latency_packs_vs_single_worst_batch": {"value": lat_value, "goal": f"<= {GOAL_LATENCY}",
                                                "met": lat_value <= GOAL_LATENCY},
    }
    return res


def format_table(res: dict[str, Any]) -> str:
    """Human-readable tables of :func:`run`'s figures."""
    g = res["geometry"]
    lines = [f"Task packs — {res['backbone']} {res['timm_kwargs']}, L={g['depth']} D={g['embed_dim']} "
             f"S={g['shared_blocks']} k={g['top_k']}, T={res['model_cfg']['prompt_length']} "
             f"P={res['model_cfg']['pool_size']}, {res['threads']} threads, onnxruntime {res['onnxruntime']}",
             "", f"memory (fresh process each; RSS after one batch of {res['mem_batch']} per task; MB)",
             f"{'tasks':>5}  {'way':<12} {'RSS':>8} {'peak':>8} {'above base':>11} {'vs 1 single':>12} "
             f"{'(above base)':>13} {'disk MB':>9}"]
    base = next(r for r in res["memory"] if r["config"] == "baseline")
    lines.append(f"{0:>5}  {'baseline':<12} {base['rss_mb']:>8.1f} {base['hwm_mb']:>8.1f} {'':>11} {'':>12} {'':>13} "
                 f"{'':>9}")
    for r in res["memory"]:
        if r["config"] == "baseline":
            continue
        ratio = res["memory_ratios"][f"{r['config']}_{r['tasks']}"]
        lines.append(f"{r['tasks']:>5}  {r['config']:<12} {r['rss_mb']:>8.1f} {r['hwm_mb']:>8.1f} "
                     f"{r['rss_mb'] - base['rss_mb']:>11.1f} {ratio['rss_vs_one_single']:>11.2f}x "
                     f"{ratio['above_baseline_vs_one_single']:>12.2f}x "
                     f"{res['disk_bytes'][str(r['tasks'])][r['config']] / 1e6:>9.2f}")
    lines += ["", f"latency, ms per image per task ({res['latency_tasks']} tasks per image, best of N)",
              f"{'batch':>5}  {'single':>8} {'packs':>8} {'shared_init':>12} {'packs/single':>13} "
              f"{'shared/single':>14}"]
    for batch, e in res["latency"].items():
        ms = e["ms_per_image_per_task"]
        lines.append(f"{batch:>5}  {ms['single']:>8.3f} {ms['packs']:>8.3f} {ms['shared_init']:>12.3f} "
                     f"{e['packs_vs_single']:>12.2f}x {e['shared_init_vs_single']:>13.2f}x")
    for name, goal in res["goals"].items():
        lines.append(f"goal {name}: {goal['value']:.2f} (goal {goal['goal']}) -> {'met' if goal['met'] else 'NOT met'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.packs", description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="geometry: backbone + model sections")
    ap.add_argument("--tasks", default="1,4,16", help="task counts for memory and disk (comma-separated)")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads per session")
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds at batch 1 (batch 32: a third)")
    ap.add_argument("--latency-tasks", type=int, default=4, help="tasks run on every image in the latency figures")
    ap.add_argument("--mem-batch", type=int, default=32, help="images per task run before reading the RSS")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    ap.add_argument("--child", nargs=3, metavar=("CONFIG", "N", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        config, n, folder = args.child
        print(json.dumps(child(config, int(n), Path(folder), args.threads, args.mem_batch)))
        return
    from lpt.config import load_params

    counts = sorted({int(t) for t in args.tasks.split(",") if t.strip()})
    res = run(load_params(args.params), counts, threads=args.threads, rounds=args.rounds,
              latency_tasks=args.latency_tasks, mem_batch=args.mem_batch)
    print(format_table(res))
    write_figures(args.json, res)


if __name__ == "__main__":
    main()
