"""Error types shared by the training stages (pretrain, phase 1, phase 2)."""

from __future__ import annotations

__all__ = ["TrainError"]


class TrainError(RuntimeError):
    """Training cannot start or continue; the message says what is missing and how to fix it."""
