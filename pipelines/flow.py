"""The Prefect flow ``lpt``: every ``dvc.yaml`` stage as one task, run in DAG order, one DVC call at a time.

DVC stays the engine (what is cached, what re-runs, ``dvc.lock``); Prefect adds the run record, live
logs, retries of transient failures, artifacts and the ``lpt/full`` deployment. The stages and their
order come from DVC's own stage graph on every run (``dvc.yaml`` with its ``${...}`` templating resolved
against the run's ``params.yaml``), so a new stage needs no change here.

A failed stage is classified by its command's exit code (``lpt.exitcodes``): a verdict (bad params,
failed validation, quality gate, export parity, export refused) is never retried; other failures are
retried only when they look like I/O or lock trouble. After a stage fails or the run is interrupted,
its previous outputs are put back from DVC's cache (``dvc checkout --force``), as ``dvc.lock`` names them.

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
from lpt.exitcodes import DETERMINISTIC
from pipelines.artifacts import artifact_sources, publish_artifacts
from lpt.utils import atomic_path
from pipelines.dvc_stages import (DvcStage, checkout_outputs, pipeline_order, repo_busy, restore_outputs,
                                  run_dvc_stage, verdict_name)
from pipelines.overrides import applied_overrides

__all__ = ["lpt", "run_stage", "StageFailed", "RepoBusy", "STAGE_RETRIES", "STAGE_RETRY_DELAYS"]

# Transient failures (I/O errors, a DVC repo lock still held) get two more tries; everything else fails
# at once: a command exiting with a code in lpt.exitcodes.DETERMINISTIC (bad params, failed validation,
# quality gate, export parity, export refused) gives the same answer on every try.
STAGE_RETRIES = 2
STAGE_RETRY_DELAYS = [3, 15]
_ERROR_LINES = 12  # output lines quoted in the failure message
_LOG_TAIL_LINES = 100  # output lines kept in the failure's Markdown artifact


def _info_lines(logger: Any) -> Any:
    """``on_line`` for a DVC subprocess: each line into the run log, DVC's blank spacer lines left out."""

    def log_line(line: str) -> None:
        if line.strip():
            logger.info("%s", line)

    return log_line


class StageFailed(RuntimeError):
    """A DVC stage failed; the message names the stage, its command's exit code and verdict, and quotes its
    last output lines.

    Attributes:
        stage: the stage name.
        returncode: DVC's own exit code (255 for a failed stage).
        exit_code: the stage command's exit code from its verdict file (:mod:`lpt.verdict`); ``None`` when there
            is none (DVC failed before the command: its repo lock, a missing dependency; a killed command).
        verdict: the :mod:`lpt.exitcodes` name of ``exit_code`` (``"GATE_FAILED"``), ``None`` if it has none.
        deterministic: ``exit_code`` is a verdict on the inputs (``lpt.exitcodes.DETERMINISTIC``): never retried.
        transient: not deterministic, and the command's verdict says an I/O fault (by ``errno``) or DVC's
            repo lock was held (:attr:`pipelines.dvc_stages.StageRun.transient`): retried.
        command_started: DVC had started the command (and so had removed the stage's outputs).
        error_line: the command's last ``error: ...`` line (what went wrong, in the project's words), if any.
        tail: the last output lines, for the failure artifact.
    """

    def __init__(self, stage: str, returncode: int, tail: list[str], exit_code: int | None = None,
                 command_started: bool = False, transient: bool = False) -> None:
        self.stage, self.returncode, self.exit_code = stage, returncode, exit_code
        self.verdict = verdict_name(exit_code)
        self.deterministic = exit_code in DETERMINISTIC
        self.transient = transient and not self.deterministic
        self.command_started = command_started
        self.tail = list(tail)
        errors = [line.strip() for line in tail if line.strip().startswith("error: ")]
        self.error_line = errors[-1] if errors else None
        # drop blank lines and Python's ^^^^ underlines: they only use up the quoted lines
        useful = [line for line in tail if line.strip() and set(line.strip()) - set("^~")]
        last = "\n".join(useful[-_ERROR_LINES:])
        what = f" — {self.error_line}" if self.error_line else ""
        super().__init__(f"stage '{stage}' failed: {self.reason()}{what}; last lines:\n{last}")

    def reason(self) -> str:
        if self.exit_code is None:
            not_run = "" if self.command_started else " before running the command"
            return f"dvc exited with {self.returncode}{not_run}"
        if self.deterministic:
            return f"its command exited with {self.exit_code} ({self.verdict}: a verdict, not retried)"
        return f"its command exited with {self.exit_code}" + (f" ({self.verdict})" if self.verdict else "")

    def __reduce__(self) -> tuple[Any, ...]:  # keep it picklable for Prefect's result handling
        state = {k: getattr(self, k) for k in ("stage", "returncode", "exit_code", "verdict", "deterministic",
                                                "transient", "command_started", "error_line", "tail")}
        return (_rebuild_stage_failed, (str(self), state))


