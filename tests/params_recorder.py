"""A read-recording view of :class:`lpt.config.Params` (tests only).

``ParamsRecorder(params)`` behaves like the params object for attribute reads and remembers every key path
read (``train.phase1.lr``). Reading a section as a whole (``model_dump``, ``model_copy``, iterating it)
records all its keys. Used to check that each ``dvc.yaml`` stage lists exactly the params keys its code reads.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

__all__ = ["ParamsRecorder", "leaf_paths"]


def _file_name(model: BaseModel, field: str) -> str:
    info = type(model).model_fields[field]
    return info.alias or field


class ParamsRecorder:
    """Attribute reads pass through to ``obj``; each one is recorded in ``reads`` as a dotted key path."""

    def __init__(self, obj: BaseModel, prefix: str = "", reads: set[str] | None = None) -> None:
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "reads", reads if reads is not None else set())

    def _path(self, name: str) -> str:
        return f"{self._prefix}.{name}" if self._prefix else name

    def __getattr__(self, name: str) -> Any:
        obj = self._obj
        value = getattr(obj, name)
        if name in type(obj).model_fields:
            path = self._path(_file_name(obj, name))
            if isinstance(value, BaseModel):
                return ParamsRecorder(value, path, self.reads)
            self.reads.add(path)
            return value
        # a method or property of the section (model_dump, model_copy, to_dict...): the whole section is read
        self.reads.add(self._prefix or "*")
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("params are read-only in a recorded run")

    def __repr__(self) -> str:
        return f"ParamsRecorder({self._prefix or 'params'})"


def leaf_paths(raw: Any, prefix: str = "") -> set[str]:
    """Every leaf key path of a raw params mapping (a free-form mapping like ``timm_kwargs`` is one leaf)."""
    if not isinstance(raw, dict) or prefix.endswith("timm_kwargs"):
        return {prefix} if prefix else set()
    out: set[str] = set()
    for key, value in raw.items():
        out |= leaf_paths(value, f"{prefix}.{key}" if prefix else str(key))
    return out
