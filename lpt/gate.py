"""The quality gate: thresholds on the test metrics, and the verdict file that ties them to a checkpoint.

``lpt evaluate`` writes ``<evaluate.out_dir>/gate.json`` (passed, failures, thresholds, the judged
checkpoint's sha256) and exits non-zero on a failure; ``lpt export`` reads it and refuses a checkpoint
without a passed verdict of its own, so the gate holds whether the stages run under ``dvc repro`` or by hand.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

from lpt.config import Params

__all__ = ["GATE_FILE", "check_gate", "gate_verdict", "gate_thresholds", "threshold_changes", "missing_groups",
           "probe_metrics_path", "read_gate_verdict", "gate_refusal"]

log = logging.getLogger(__name__)

GATE_FILE = "gate.json"


def read_gate_verdict(evaluate_out_dir: str | Path) -> dict[str, Any]:
    """The gate verdict ``evaluate`` wrote (``gate.json``).

    Raises:
        lpt.utils.JsonFileError: missing or damaged (the message names the file).
    """
    from lpt.utils import read_json

    return read_json(Path(evaluate_out_dir) / GATE_FILE, "quality-gate verdict")


def gate_thresholds(params: Params) -> dict[str, Any]:
    """The thresholds of ``evaluate.gate`` as ``gate.json`` records them (what a verdict was judged under)."""
    gate = params.evaluate.gate
    return {"min_overall": gate.min_overall, "min_few": gate.min_few, "max_drop_vs_probe": gate.max_drop_vs_probe,
            "pixel_baselines": list(gate.pixel_baselines), "min_margin_vs_pixels": gate.min_margin_vs_pixels}


def threshold_changes(verdict: dict[str, Any], params: Params) -> list[str]:
    """How the thresholds in force (``evaluate.gate``) differ from those ``verdict`` was judged under.

    Args:
        verdict: a ``gate.json`` mapping (its ``thresholds``).
        params: the params in force.

    Returns:
        One ``"min_overall 0.25 -> 0.99"`` item per changed threshold (empty: the same thresholds); a verdict
        that records no thresholds differs in all of them.
    """
    stored = verdict.get("thresholds")
    stored = stored if isinstance(stored, dict) else {}
    changes = []
    for key, now in gate_thresholds(params).items():
        old = stored.get(key, "unrecorded")
        if type(old) is bool or old != now:  # 0 == 0.0 (JSON), True == 1 is not a threshold
            changes.append(f"{key} {old} -> {now}")
    return changes


def gate_refusal(params: Params, checkpoint_sha256: str) -> tuple[dict[str, Any] | None, str | None]:
    """Why a checkpoint may not be shipped or used: its evaluated verdict is missing, failed, about another
    checkpoint (sha256) or judged under other thresholds than ``evaluate.gate`` sets now.

    Returns:
        ``(verdict or None, None)`` when it passed for these very weights; else ``(verdict or None, reason)``,
        the reason one line naming ``gate.json`` and what to run.
    """
    from lpt.utils import JsonFileError

    path = Path(params.evaluate.out_dir) / GATE_FILE
    try:
        verdict = read_gate_verdict(params.evaluate.out_dir)
    except JsonFileError as err:
        return None, (f"{err}: run `lpt evaluate` (dvc stage evaluate) first; export only ships a model that "
                      "passed the quality gate")
    if verdict.get("checkpoint_sha256") != checkpoint_sha256:
        return verdict, (f"{path} judged checkpoint {str(verdict.get('checkpoint_sha256'))[:12]}…, not the one "
                         f"being exported ({checkpoint_sha256[:12]}…): run `lpt evaluate` on it first")
    changes = threshold_changes(verdict, params)
    if changes:
        return verdict, (f"{path} was judged under other gate thresholds than evaluate.gate sets now "
                         f"({'; '.join(changes)}): re-run `lpt evaluate` (dvc stage evaluate) to judge the "
                         "checkpoint under them")
    if verdict.get("passed") is not True:
        failures = "; ".join(str(f) for f in verdict.get("failures") or []) or "no reason recorded"
        return verdict, f"{path}: the quality gate failed for this checkpoint ({failures}); nothing exported"
    return verdict, None


def probe_metrics_path(params: Params) -> Path:
    """Linear-probe ``metrics.json`` the gate's ``max_drop_vs_probe`` compares against: ``probe_metrics``, or
    the ``lpt compare`` probe of the same data source and seed (where ``lpt compare`` keeps it:
    :func:`lpt.compare_layout.cell_metrics_path`)."""
    if params.evaluate.gate.probe_metrics is not None:
        return Path(params.evaluate.gate.probe_metrics)
    from lpt.compare_layout import cell_metrics_path
    from lpt.methods import PROBE_METHOD

    return cell_metrics_path(params, PROBE_METHOD, params.seed)


def check_gate(metrics: dict[str, Any], params: Params, probe: dict[str, Any] | None = None,
               probe_source: str | None = None, pixels: dict[str, float] | None = None) -> list[str]:
    """Compare metrics with ``evaluate.gate``; return one message per missed threshold (empty: pass).

    A group without test images (no class with that many training images) is not a failure: see
    :func:`missing_groups`.

    Args:
        metrics: the scalar metrics (``overall``, ``few``, ...).
        params: the params (``evaluate.gate``).
        probe: the linear probe's metrics (for ``max_drop_vs_probe``), or None when unavailable.
        probe_source: where ``probe`` came from (named in the message).
        pixels: overall test accuracy of each pixel baseline (``evaluate.gate.pixel_baselines``) on the same
            split; the model must beat each by more than ``min_margin_vs_pixels``.

    Returns:
        Messages like ``"overall = 0.4120 < min_overall = 0.5000"``.
    """
    gate = params.evaluate.gate
    failures: list[str] = []

    def below(key: str, threshold: float, name: str) -> None:
        value = metrics.get(key)
        if _absent(value):
            return  # a group absent from this data set: a named note (missing_groups), not a failure
        if value < threshold:
            failures.append(f"{key} = {value:.4f} < {name} = {threshold:.4f}")

    below("overall", gate.min_overall, "min_overall")
    below("few", gate.min_few, "min_few")
    for name, base in (pixels or {}).items():
        margin = float(metrics["overall"]) - float(base)
        if margin <= gate.min_margin_vs_pixels:
            failures.append(f"overall = {metrics['overall']:.4f} does not beat the {name} baseline on the same "
                            f"split ({base:.4f}) by more than min_margin_vs_pixels = {gate.min_margin_vs_pixels:.4f}")
    if gate.max_drop_vs_probe is not None and probe is not None and probe.get("overall") is not None:
        drop = float(probe["overall"]) - float(metrics["overall"])
        if drop > gate.max_drop_vs_probe:
            failures.append(
                f"overall drop vs linear probe = {drop:.4f} (probe {probe['overall']:.4f} -> {metrics['overall']:.4f}) "
                f"> max_drop_vs_probe = {gate.max_drop_vs_probe:.4f} (probe metrics: {probe_source})"
            )
    return failures


def _absent(value: Any) -> bool:
    """A group metric of a group with no test images (``None`` or NaN)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def missing_groups(metrics: dict[str, Any], params: Params) -> list[str]:
    """One line per thresholded group that has no test images here (so its threshold was not applied)."""
    threshold = params.evaluate.gate.min_few  # the one group with a threshold
    if threshold > 0 and _absent(metrics.get("few")):
        return [f"few: no class of this data set is in the few group (standard: < 20 training images), so "
                f"min_few = {threshold:.4f} was not applied"]
    return []


