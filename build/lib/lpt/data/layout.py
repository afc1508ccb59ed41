"""Names of the shards folder's layout, shared by the writer (ingest) and the readers.

``<data.out_dir>/manifest.json`` and ``<data.out_dir>/<split>/<split>-%06d.tar``.
"""

from __future__ import annotations

__all__ = ["MANIFEST_FILE", "shard_name"]

MANIFEST_FILE = "manifest.json"
"""The manifest's name inside the shards folder (``data.out_dir``): its one and only place."""


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``."""
    return f"{split}-{index:06d}.tar"
