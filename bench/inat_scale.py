"""iNaturalist scale on one machine: every pipeline stage at the iNat-2018 shape, side by side with the
embedded default, each stage in a process of its own with its wall time and peak resident memory.

Run: ``python -m bench.inat_scale`` (full size: 8,142 classes, 437,513 + 8,142 + 24,426 images, ~1.7 GB of
shards, about 10 minutes on 2 cores), ``--fraction 0.1`` (814 classes, same shape), ``--steps N`` training
steps per phase (default 100), ``--workdir DIR`` (default a temp folder; removed at the end unless
``--keep``), ``--json FILE``.

Two configurations, the same model (the embedded default's backbone, its committed pretrained weights),
the same batch, the same number of training steps, gate floors off (a bounded run is
not a quality bar):

  * ``embedded``: ``params.yaml`` as shipped (100 classes, 10,847 train images, ``train.in_memory: true``);
  * ``inat``: ``params.yaml`` + ``configs/inat2018_synthetic.yaml`` (8,142 classes with the ``inat2018``
    profile, 16 px images, ``train.in_memory: false``, parity on a capped stratified sample);
  * ``embedded_disk`` (training only): the embedded data read from its shards on access
    (``train.in_memory: false``) as the iNat run reads them, separating what the dataset's size costs
    from what reading from disk instead of RAM costs.

Each training phase runs ``--repeats`` times per configuration (default 3), the configurations
alternating, and reports the median steps/s (every run's figure is listed) and the highest peak RSS: on
2 shared cores one run's steps/s moves by +-20 %.

Stages, each ``python -m bench.inat_scale --child STAGE`` on its own: ingest (img/s), validate, phase 1,
phase 2 (steps/s from the optimizer steps' timestamps, first step excluded), evaluate, export. Peak RSS is
the child's ``VmHWM`` from ``/proc/self/status`` (everything it ever had resident: imports, model, data
structures, file pages it mapped). The figure to watch: training peak RSS inat / embedded (goal <= 1.3,
memory flat in the dataset size) at equal steps/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.timing import write_figures

STAGES = ("ingest", "validate", "phase1", "phase2", "evaluate", "export")
PRESET = Path("configs/inat2018_synthetic.yaml")


def peak_rss_mib() -> float:
    """This process's peak resident set size (``VmHWM``) in MiB (``ru_maxrss`` where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


# ------------------------------------------------------------------------------------------ child
def _child(stage: str, params_file: Path, out: Path) -> None:
    """Run one stage's library entry point and write its figures (runs in its own process)."""
    from lpt.config import load_params

    params = load_params(params_file)
    extra: dict[str, Any] = {}
    start = time.perf_counter()
    if stage == "ingest":
        from lpt.data.ingest import run_ingest

        result = run_ingest(params)
        extra["images"] = sum(result.counts.values())
        extra["counts"] = result.counts
    elif stage == "validate":
        from lpt.data.validate import run_validation

        result = run_validation(params)
        extra["success"] = result.success
        extra["failures"] = result.failures[:3]
    elif stage in ("phase1", "phase2"):
        from lpt.train import run_phase

        stamps: list[float] = []
        result = run_phase(params, int(stage[-1]), on_step=lambda _step: stamps.append(time.perf_counter()))
        extra["steps"] = len(stamps)
        extra["steps_per_s"] = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
        extra["best_val_acc"] = result["best_val_acc"]
    elif stage == "evaluate":
        from lpt.evaluate import run_evaluate

        result = run_evaluate(params)
        extra["overall"] = result.metrics["overall"]
        extra["num_samples"] = result.metrics["num_samples"]
    elif stage == "export":
        from lpt.export import run_export

        result = run_export(params)
        extra["parity_images"] = result.num_images
        extra["max_abs_diff"] = result.max_abs_diff
    else:
        raise SystemExit(f"unknown stage {stage!r}")
    seconds = time.perf_counter() - start
    out.write_text(json.dumps({"stage": stage, "seconds": seconds, "peak_rss_mib": peak_rss_mib(), **extra}))


# ------------------------------------------------------------------------------------------ parent
def _params(kind: str, root: Path, fraction: float, steps: int, extra: dict[str, Any] | None = None) -> Path:
    """Write the params file of one configuration (outputs under ``root``) and return its path."""
    import yaml

    from lpt.config import apply_overrides, parse_params, read_raw
    from lpt.data.longtail import INAT2018
    from lpt.presets import load_preset, merge_preset

    raw = read_raw("params.yaml")
    if kind == "inat":
        raw, _ = merge_preset(raw, load_preset(PRESET.stem))
        raw = apply_overrides(raw, {"data.synthetic.num_classes": max(2, round(INAT2018["classes"] * fraction))})
    overrides = {
        "data.out_dir": str(root / "data/shards"), "validate.report_dir": str(root / "data/validation"),
        "train.out_dir": str(root / "models"), "evaluate.out_dir": str(root / "reports"),
        "export.out_dir": str(root / "models/export"),
        # both use the committed embedded backbone (pretrain.out_dir as shipped): the same model
        "evaluate.gate.min_overall": 0.0, "evaluate.gate.min_few": 0.0,
    }
    for phase in (1, 2):
        overrides[f"train.phase{phase}.epochs"] = 1
        overrides[f"train.phase{phase}.max_steps_per_epoch"] = steps
    raw = apply_overrides(raw, {**overrides, **(extra or {})})
    parse_params(raw, source=f"bench {kind}")
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _run_stage(stage: str, params_file: Path) -> dict[str, Any]:
    out = params_file.parent / f"{stage}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GX_ANALYTICS_ENABLED": "false"}
    cmd = [sys.executable, "-m", "bench.inat_scale", "--child", stage, "--params", str(params_file), "--out", str(out)]
    run = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if run.returncode != 0:
        raise SystemExit(f"stage {stage} ({params_file.parent.name}) failed:\n{run.stderr[-3000:]}")
    return json.loads(out.read_text())


