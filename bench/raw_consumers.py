"""The exported model consumed three ways, on the same images: classes agree? time per 1,000 images?

    python -m bench.raw_consumers [--export models/export] [--images 1000] [--json bench/results/raw.json]

Writes ``--images`` test images of the data the export was trained on (``data.out_dir`` of params.yaml) as PNG
files to a temp folder, half at their own size and half resized (to 1.5x and 0.75x, plus a grey copy every
7th image: what a consumer meets), then runs on those files, in one process each and one after the other:

- ``lpt predict`` (Python: ``lpt.runtime``'s preprocessing + ``model.onnx``), the reference;
- the same ``Predictor`` on ``model.raw.onnx`` (decoded pixels into the graph);
- ``lpt score`` on ``model.onnx`` (the scoring deployment's library: CSV + summary with the histogram);
- ``examples/node/predict.mjs`` on ``model.raw.onnx`` (Node.js; skipped with a note without Node.js or its
  npm packages: ``make node-client``).

Reports top-1 agreement with the reference and wall time per 1,000 images (decode + predict + print, the
process start included). Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.timing import write_figures  # noqa: E402


def write_images(shards: Path, folder: Path, count: int) -> list[Path]:
    """``count`` test images as PNG: every 2nd at its own size, the others resized 1.5x or 0.75x, every 7th grey."""
    from PIL import Image

    from lpt.data.reader import ShardImages

    data = ShardImages(shards, "test")
    paths = []
    for i in range(min(count, len(data))):
        img = data[i][0].convert("RGB")
        if i % 2:
            factor = 1.5 if i % 4 == 1 else 0.75
            img = img.resize((max(1, round(img.width * factor)), max(1, round(img.height * factor))), Image.BILINEAR)
        if i % 7 == 3:
            img = img.convert("L")
        paths.append(folder / f"img{i:05d}.png")
        img.save(paths[-1])
    return paths


def _metadata(model: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(model)).metadata_props}


def _timed(cmd: list[str]) -> tuple[list[dict[str, Any]], float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[:3])} ... exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")], seconds


def run(export: Path, count: int) -> dict[str, Any]:
    from lpt.config import load_params

    params = load_params(REPO / "params.yaml")
    lpt_bin = str(Path(sys.executable).parent / "lpt")
    with tempfile.TemporaryDirectory() as tmp:
        write_images(Path(params.data.out_dir), Path(tmp), count)  # every consumer reads the folder, sorted
        runs: dict[str, tuple[list[dict[str, Any]], float]] = {}
        runs["lpt predict, model.onnx"] = _timed([lpt_bin, "predict", str(export / "model.onnx"), tmp, "--json"])
        runs["lpt predict, model.raw.onnx"] = _timed([lpt_bin, "predict", str(export / "model.raw.onnx"), tmp,
                                                      "--json"])
        score_csv = Path(tmp) / "scored" / "predictions.csv"
        _, seconds = _timed([lpt_bin, "score", tmp, "--out", str(score_csv), "--top-k", "1",
                             "-p", str(REPO / "params.yaml")])
        with open(score_csv, newline="") as fh:  # `lpt score`'s CSV: path, class_1, score_1
            names = json.loads(_metadata(export / "model.onnx")["class_names"])
            scored = [{"labels": [names.index(row["class_1"])]} for row in csv.DictReader(fh)]
        runs["lpt score (CSV + summary), model.onnx"] = (scored, seconds)
        node = shutil.which("node")
        note = None
        if node and (REPO / "examples/node/node_modules/onnxruntime-node").is_dir():
            runs["node predict.mjs, model.raw.onnx"] = _timed([node, "examples/node/predict.mjs",
                                                                str(export / "model.raw.onnx"), tmp, "--json"])
        else:
            note = "Node.js client skipped: no node or no examples/node/node_modules (make node-client)"
    ref = [r["labels"][0] for r in _rows(runs["lpt predict, model.onnx"][0])]
    own = [i % 2 == 0 for i in range(len(ref))]
    out: dict[str, Any] = {"images": len(ref), "resized": len(ref) - sum(own), "consumers": {}, "note": note}
    for name, (rows, seconds) in runs.items():
        top1 = [r["labels"][0] for r in _rows(rows)]
        same = [a == b for a, b in zip(top1, ref)]
        out["consumers"][name] = {
            "agreement": sum(same) / len(ref),
            "agreement_own_size": sum(s for s, o in zip(same, own) if o) / max(1, sum(own)),
            "agreement_resized": sum(s for s, o in zip(same, own) if not o) / max(1, len(ref) - sum(own)),
            "seconds_per_1000": 1000 * seconds / len(ref)}
    return out


def _rows(rows: Any) -> list[dict[str, Any]]:
    """``lpt predict --json`` prints one JSON list; the Node client one object per line."""
    if len(rows) == 1 and isinstance(rows[0], list):
        return rows[0]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.raw_consumers", description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, default=REPO / "models" / "export", help="the export folder")
    ap.add_argument("--images", type=int, default=1000, help="test images to write and classify")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if not (args.export / "model.raw.onnx").is_file():
        print(f"error: {args.export}/model.raw.onnx not found: run `dvc repro export` (export.raw: true)", file=sys.stderr)
        return 2
    res = run(args.export, args.images)
    print(f"{res['images']} test images ({res['resized']} resized or grey), agreement with `lpt predict` on "
          "model.onnx (top-1):")
    for name, c in res["consumers"].items():
        print(f"  {name:36s} {100 * c['agreement']:6.2f} %  (own size {100 * c['agreement_own_size']:.2f} %, "
              f"resized {100 * c['agreement_resized']:.2f} %)   {c['seconds_per_1000']:6.2f} s / 1,000 images")
    if res["note"]:
        print(f"  note: {res['note']}")
    write_figures(args.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
