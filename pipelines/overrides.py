"""Flow-parameter overrides applied the DVC way: validated, then written into ``params.yaml``.

Policy (documented in docs/orchestration.md):

* Overrides are validated against the strict schema (``lpt.config``) *before any stage runs*; a misspelt
  key or a bad value raises :class:`lpt.config.ParamsError` and nothing is touched.
* The new ``params.yaml`` is written atomically (temp file + rename, comments kept), so DVC sees the
  change exactly as if a person had edited the file, and ``dvc.lock`` records the values that produced
  each output.
* If the run succeeds, the overridden file stays (the workspace then describes its outputs, like
  ``dvc exp run -S``). If the run fails, the original file is restored byte for byte, so a failed
  experiment never silently changes the project's source of truth; stages that already ran with the
  overrides are simply seen as changed by the next ``dvc repro``.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from lpt.config import ParamsError, apply_overrides, parse_params, read_raw, write_params_atomic

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


def _round_trip_text(text: str, overrides: Mapping[str, Any]) -> str | None:
    """``text`` with ``overrides`` set, comments and key order kept; ``None`` if ruamel is unavailable."""
    try:
        from ruamel.yaml import YAML  # a DVC dependency; DVC itself edits params this way
    except ImportError:  # pragma: no cover - dvc always brings it
        return None
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(text)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = doc
        for part in parents:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        node[leaf] = value
    buf = io.StringIO()
    rt.dump(doc, buf)
    return buf.getvalue()


def _replace_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` beside ``path`` and rename it over ``path`` (never half-written)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    text = _round_trip_text(original.decode(), overrides)
    if text is not None and yaml.safe_load(text) == raw:
        _replace_atomic(path, text.encode())
    else:  # the round trip did not reproduce the validated mapping: write it plainly (comments lost)
        write_params_atomic(path, raw)
    try:
        yield raw
    except BaseException:
        _replace_atomic(path, original)
        raise
