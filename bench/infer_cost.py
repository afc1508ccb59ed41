"""Inference cost per image of trained models, side by side in one run (torch eval forward on CPU).

``python -m bench.infer_cost --model LABEL PARAMS PHASE_DIR [--model ...] [--rounds 5] [--batch 32]``

Each model is rebuilt from its checkpoint folder (``lpt.model.lpt.load_trained_model``: ``PARAMS`` says
where its backbone weights live) and timed with ``lpt.compare.inference_ms_per_image`` at its own
input size, in interleaved rounds so that drift in the machine's load falls on every model alike.
Time it on an idle machine only; the ratio between the rows is the figure to read.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.infer_cost", description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs=3, action="append", required=True, metavar=("LABEL", "PARAMS", "PHASE_DIR"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    from lpt.compare import inference_ms_per_image
    from lpt.config import ParamsError, load_params
    from lpt.model.backbone import BackboneError
    from lpt.model.lpt import CheckpointError, load_trained_model

    models = {}
    for label, params_path, phase_dir in args.model:
        try:
            params = load_params(params_path)
            model, meta = load_trained_model(params, Path(phase_dir))
        except (ParamsError, CheckpointError, BackboneError) as err:  # a wrong path, a damaged checkpoint
            print(f"error: --model {label}: {err}", file=sys.stderr)
            return 2
        models[label] = (model, int(meta["transforms"]["input_size"]))  # the size it was trained at
    times: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(args.rounds):
        for label, (model, size) in models.items():
            times[label].append(inference_ms_per_image(model, size, batch=args.batch, reps=5))
    first = statistics.median(next(iter(times.values())))
    for label, values in times.items():
        med = statistics.median(values)
        print(f"{label}: {med:.3f} ms/image ({med / first:.2f} x the first row; rounds {min(values):.3f}-"
              f"{max(values):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