def gate_verdict(params: Params, metrics: dict[str, Any], checkpoint_meta: dict[str, Any],
                 nonfinite: Sequence[str] = (), pixels: dict[str, float] | None = None) -> dict[str, Any]:
    """The gate (``evaluate.gate``) applied to ``metrics``, tied to the checkpoint it judged (``gate.json``).

    Args:
        params: the params in force (``evaluate.gate``, recorded as the verdict's ``thresholds``).
        metrics: the scalar test metrics.
        checkpoint_meta: the judged checkpoint's ``model.json`` (its ``weights_sha256``).
        nonfinite: names of trained tensors holding nan/inf: each fails the gate whatever the metrics say.
        pixels: overall test accuracy of each ``evaluate.gate.pixel_baselines`` entry on the same split
            (:func:`lpt.evaluate.pixel_baseline_accuracy`).
    """
    gcfg = params.evaluate.gate
    probe, probe_src = None, None
    if gcfg.max_drop_vs_probe is not None:
        path = probe_metrics_path(params)
        if path.is_file():
            probe, probe_src = json.loads(path.read_text()), str(path)
        else:
            log.warning("gate.max_drop_vs_probe set but no linear-probe metrics at %s: check skipped", path)
    failures = [f"trained tensor {name} holds non-finite values (nan/inf): training diverged; retrain it (a lower "
                "lr, or check the data)" for name in nonfinite]
    failures += check_gate(metrics, params, probe, probe_src, pixels)
    return {
        "passed": not failures,
        "failures": failures,
        "notes": missing_groups(metrics, params),
        "checkpoint_sha256": checkpoint_meta["weights_sha256"],
        "thresholds": gate_thresholds(params),
        "probe_overall": None if probe is None else probe.get("overall"),
        "pixel_overall": pixels or {},
    }
