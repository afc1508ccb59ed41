"""Exit codes of the ``lpt`` commands: deterministic verdicts get their own code, so callers (DVC, the
Prefect flow, CI) can tell "the model/data is not good enough" from "something broke" without reading
message text. A deterministic verdict is never worth a retry: re-running gives the same answer.
"""

from __future__ import annotations

__all__ = ["OK", "ERROR", "BAD_PARAMS", "VALIDATION_FAILED", "GATE_FAILED", "PARITY_FAILED", "GATE_NOT_PASSED",
           "DETERMINISTIC"]

OK = 0
ERROR = 1
"""A library error: missing or damaged input, a bad checkpoint, a failed step, or a filesystem fault while
writing (no space, file size limit, permission denied, name too long: the message names the output path, whose
previous contents are intact)."""
BAD_PARAMS = 2
"""params.yaml or an override is invalid, a command-line usage error, an output folder the project may not
write (``.``, a repository root, a folder holding files the project did not write: docs/security.md), an
input refused by policy (``lpt.runtime.PredictRefused``), or a model file given to ``lpt predict`` that ONNX
Runtime cannot load or run (damaged, or inputs unlike its metadata: ``lpt.runtime.ModelFileError``)."""
VALIDATION_FAILED = 3
"""``lpt validate``: at least one data expectation failed."""
GATE_FAILED = 4
"""``lpt evaluate``: the quality gate (``evaluate.gate``) failed."""
PARITY_FAILED = 5
"""``lpt export``: the ORT-vs-torch parity gate or a variant's accuracy check failed; ``lpt pack``: the pack's
parity gate (backbone graph + pack vs torch) failed."""
GATE_NOT_PASSED = 6
"""``lpt export`` / ``lpt pack``: the evaluated gate verdict for this checkpoint is missing or failed; nothing
exported or packed."""

DETERMINISTIC = frozenset({BAD_PARAMS, VALIDATION_FAILED, GATE_FAILED, PARITY_FAILED, GATE_NOT_PASSED})
"""Codes that mean a verdict on the inputs, not a hiccup of the machine: never retry these."""
