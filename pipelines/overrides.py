"""Flow-parameter overrides applied the DVC way: validated, then written into ``params.yaml``.

Policy (documented in docs/orchestration.md):

* Overrides are validated against the strict schema (``lpt.config``) *before any stage runs*; a misspelt
  key or a bad value raises :class:`lpt.config.ParamsError` and nothing is touched.
* The new ``params.yaml`` is written atomically (temp file + rename, comments kept), so DVC sees the
  change exactly as if a person had edited the file, and ``dvc.lock`` records the values that produced
  each output.
* If the run succeeds, the overridden file stays (the workspace then describes its outputs, like
  ``dvc exp run -S``). If the run fails, the original file is restored byte for byte, so a failed
  experiment never silently changes the project's source of truth; the flow then puts ``dvc.lock`` and
  the outputs of the stages that already ran with the overrides back too (``pipelines.flow``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lpt.config import ParamsError, apply_overrides, parse_params, read_raw, update_params_file
from lpt.utils import atomic_path

__all__ = ["validate_overrides", "applied_overrides"]


def validate_overrides(params_path: str | Path, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return the raw params with ``overrides`` applied, after strict validation.

    Args:
        params_path: the ``params.yaml`` file.
        overrides: dotted keys to values, e.g. ``{"train.phase1.epochs": 3}``.

    Returns:
        The overridden raw mapping (validated).

    Raises:
        ParamsError: missing/invalid file, unknown key, wrong type or out-of-range value.
    """
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ParamsError(f"overrides: expected a mapping of dotted keys to values, got {type(overrides).__name__}")
    for key in overrides or {}:
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ParamsError(f"override key {key!r}: expected a dotted key path like 'train.phase1.epochs'")
    raw = apply_overrides(read_raw(params_path), dict(overrides or {}))
    parse_params(raw, source=f"{params_path} + overrides {dict(overrides or {})}")
    return raw


@contextlib.contextmanager
def applied_overrides(params_path: str | Path, overrides: Mapping[str, Any] | None) -> Iterator[dict[str, Any]]:
    """Validate and write ``overrides`` into ``params_path`` for the duration of a run.

    On a normal exit the overridden file is kept; on an exception the original bytes are restored.
    Without overrides (or when they change nothing) the file is not touched at all.

    Args:
        params_path: the ``params.yaml`` file.
        overrides: dotted keys to values.

    Yields:
        The raw params now in effect.

    Raises:
        ParamsError: before anything is written, when the overrides are invalid.
    """
    path = Path(params_path)
    raw = validate_overrides(path, overrides)
    original = path.read_bytes()
    if not overrides or raw == read_raw(path):
        yield raw
        return
    update_params_file(path, dict(overrides))
    try:
        yield raw
    except BaseException:
        with atomic_path(path) as tmp:  # restore the original bytes, atomically
            tmp.write_bytes(original)
        raise
