"""Prefect flow ``score`` (deployment ``score/batch``): score a batch of new images with the gated export.

The flow is thin: :func:`lpt.score.score_images` does the work (refusing an export without a passed gate
verdict, skipping unreadable images by name, writing the predictions CSV and its summary atomically); the flow
logs the progress, and publishes two artifacts: the predicted-class histogram beside the training prior (a
table; a long-tail model's first drift signal) and a summary (counts, the total-variation distance, the
skipped images).

    lpt-serve start                                           # serves lpt/full and score/batch
    prefect deployment run score/batch -p inputs='["incoming/"]' --watch

or without a server, in-process: ``python -m pipelines.score_flow incoming/ [--split test]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from lpt.config import load_params
from lpt.escaping import markdown_cell

__all__ = ["score", "main"]


@flow(name="score", description="Score a batch of images (folders, list files or a split) with the gated export.")
def score(inputs: list[str] | None = None, split: str | None = None, out: str = "reports/score/predictions.csv",
          top_k: int = 3, repo_dir: str | None = None) -> dict[str, Any]:
    """Score ``inputs`` (or ``split``) with ``<export.out_dir>/model.onnx`` of the project at ``repo_dir``.

    Returns:
        ``scored``, ``skipped`` (count), ``drift`` (total-variation distance), ``predictions``, ``summary`` paths.

    Raises:
        lpt.score.ScoreError: no passed gate verdict for the export (ScoreRefused), no export, no images: the
            run fails with that one line.
    """
    from lpt.score import score_images

    logger = get_run_logger()
    root = Path(repo_dir or os.environ.get("LPT_REPO_DIR") or Path.cwd()).resolve()
    params = load_params(root / "params.yaml")

    def progress(done: int, total: int) -> None:
        logger.info("scored %d / %d images", done, total)

    given = [Path(p).resolve() for p in inputs or []] or None  # relative to where the run was asked for
    with contextlib.chdir(root):  # params' paths are relative to the project
        result = score_images(params, given, split=split, out=Path(out), top_k=top_k, on_progress=progress)
    for path, reason in result.skipped:
        logger.warning("skipped %s: %s", path, reason)
    create_table_artifact(
        key="predicted-classes", table=[{"class": r["class"], "predicted": r["predicted"],
                                         "predicted share": round(r["predicted_share"], 4),
                                         "training share": None if r["train_share"] is None else round(r["train_share"], 4)}
                                        for r in result.histogram],
        description="Predicted classes of this batch beside the training prior (the manifest's class counts).")
    drift = "no training prior (no manifest)" if result.drift is None else f"{result.drift:.3f}"
    lines = [f"# Scored {result.scored} images", "",
             f"- predictions: `{result.predictions}`, summary: `{result.summary}`",
             f"- total-variation distance, predicted-class shares vs the training prior: **{drift}**",
             f"- skipped (unreadable): {len(result.skipped)}"]
    lines += [f"  - `{markdown_cell(p)}`: {markdown_cell(r)}" for p, r in result.skipped[:50]]
    create_markdown_artifact(key="score-summary", markdown="\n".join(lines), description="lpt score summary")
    logger.info("scored %d images in %.1f s (%d skipped); drift %s", result.scored, result.seconds,
                len(result.skipped), drift)
    return {"scored": result.scored, "skipped": len(result.skipped), "drift": result.drift,
            "predictions": str(result.predictions), "summary": str(result.summary)}


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.score_flow``: run the flow in-process."""
    ap = argparse.ArgumentParser(prog="python -m pipelines.score_flow", description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="*", help="image files, folders, list files")
    ap.add_argument("--split", default=None, help="score this split of the shards instead")
    ap.add_argument("--out", default="reports/score/predictions.csv")
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--repo-dir", default=None)
    args = ap.parse_args(argv)
    state = score(inputs=args.inputs or None, split=args.split, out=args.out, top_k=args.top_k,
                  repo_dir=args.repo_dir, return_state=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
