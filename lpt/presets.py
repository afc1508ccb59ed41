"""Presets: partial ``params.yaml`` mappings under ``configs/`` that set up a benchmark recipe.

A preset is deep-merged onto ``params.yaml`` (mappings merge key by key, values and lists replace),
the result is validated by the strict schema and written atomically. Free-form mappings (see
:data:`REPLACED_WHOLE`) are replaced whole, so ``backbone.timm_kwargs`` of the small embedded ViT does not
leak into a ViT-B/16 recipe.

Example:
    >>> from lpt.presets import apply_preset
    >>> apply_preset("places_lt_vitb16", "params.yaml")  # doctest: +SKIP
    ['data.source', 'backbone.name', ...]

The same values work as ``dvc exp run -S`` overrides: ``python -m lpt.presets NAME`` prints them as
``-S key=value`` arguments in DVC's (Hydra) override grammar, one shell word each, so
``dvc exp run $(python -m lpt.presets NAME)`` works as written: a key the current ``params.yaml`` lacks gets
the ``+`` prefix, a replaced mapping is removed (``~key``) and added whole (``+key={a:1,b:2}``).

Presets are read from ``configs/`` of the project in the working directory (the checkout you run in), not
from wherever the package is installed.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

from lpt.config import ParamsError, read_raw, update_params_file

__all__ = ["PRESET_DIR", "PRESET_NAME", "REPLACED_WHOLE", "list_presets", "load_preset", "merge_preset", "apply_preset",
           "preset_overrides", "dvc_set_flags"]

PRESET_DIR = Path("configs")
"""Where named presets live: ``configs/<name>.yaml`` of the project in the working directory."""

REPLACED_WHOLE = frozenset({"backbone.timm_kwargs"})
"""Dotted keys whose mapping value a preset replaces instead of merging into (free-form kwargs)."""


def list_presets(preset_dir: Path = PRESET_DIR) -> list[str]:
    """Names of the presets available under ``preset_dir``."""
    return sorted(p.stem for p in Path(preset_dir).glob("*.yaml"))


PRESET_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
"""A preset name: a plain identifier (no ``/``, ``.``, ``..``): it names ``<preset_dir>/<name>.yaml`` and nothing else."""


def _preset_path(name: str | Path, preset_dir: Path) -> Path:
    """``<preset_dir>/<name>.yaml`` for a name, the file itself for a :class:`~pathlib.Path` (the Python API's
    explicit file).

    Raises:
        ParamsError: a name that is not a plain identifier, or a preset file that resolves outside ``preset_dir``
            (a symlink out of it).
        FileNotFoundError: no such preset.
    """
    if isinstance(name, Path):
        if not name.is_file():
            raise FileNotFoundError(f"preset file {name} not found")
        return name
    if not PRESET_NAME.fullmatch(name):
        raise ParamsError(f"preset name {name!r} is not a plain name (letters, digits, _ and -, as in "
                          f"{', '.join(list_presets(preset_dir)[:3]) or 'embedded_default'}): presets are read from "
                          f"{preset_dir}/ only")
    path = Path(preset_dir) / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"preset {name!r} not found in {preset_dir} "
                                f"(available: {', '.join(list_presets(preset_dir)) or 'none'})")
    if not path.resolve().is_relative_to(Path(preset_dir).resolve()):
        raise ParamsError(f"preset {name!r}: {path} resolves to {path.resolve()}, outside {preset_dir}/ "
                          "(a link out of the presets folder is not followed)")
    return path


def load_preset(name: str | Path, preset_dir: Path = PRESET_DIR) -> dict[str, Any]:
    """Read a preset (a name under ``preset_dir`` or a path to a YAML file) as a raw mapping.

    Args:
        name: a preset name (a plain identifier, :data:`PRESET_NAME`) under ``preset_dir``, or a
            :class:`~pathlib.Path` to a YAML file (the Python API only: the command line takes names).
        preset_dir: folder of named presets.

    Raises:
        FileNotFoundError: no such preset.
        ParamsError: the file is not a YAML mapping, a name is not a plain identifier, or the named file
            resolves outside ``preset_dir``.
    """
    path = _preset_path(name, preset_dir)
    raw = read_raw(path)
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: a preset must be a mapping of params sections")
    return raw


def merge_preset(base: dict[str, Any], preset: dict[str, Any], _prefix: str = "") -> tuple[dict[str, Any], list[str]]:
    """Deep-merge ``preset`` onto a copy of ``base``.

    Args:
        base: the raw params mapping.
        preset: the partial mapping to lay over it.

    Returns:
        ``(merged, changed)``: the merged copy and the dotted keys whose value actually changed.
    """
    merged = copy.deepcopy(base)
    changed: list[str] = []
    for key, value in preset.items():
        dotted = f"{_prefix}{key}"
        old = merged.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and dotted not in REPLACED_WHOLE:
            merged[key], sub = merge_preset(old, value, f"{dotted}.")
            changed.extend(sub)
        else:
            if old != value:
                changed.append(dotted)
            merged[key] = copy.deepcopy(value)
    return merged, changed


def apply_preset(name: str | Path, params_path: str | Path = "params.yaml",
                 preset_dir: Path = PRESET_DIR) -> list[str]:
    """Merge preset ``name`` onto ``params_path``, validate and write it atomically.

    Args:
        name: preset name under ``configs/`` (without ``.yaml``; a plain identifier) or a
            :class:`~pathlib.Path` to a preset file.
        params_path: the params file to update.
        preset_dir: folder of named presets.

    Returns:
        The dotted keys whose value changed (empty when the preset was already applied).

    Raises:
        FileNotFoundError: unknown preset.
        ParamsError: the merged params are invalid (nothing is written then).
    """
    preset = load_preset(name, preset_dir)  # the name is checked before anything else is read
    _, changed = merge_preset(read_raw(params_path), preset)
    if changed:  # comments and key order of params.yaml are kept
        update_params_file(params_path, preset_overrides(name, preset_dir))
    return changed


def _flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in REPLACED_WHOLE:
            out.update(_flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def preset_overrides(name: str | Path, preset_dir: Path = PRESET_DIR) -> dict[str, Any]:
    """The preset as flat ``{"dotted.key": value}`` overrides (for ``dvc exp run -S`` / ``lpt ... -S``)."""
    return _flatten(load_preset(name, preset_dir))


_PLAIN = re.compile(r"^[A-Za-z0-9_./+-]+$")


def _hydra_value(value: Any, where: str) -> str:
    """``value`` in Hydra's override grammar without spaces (one shell word after ``$(...)``).

    Raises:
        ParamsError: a string that cannot be written without spaces or quotes.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(_hydra_value(v, where) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v, where)}" for k, v in value.items()) + "}"
    text = str(value)
    if not _PLAIN.match(text) or text in ("true", "false", "null"):
        raise ParamsError(f"{where}: value {text!r} cannot be a `dvc exp run -S` word (spaces or special "
                          "characters): apply the preset with `lpt params preset` instead")
    return text


