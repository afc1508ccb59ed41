"""The Prefect flow ``lpt``: every ``dvc.yaml`` stage as one task, run in DAG order, one DVC call at a time.

DVC stays the engine (what is cached, what re-runs, ``dvc.lock``); Prefect adds the run record, live
logs, retries of transient failures, artifacts and the ``lpt/full`` deployment. The stage list is read
from ``dvc.yaml`` on every run, so a new stage needs no change here.

Run it in-process (a temporary Prefect API is started when none is configured)::

    python -m pipelines.flow                                   # whole pipeline
    python -m pipelines.flow --target validate -S train.phase1.epochs=3

or through the deployment (see docs/orchestration.md)::

    prefect deployment run lpt/full --watch --params '{"overrides": {"train.phase1.epochs": 3}}'
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from lpt.config import parse_params
from pipelines.artifacts import artifact_sources, publish_artifacts
from pipelines.dvc_stages import is_transient_failure, pipeline_order, run_dvc_stage
from pipelines.overrides import applied_overrides

__all__ = ["lpt", "run_stage", "StageFailed", "STAGE_RETRIES", "STAGE_RETRY_DELAYS"]

# Transient failures (I/O errors, a DVC repo lock still held) get two more tries; everything else fails
# at once: re-running a failed validation, quality gate or parity check gives the same answer.
STAGE_RETRIES = 2
STAGE_RETRY_DELAYS = [3, 15]
_ERROR_LINES = 12  # output lines quoted in the failure message


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message names the stage and quotes its last output lines.

    Attributes:
        stage: the stage name.
        transient: the output looks like an I/O or lock hiccup (retried), not a deterministic failure.
    """

    def __init__(self, stage: str, returncode: int, tail: list[str]) -> None:
        self.stage = stage
        self.transient = is_transient_failure(tail)
        # drop blank lines and Python's ^^^^ underlines: they only use up the quoted lines
        useful = [line for line in tail if line.strip() and set(line.strip()) - set("^~")]
        last = "\n".join(useful[-_ERROR_LINES:])
        super().__init__(f"stage '{stage}' failed (dvc exit {returncode}); last lines:\n{last}")

    def __reduce__(self) -> tuple[Any, ...]:  # keep it picklable for Prefect's result handling
        return (_rebuild_stage_failed, (self.stage, self.transient, str(self)))


def _rebuild_stage_failed(stage: str, transient: bool, message: str) -> StageFailed:
    err = StageFailed.__new__(StageFailed)
    RuntimeError.__init__(err, message)
    err.stage, err.transient = stage, transient
    return err


def _retry_if_transient(task: Any, task_run: TaskRun, state: State) -> bool:
    """``retry_condition_fn``: retry only :class:`StageFailed` errors that look transient."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - an unreadable state is not worth a retry
        return False
    return isinstance(exc, StageFailed) and exc.transient


@task(retries=STAGE_RETRIES, retry_delay_seconds=STAGE_RETRY_DELAYS, retry_condition_fn=_retry_if_transient,
      cache_policy=NO_CACHE, persist_result=False)
def run_stage(stage: str, repo_dir: str, force: bool = False) -> dict[str, Any]:
    """Run one DVC stage (``dvc repro --single-item``), streaming its output into the run log.

    Args:
        stage: stage name in ``dvc.yaml``.
        repo_dir: the DVC repository root.
        force: re-run even when DVC considers the stage up to date.

    Returns:
        ``{"stage", "status" ("ran" | "cached"), "detail", "seconds"}``.

    Raises:
        StageFailed: DVC exited non-zero.
    """
    logger = get_run_logger()
    logger.info("dvc repro --single-item %s%s", "--force " if force else "", stage)

    def log_line(line: str) -> None:
        if line.strip():  # DVC's blank spacer lines add nothing to the run log
            logger.info("%s", line)

    run = run_dvc_stage(repo_dir, stage, force=force, on_line=log_line)
    if run.status == "failed":
        raise StageFailed(stage, run.returncode, run.tail)
    logger.info("stage %r %s: %s (%.1f s)", stage, run.status, run.detail, run.seconds)
    return {"stage": stage, "status": run.status, "detail": run.detail, "seconds": round(run.seconds, 3)}


@flow(name="lpt", description="LPT pipeline: the dvc.yaml stages in DAG order, one `dvc repro` at a time.")
def lpt(
    overrides: dict[str, Any] | None = None,
    target: str | None = None,
    repo_dir: str | None = None,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Reproduce the DVC pipeline stage by stage.

    Args:
        overrides: params overrides, dotted keys (``{"train.phase1.epochs": 3}``); validated strictly before
            any stage runs, written into ``params.yaml`` atomically, restored if the run fails.
        target: run only this stage and its upstream stages; ``None`` runs every stage.
        repo_dir: the DVC project root; defaults to ``$LPT_REPO_DIR`` or the working directory.
        force: re-run every selected stage even if DVC finds it up to date (``dvc repro -f``).

    Returns:
        One ``{"stage", "status", "detail", "seconds"}`` per stage, in run order.

    Raises:
        ParamsError: an override names an unknown key or a bad value (nothing ran).
        DvcYamlError: no ``dvc.yaml``, or ``target`` is not a stage.
        StageFailed: a stage failed; the message names it and quotes its last lines.
    """
    logger = get_run_logger()
    root = Path(repo_dir or os.environ.get("LPT_REPO_DIR") or Path.cwd()).resolve()
    stages = pipeline_order(root, target)
    logger.info("repo %s; stages: %s", root, " -> ".join(s.name for s in stages))
    results: list[dict[str, Any]] = []
    with applied_overrides(root / "params.yaml", overrides) as raw:
        if overrides:
            logger.info("params.yaml overrides applied: %s", overrides)
        sources = artifact_sources(parse_params(raw))
        for stage in stages:
            try:
                results.append(run_stage.with_options(name=stage.name, task_run_name=stage.name)(
                    stage.name, str(root), force))
            finally:
                try:
                    for key in publish_artifacts(root, stage.owns, sources):
                        logger.info("artifact %r published", key)
                except Exception as err:  # noqa: BLE001 - an artifact must never fail the pipeline
                    logger.warning("artifacts after stage %r not published: %s", stage.name, err)
    ran = [r["stage"] for r in results if r["status"] == "ran"]
    logger.info("done: %d stage(s) ran (%s), %d cached", len(ran), ", ".join(ran) or "none", len(results) - len(ran))
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.flow``: run the flow in-process."""
    from lpt.config import parse_override

    ap = argparse.ArgumentParser(prog="python -m pipelines.flow", description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=None, help="stage to run (with its upstream)")
    ap.add_argument("--repo-dir", default=None, help="DVC project root (default: cwd)")
    ap.add_argument("--force", action="store_true", help="re-run stages DVC considers up to date")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], help="KEY.PATH=VALUE")
    args = ap.parse_args(argv)
    overrides = dict(parse_override(o) for o in args.overrides) or None
    state = lpt(overrides=overrides, target=args.target, repo_dir=args.repo_dir, force=args.force, return_state=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