def _combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One stage's repeated runs as one record: the median run (by steps/s or seconds), the highest peak
    RSS of all, and every run's steps/s."""
    key = "steps_per_s" if results[0].get("steps_per_s") is not None else "seconds"
    ordered = sorted(results, key=lambda r: r[key])
    out = dict(ordered[len(ordered) // 2])
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in results)
    if len(results) > 1 and key == "steps_per_s":
        out["steps_per_s_runs"] = [r["steps_per_s"] for r in results]
    return out


def _du_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=1.0, help="share of iNat's 8,142 classes (same shape)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per phase in both configurations")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each training phase per configuration, "
                        "alternating (median steps/s, highest peak RSS)")
    parser.add_argument("--workdir", type=Path, help="where shards and outputs go (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--params", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.params, args.out)
        return {}
    if not 0 < args.fraction <= 1:
        parser.error("--fraction must be in (0, 1]")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="lpt-inat-scale-"))
    figures: dict[str, Any] = {"fraction": args.fraction, "steps": args.steps, "repeats": args.repeats,
                               "cpus": os.cpu_count(),
                               "load_average_at_start": os.getloadavg()[0], "stages": {}}
    try:
        files = {kind: _params(kind, work / kind, args.fraction, args.steps) for kind in ("embedded", "inat")}
        # the embedded data read from disk as the iNat run reads it: what N costs, apart from RAM vs disk
        files["embedded_disk"] = _params("embedded", work / "embedded_disk", args.fraction, args.steps,
                                         {"train.in_memory": False, "data.out_dir": str(work / "embedded/data/shards")})
        for stage in STAGES:
            repeats = args.repeats if stage.startswith("phase") else 1
            kinds = [k for k in files if stage.startswith("phase") or k != "embedded_disk"]
            runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
            for attempt in range(repeats):  # alternate the configurations: drift hits them alike
                for kind in kinds:
                    params_file = files[kind]
                    print(f"[bench] {kind} {stage} ({attempt + 1}/{repeats}) ...", flush=True)
                    runs[kind].append(_run_stage(stage, params_file))
            for kind, results in runs.items():
                figures["stages"].setdefault(stage, {})[kind] = _combine(results)
            if stage == "ingest":
                figures["shards_mb"] = {k: round(_du_mb(f.parent / "data/shards"), 1) for k, f in files.items()
                                       if k != "embedded_disk"}
        figures["load_average_at_end"] = os.getloadavg()[0]
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    _print(figures)
    write_figures(args.json, figures)
    return figures


def _runs(record: dict[str, Any]) -> str:
    return "/".join(_fmt(v, ".2f") for v in record.get("steps_per_s_runs", [record.get("steps_per_s")]))


def _print(figures: dict[str, Any]) -> None:
    st = figures["stages"]
    ing = st["ingest"]
    print(f"\niNat scale (fraction {figures['fraction']}), {figures['steps']} steps per phase, "
          f"{figures['cpus']} CPUs, load average {figures['load_average_at_start']:.1f} -> "
          f"{figures['load_average_at_end']:.1f} (a shared machine makes every figure indicative only)")
    print(f"images: embedded {ing['embedded']['counts']}, inat {ing['inat']['counts']}; "
          f"shards MB: {figures['shards_mb']}")
    print(f"  {'stage':<10}{'embedded s':>12}{'inat s':>10}{'embedded MiB':>14}{'inat MiB':>10}{'RSS ratio':>11}  notes")
    for stage in STAGES:
        e, i = st[stage]["embedded"], st[stage]["inat"]
        note = ""
        if stage == "ingest":
            note = f"img/s {e['images'] / e['seconds']:.0f} vs {i['images'] / i['seconds']:.0f}"
        elif stage.startswith("phase"):
            d = st[stage]["embedded_disk"]
            note = f"steps/s {_fmt(e['steps_per_s'], '.2f')} vs {_fmt(i['steps_per_s'], '.2f')}; embedded from " \
                   f"disk {_fmt(d['steps_per_s'], '.2f')} steps/s, {d['peak_rss_mib']:.0f} MiB (median of " \
                   f"{figures['repeats']}: {_runs(e)} | {_runs(i)} | {_runs(d)})"
        elif stage == "validate":
            note = f"passed {e['success']} / {i['success']}"
        elif stage == "evaluate":
            note = f"{e['num_samples']} vs {i['num_samples']} test images"
        elif stage == "export":
            note = f"parity on {e['parity_images']} vs {i['parity_images']} images"
        print(f"  {stage:<10}{e['seconds']:>12.1f}{i['seconds']:>10.1f}{e['peak_rss_mib']:>14.0f}"
              f"{i['peak_rss_mib']:>10.0f}{i['peak_rss_mib'] / e['peak_rss_mib']:>11.2f}  {note}")


if __name__ == "__main__":
    main()