def _has_key(raw: dict[str, Any], dotted: str) -> bool:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def dvc_set_flags(name: str | Path, params_path: str | Path = "params.yaml",
                  preset_dir: Path = PRESET_DIR) -> list[str]:
    """The preset as ``dvc exp run`` arguments against the current ``params_path``.

    Returns:
        ``["-S", "key=value", ...]``: ``+key=value`` for a key ``params_path`` lacks; a mapping replaced whole
        (:data:`REPLACED_WHOLE`) as ``~key`` then ``+key={...}``.

    Raises:
        FileNotFoundError: unknown preset or no params file.
        ParamsError: a value that has no one-word form.
    """
    base = read_raw(params_path)
    args: list[str] = []
    for key, value in preset_overrides(name, preset_dir).items():
        text = _hydra_value(value, f"preset {name} key {key}")
        if key in REPLACED_WHOLE and _has_key(base, key):
            args += ["-S", f"~{key}", "-S", f"+{key}={text}"]
        else:
            args += ["-S", f"{'' if _has_key(base, key) else '+'}{key}={text}"]
    return args


def main(argv: list[str] | None = None) -> int:
    """``python -m lpt.presets NAME``: print the preset as ``-S key=value`` flags for ``dvc exp run``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(f"usage: dvc exp run $(python -m lpt.presets NAME)   (presets in {PRESET_DIR}/: "
              f"{', '.join(list_presets()) or 'none'})", file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        flags = dvc_set_flags(args[0])
    except (FileNotFoundError, ParamsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(" ".join(flags))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
