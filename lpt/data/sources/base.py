"""Types shared by every source: labelled items per split, the ingest error and the bad-item policy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

__all__ = ["IngestError", "Item", "SourceData", "BadItems", "require_dir", "require_file"]

Payload = Union[np.ndarray, Path, bytes]
"""An image: an HxW (gray) or HxWx3 uint8 array, a file on disk, or encoded bytes."""


class IngestError(Exception):
    """Ingest cannot go on; the message names the file and the line or key at fault."""


@dataclass
class Item:
    """One labelled image of a split.

    Attributes:
        source_id: where it came from (``file:line``, a path, ``train[123]``): stored in the shard's json.
        label: class index in ``[0, C)``.
        payload: the image (see :data:`Payload`).
    """

    source_id: str
    label: int
    payload: Payload


@dataclass
class SourceData:
    """What a source hands to the shard writer.

    Attributes:
        class_names: the C target class names, index = label.
        splits: ``train``/``val``/``test`` -> items.
        image_size: ``(H, W)`` when every image has that size, else None.
        val_from_train: the val split was carved out of the source's train list (so each class trains on
            fewer images than the source has): the manifest then keeps the uncarved counts too, and the
            A-GCL cloud size and the many/medium/few groups come from those (docs/data.md).

    A split is any sized iterable of items (a list, or a lazily rendered split); ingest iterates it once.
    """

    class_names: list[str]
    splits: dict[str, Sequence[Item]]
    image_size: tuple[int, int] | None = None
    val_from_train: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class BadItems:
    """Policy for bad inputs: raise :class:`IngestError`, or (``skip_bad``) record and continue.

    Skipped items are listed in the manifest's ``skipped`` section, so nothing is dropped silently.
    """

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.items: list[dict[str, str]] = []

    def __call__(self, where: str, reason: str, n: int = 1) -> None:
        """Report a bad item at ``where`` (file, line or key); ``n`` items when one problem drops several.

        Raises:
            IngestError: unless skipping is enabled.
        """
        if not self.skip:
            raise IngestError(f"{where}: {reason} (set data.skip_bad: true to skip such items)")
        self.items.append({"item": where, "reason": reason, "n": n})

    @property
    def count(self) -> int:
        """Number of skipped items."""
        return sum(int(i["n"]) for i in self.items)


def require_dir(path: Path, what: str) -> Path:
    """Return ``path`` if it is a folder, else raise an IngestError naming ``what``."""
    path = Path(path)
    if not path.is_dir():
        raise IngestError(f"{path}: {what} folder not found")
    return path


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file, else raise an IngestError naming ``what``."""
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"{path}: {what} file not found")
    return path
