"""Measure one embedded-backbone candidate end to end on the validation proxy: pretrain, probe, short LPT.

``python -m bench.backbone_candidate --name NAME --shards DIR --out DIR [-S KEY=VALUE ...]
[--methods lpt,linear_probe_cb] [--seeds 0]``

1. ``lpt pretrain`` with ``params.yaml`` + the overrides (its weights in ``OUT/NAME/pretrain``, its
   rendered data and teacher features cached in ``OUT/cache``, shared by candidates), timed;
2. the frozen features scored by :mod:`bench.backbone_proxy` (nearest class mean, converged balanced probe);
3. ``lpt compare`` of ``--methods`` on the ingested shards (e.g. Fashion-MNIST-LT) with that backbone,
   whose validation accuracy (the checkpoint-selection split) is the row's LPT figure.

The row (``OUT/NAME/row.json``) keeps the compare cells' test metrics too, for the record, but a
candidate is chosen on the validation columns only (docs/training.md). The pipeline's own files
(``params.yaml``, ``models/``, ``reports/``) are never written: everything goes under ``OUT``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from lpt.config import ParamsError, apply_overrides, parse_override, parse_params, read_raw
from lpt.utils import JsonFileError, read_json, write_json_atomic


def candidate_params(base: Path, overrides: list[str], folder: Path, cache: Path) -> Path:
    """Write ``folder/params.yaml``: ``base`` + overrides, pretraining into ``folder/pretrain``.

    Raises:
        ParamsError: an override the strict schema refuses (named by its key path).
    """
    values = dict(parse_override(o) for o in overrides)
    values |= {"pretrain.out_dir": str(folder / "pretrain"), "pretrain.cache_dir": str(cache)}
    raw = apply_overrides(read_raw(base), values)
    parse_params(raw, f"{base} + overrides")  # refused here, before any compute
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _run(cmd: list[str]) -> float:
    """Run ``cmd`` (output to this terminal); its wall time in seconds. Raises CalledProcessError."""
    t0 = time.perf_counter()
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def _cells(reports: Path) -> dict[str, dict[str, Any]]:
    """``{"<method>/seed<k>": {val_acc, overall, few}}`` from the compare cells under ``reports``."""
    out = {}
    for cell_path in sorted(reports.glob("compare/*/*/seed*/cell.json")):
        metrics = read_json(cell_path, "compare cell")["metrics"]
        out[f"{cell_path.parent.parent.name}/{cell_path.parent.name}"] = {
            k: metrics.get(k) for k in ("val_acc", "overall", "few")}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.backbone_candidate", description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True, help="the candidate's folder under --out")
    ap.add_argument("--shards", type=Path, required=True, help="ingested target data (train + val splits)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--methods", default="lpt,linear_probe_cb")
    ap.add_argument("--seeds", default="0")
    args = ap.parse_args(argv)
    try:
        return _measure(args)
    except (ParamsError, JsonFileError) as err:  # a misspelt key, a folder that holds no shards: one line
        print(f"error: {err}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as err:  # the lpt command has printed its own error
        return err.returncode


def _measure(args: argparse.Namespace) -> int:
    folder = args.out / args.name
    source = read_json(args.shards / "manifest.json", "shards manifest")["source"]  # before anything is written
    params_path = candidate_params(args.params, args.overrides, folder, args.out / "cache")
    pretrain_s = _run(["lpt", "pretrain", "-p", str(params_path)])
    from bench.backbone_proxy import main as proxy

    proxy(["--shards", str(args.shards), "--params", str(params_path), "--backbone", "params",
           "--json", str(folder / "proxy.json")])
    reports = folder / "reports"
    compare_s = _run(["lpt", "compare", "-p", str(params_path), "-S", f"data.source={source}",
                      "-S", f"data.out_dir={args.shards}", "-S", f"evaluate.out_dir={reports}",
                      "--methods", args.methods, "--seeds", args.seeds, "--out", str(folder / "compare.md")])
    report = read_json(folder / "pretrain" / "pretrain.json", "pretrain report")
    proxy_row = json.loads((folder / "proxy.json").read_text())[0]
    row = {"name": args.name, "overrides": args.overrides, "source": source,
           "pretrain_wall_s": round(pretrain_s, 1), "compare_wall_s": round(compare_s, 1),
           "holdout": report.get("holdout"), "ncm": proxy_row["ncm"], "probe": proxy_row["probe"],
           "cells": _cells(reports)}
    write_json_atomic(folder / "row.json", row)
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
