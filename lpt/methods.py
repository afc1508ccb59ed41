"""The registry of methods (``train.method``), like timm's model registry: one name -> what it builds and trains.

============  ===============  ==========================================  ===================================
method        model            phase 1                                     phase 2
============  ===============  ==========================================  ===================================
lpt           shared + pool    shared prompt + head, A-GCL, dual sampling  pool + keys + head, A-GCL, dual
lpt_phase1    shared prompt    shared prompt + head, A-GCL, dual sampling  copies the phase-1 model (final)
vpt_deep      shared prompt    shared prompt + head, plain CE, IB only     copies the phase-1 model (final)
linear_probe  head only        head only, plain CE, IB only                copies the phase-1 model (final)
============  ===============  ==========================================  ===================================

Nothing else in the project compares method strings: code asks the :class:`MethodSpec` what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["MethodSpec", "PhasePlan", "METHODS", "get_method", "phase_plan", "MethodError"]


class MethodError(ValueError):
    """Unknown method or phase; the message lists what exists."""


@dataclass(frozen=True)
class MethodSpec:
    """What one method is.

    Attributes:
        name: ``train.method``.
        shared_prompt: the model has the VPT-deep shared prompt.
        group_pool: the model gets the keyed group prompt pool in phase 2 (LPT).
        dual_sampling: class-balanced + instance-balanced streams (else instance-balanced only).
        loss: ``agcl`` (A-GCL, plus the key-matching term in phase 2) or ``ce`` (cross-entropy on scaled cosine).
    """

    name: str
    shared_prompt: bool
    group_pool: bool
    dual_sampling: bool
    loss: Literal["agcl", "ce"]

    @property
    def trains_phase2(self) -> bool:
        """Only a method with a group pool trains a second phase; the others copy phase 1 as final."""
        return self.group_pool


@dataclass(frozen=True)
class PhasePlan:
    """What one phase of one method does.

    Attributes:
        method: ``train.method``.
        phase: 1 or 2.
        trains: False when the phase only copies the phase-1 model as the final one.
        dual_sampling: CB + IB streams (LPT) instead of the IB stream alone.
        loss: ``agcl`` or ``ce``.
    """

    method: str
    phase: int
    trains: bool
    dual_sampling: bool
    loss: Literal["agcl", "ce"]


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("linear_probe", shared_prompt=False, group_pool=False, dual_sampling=False, loss="ce"),
        MethodSpec("vpt_deep", shared_prompt=True, group_pool=False, dual_sampling=False, loss="ce"),
        MethodSpec("lpt_phase1", shared_prompt=True, group_pool=False, dual_sampling=True, loss="agcl"),
        MethodSpec("lpt", shared_prompt=True, group_pool=True, dual_sampling=True, loss="agcl"),
    )
}
"""Every method by name, in the order comparison tables list them (weakest baseline first)."""


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` called ``name``.

    Raises:
        MethodError: no such method.
    """
    try:
        return METHODS[name]
    except KeyError:
        raise MethodError(f"train.method {name!r} is not one of {', '.join(METHODS)}") from None


def phase_plan(method: str, phase: int) -> PhasePlan:
    """The :class:`PhasePlan` of ``method`` in ``phase``.

    Raises:
        MethodError: unknown method or phase.
    """
    if phase not in (1, 2):
        raise MethodError(f"phase must be 1 or 2, got {phase}")
    spec = get_method(method)
    trains = phase == 1 or spec.trains_phase2
    return PhasePlan(method, phase, trains, spec.dual_sampling, spec.loss)