class RepoBusy(RuntimeError):
    """Another DVC command (a ``dvc repro`` in a shell) holds DVC's locks when a run starts: the run
    is refused before it writes anything (its overrides would change ``params.yaml`` under the other run)."""


def _rebuild_stage_failed(message: str, state: dict[str, Any]) -> StageFailed:
    err = StageFailed.__new__(StageFailed)
    RuntimeError.__init__(err, message)
    err.__dict__.update(state)
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
        StageFailed: DVC exited non-zero (with the command's exit code and verdict).
    """
    logger = get_run_logger()
    logger.info("dvc repro --single-item %s%s", "--force " if force else "", stage)

    run = run_dvc_stage(repo_dir, stage, force=force, on_line=_info_lines(logger), tail_lines=_LOG_TAIL_LINES)
    if run.status == "failed":
        raise StageFailed(stage, run.returncode, run.tail, exit_code=run.exit_code,
                          command_started=run.command_started, transient=run.transient)
    logger.info("stage %r %s: %s (%.1f s)", stage, run.status, run.detail, run.seconds)
    return {"stage": stage, "status": run.status, "detail": run.detail, "seconds": round(run.seconds, 3)}


def _sweep(root: Path, logger: Any) -> None:
    """Remove what killed stage commands left beside the outputs (:mod:`pipelines.sweep`); never raises."""
    from pipelines.sweep import sweep

    try:
        for path in sweep(root):
            logger.info("removed %s (left by a killed stage command)", path)
    except Exception as err:  # noqa: BLE001 - a sweep that fails must not hide the run's own outcome
        logger.warning("could not sweep stale temporaries: %s", err)


def _restore_after_failure(root: Path, stage: DvcStage, err: BaseException, logger: Any) -> None:
    """Put the stage's previous outputs back (``dvc checkout --force``) after it failed or was interrupted.

    DVC removed them before running the command; ``dvc.lock`` still names them and DVC's cache holds them.
    Skipped when DVC never started the command (nothing was removed). Never raises: the stage's own error
    is what the run must report.
    """
    if isinstance(err, StageFailed) and not err.command_started:
        logger.info("stage %r: DVC did not start its command, outputs untouched", stage.name)
        return
    if not stage.restorable:
        logger.info("stage %r: no previous outputs to restore (none in dvc.lock, or persist/uncached only)",
                    stage.name)
        return
    logger.info("stage %r failed: restoring its previous outputs: dvc checkout --force %s",
                stage.name, " ".join(stage.restorable))

    try:
        result = restore_outputs(root, stage, on_line=_info_lines(logger))
    except BaseException as restore_err:  # noqa: BLE001 - a second interruption, a missing dvc
        logger.warning("stage %r: outputs not restored (%s); run `dvc checkout --force %s`", stage.name,
                       restore_err, " ".join(stage.restorable))
        return
    if result.returncode == 0:
        logger.info("stage %r: previous outputs restored as dvc.lock names them (%s)", stage.name,
                    ", ".join(result.targets))
    else:
        logger.warning("stage %r: dvc checkout exited with %d (is DVC's cache missing them?); outputs not "
                       "restored", stage.name, result.returncode)


def failure_markdown(err: StageFailed) -> str:
    """The failed stage's Markdown artifact: what failed, its ``error:`` line, and its log tail."""
    lines = [f"# Stage `{err.stage}` failed", "", f"- {err.reason()}"]
    if err.error_line:
        lines.append(f"- `{err.error_line}`")
    lines += ["- its previous outputs were put back from the DVC cache where it had removed them", "",
              f"## The last {len(err.tail)} output lines", "", "```text", *err.tail, "```"]
    return "\n".join(lines) + "\n"


def _report_failure(stage: DvcStage, err: BaseException, logger: Any) -> None:
    """Say why the stage failed in one run-log line (what ``--watch`` shows) and publish its log tail."""
    if not isinstance(err, StageFailed):
        return
    logger.error("stage %r failed: %s", stage.name, err.error_line or err.reason())
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(failure_markdown(err), key="stage-failure",
                                 description=f"why stage {stage.name} failed, with its log tail")
    except Exception as publish_err:  # noqa: BLE001 - an artifact must never mask the stage's error
        logger.warning("the failure artifact of stage %r was not published: %s", stage.name, publish_err)


def _publish(root: Path, stage: DvcStage, sources: Any, stage_ok: bool, logger: Any) -> None:
    try:
        for key in publish_artifacts(root, stage, sources, stage_ok=stage_ok):
            logger.info("artifact %r published", key)
    except Exception as err:  # noqa: BLE001 - an artifact must never fail the pipeline
        logger.warning("artifacts after stage %r not published: %s", stage.name, err)


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
            any stage runs, written into ``params.yaml`` atomically. If the run fails or is cancelled,
            ``params.yaml``, ``dvc.lock`` and the outputs it names are put back as they were before the run.
        target: run only this stage and its upstream stages; ``None`` runs every stage.
        repo_dir: the DVC project root; defaults to ``$LPT_REPO_DIR`` or the working directory.
        force: re-run every selected stage even if DVC finds it up to date (``dvc repro -f``).

    Returns:
        One ``{"stage", "status", "detail", "seconds"}`` per stage, in run order.

    Raises:
        RepoBusy: another DVC command holds DVC's locks (nothing ran, nothing written).
        ParamsError: an override names an unknown key or a bad value (nothing ran).
        DvcYamlError: no ``dvc.yaml``, one DVC refuses, or ``target`` is not a stage (nothing ran).
        StageFailed: a stage failed; the message names it, its command's exit code and verdict, and quotes
            its last lines. Its previous outputs are back in the workspace.
    """
    logger = get_run_logger()
    root = Path(repo_dir or os.environ.get("LPT_REPO_DIR") or Path.cwd()).resolve()
    if repo_busy(root):  # before the overrides touch params.yaml
        message = (f"another DVC command is running in {root} (DVC's locks in .dvc/tmp are held): this run "
                   "changed nothing; run it again when that one has ended")
        logger.error("%s", message)
        raise RepoBusy(message)
    lock_before = _read_lock(root)
    try:
        return _run_stages(root, overrides, target, force, logger)
    except BaseException:  # failed or cancelled: params.yaml is back (applied_overrides); now dvc.lock and outputs
        if overrides and _read_lock(root) != lock_before:
            _roll_back_lock(root, lock_before, logger)
        raise


def _read_lock(root: Path) -> bytes | None:
    try:
        return (root / "dvc.lock").read_bytes()
    except FileNotFoundError:
        return None


def _roll_back_lock(root: Path, lock_before: bytes | None, logger: Any) -> None:
    """A run with overrides failed or was cancelled after some stages ran with them: put ``dvc.lock`` back as it
    was before the run and check out every output it names (DVC's cache holds them), so that ``params.yaml``,
    ``dvc.lock`` and the outputs are as before the run. Never raises: the run's own error is what it reports."""
    from pipelines.restore import restore_targets

    if lock_before is None:
        logger.warning("stages ran with the overrides and no dvc.lock existed before the run: their outputs stay; "
                       "the next dvc repro re-runs them")
        return
    try:
        with atomic_path(root / "dvc.lock") as tmp:
            tmp.write_bytes(lock_before)
        targets = restore_targets(root)
        logger.info("the run's overrides are undone: dvc.lock as before the run; dvc checkout --force %s",
                    " ".join(targets))
        result = checkout_outputs(root, targets, on_line=_info_lines(logger))
    except BaseException as err:  # noqa: BLE001 - a second interruption, a missing dvc
        logger.warning("outputs not rolled back (%s); run `python -m pipelines.restore`", err)
        return
    if result.returncode != 0:
        logger.warning("dvc checkout exited with %d; run `python -m pipelines.restore`", result.returncode)


def _run_stages(root: Path, overrides: dict[str, Any] | None, target: str | None, force: bool,
                logger: Any) -> list[dict[str, Any]]:
    """The flow's body: overrides applied (restored on an exception), every selected stage in DAG order."""
    results: list[dict[str, Any]] = []
    with applied_overrides(root / "params.yaml", overrides) as raw:
        if overrides:
            logger.info("params.yaml overrides applied: %s", overrides)
        _sweep(root, logger)  # what an earlier killed run left (a corrupted DVC rwlock would fail every stage)
        stages = pipeline_order(root, target)  # after the overrides: dvc.yaml paths may come from params
        logger.info("repo %s; stages: %s", root, " -> ".join(s.name for s in stages))
        sources = artifact_sources(parse_params(raw))
        for stage in stages:
            try:
                results.append(run_stage.with_options(name=stage.name, task_run_name=stage.name)(
                    stage.name, str(root), force))
            except BaseException as err:  # a failed stage, Ctrl-C, a cancellation (TerminationSignal)
                _publish(root, stage, sources, False, logger)  # first: the failed run's reports are the point
                _restore_after_failure(root, stage, err, logger)
                _sweep(root, logger)
                _report_failure(stage, err, logger)
                raise
            _publish(root, stage, sources, True, logger)
        _sweep(root, logger)
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
