"""The registry of methods (``train.method``), like timm's model registry: one name -> what it builds and trains.

===============  ====================  ===========================  ===============  =================================
method           trains (phase 1)      loss                         sampling         phase 2
===============  ====================  ===========================  ===============  =================================
linear_probe     head                  CE                           instance (IB)    copies the phase-1 model (final)
linear_probe_la  head                  logit-adjusted CE (tau)      instance (IB)    copies the phase-1 model (final)
linear_probe_cb  head                  CE                           class (CB)       copies the phase-1 model (final)
vpt_deep         shared prompt + head  CE                           instance (IB)    copies the phase-1 model (final)
vpt_deep_la      shared prompt + head  logit-adjusted CE (tau)      instance (IB)    copies the phase-1 model (final)
lift             adapters + head       logit-adjusted CE (tau)      instance (IB)    copies the phase-1 model (final)
lpt_phase1       shared prompt + head  A-GCL                        dual (CB + IB)   copies the phase-1 model (final)
lpt              shared prompt + head  A-GCL                        dual (CB + IB)   pool + keys + head, A-GCL, dual
===============  ====================  ===========================  ===============  =================================

Every head is the cosine classifier; ``lift`` starts it from the class means of the frozen features
(LIFT's initialisation for a backbone without a text encoder) and trains AdaptFormer-style bottleneck
adapters in parallel to every block's MLP (:mod:`lpt.model.adapters`). Logit adjustment (Menon et al.,
ICLR 2021) trains on ``scale * cosine + tau * log(prior)`` and predicts with the raw cosine.

A method's recipe is its own, its budget is the harness's: each spec carries a :class:`Recipe` (cosine
scale, head dropout, weight decay, warm-up), which is what the params keys ``loss.scale``,
``model.head_dropout``, ``train.phaseN.weight_decay`` and ``train.phaseN.warmup_epochs`` mean when they are
null (:func:`own`). Epochs, step floors, batch size and lr stay the harness's, the same for every method.

Nothing else in the project compares method strings: code asks the :class:`MethodSpec` what to do. What a
method trains is a list of tensor names; each tensor's shape and phases are in :mod:`lpt.tensors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lpt.tensors import get_tensor, method_phases

__all__ = ["MethodSpec", "PhasePlan", "Recipe", "LPT_RECIPE", "LIFT_RECIPE", "own", "METHODS", "get_method",
           "phase_plan", "MethodError", "Loss", "Sampling", "HeadInit", "REFERENCE_METHOD", "PROBE_METHOD"]

Loss = Literal["agcl", "ce", "la"]
"""``agcl``: A-GCL (+ the key-matching term in phase 2); ``ce``: cross-entropy on the scaled cosine;
``la``: logit-adjusted cross-entropy, ``scale * cosine + loss.la_tau * log(class prior)``."""
Sampling = Literal["ib", "cb", "dual"]
"""``ib``: instance-balanced batches; ``cb``: class-aware (class-balanced) batches; ``dual``: both streams
per step with the IB weight decaying over the epochs (LPT)."""
HeadInit = Literal["random", "class_mean"]
"""``random``: truncated normal; ``class_mean``: the normalised mean frozen feature of each class."""


class MethodError(ValueError):
    """Unknown method or phase; the message lists what exists."""


@dataclass(frozen=True)
class Recipe:
    """A method's own hyper-parameters: the values of the params keys left null.

    Attributes:
        scale: ``loss.scale``, the cosine head's logit scale s in ``softmax(s * cosine)``.
        head_dropout: ``model.head_dropout``, dropout on the feature before the head.
        weight_decay: ``train.phaseN.weight_decay``.
        warmup_epochs: ``train.phaseN.warmup_epochs`` (``warmup_steps``, when set, still wins).
    """

    scale: float
    head_dropout: float
    weight_decay: float
    warmup_epochs: float


LPT_RECIPE = Recipe(scale=20.0, head_dropout=0.1, weight_decay=0.01, warmup_epochs=1.0)
"""The paper's (LPT_SPEC): s = 20, head dropout 0.1, weight decay 0.01 (SGD), one warm-up epoch. The other
in-house rows (probes, VPT-deep) use it too, so they differ from LPT only in what they train and their loss."""
LIFT_RECIPE = Recipe(scale=25.0, head_dropout=0.0, weight_decay=5e-4, warmup_epochs=0.0)
"""LIFT's own (shijxcs/LIFT, configs and trainer): cosine scale 25, no head dropout, weight decay 5e-4, no
warm-up (docs/evaluation.md lists what else differs from the authors' code)."""


@dataclass(frozen=True)
class MethodSpec:
    """What one method is.

    Attributes:
        name: ``train.method``.
        tensors: the trained tensors it has (names of :data:`lpt.tensors.TRAINED_TENSORS`); the spec says in
            which phase each one exists and is trained, so they also decide the method's phases.
        sampling: ``ib``, ``cb`` or ``dual`` (:data:`Sampling`).
        loss: ``agcl``, ``ce`` or ``la`` (:data:`Loss`).
        head_init: how the cosine head starts (:data:`HeadInit`).
        label: the name comparison tables print.
        recipe: the method's own hyper-parameters (:class:`Recipe`).
    """

    name: str
    tensors: tuple[str, ...]
    sampling: Sampling
    loss: Loss
    head_init: HeadInit = "random"
    label: str = ""
    recipe: Recipe = LPT_RECIPE

    def __post_init__(self) -> None:
        for name in self.tensors:
            get_tensor(name)  # a name the spec has
        assert "head" in self.tensors, "every method has the cosine head"
        assert not (self.group_pool and not self.shared_prompt), "the group pool builds on the shared prompt"
        assert not (self.adapter and self.shared_prompt), "a model has prompts or adapters, not both"

    @property
    def shared_prompt(self) -> bool:
        """The model has the VPT-deep shared prompt."""
        return "shared_prompt" in self.tensors

    @property
    def group_pool(self) -> bool:
        """The model gets the keyed group prompt pool in phase 2 (LPT)."""
        return "group_prompts" in self.tensors

    @property
    def adapter(self) -> bool:
        """Bottleneck adapters in parallel to every block's MLP (LIFT)."""
        return "adapters" in self.tensors

    @property
    def phases(self) -> tuple[int, ...]:
        """``(1,)``, or ``(1, 2)`` when one of its tensors first exists in phase 2 (:func:`lpt.tensors.method_phases`)."""
        return method_phases(self.tensors)

    @property
    def trains_phase2(self) -> bool:
        """Only a method with a phase-2 tensor (LPT's pool) trains a second phase; the others copy phase 1 as final."""
        return 2 in self.phases

    @property
    def dual_sampling(self) -> bool:
        """CB + IB streams per step (LPT's dual sampling)."""
        return self.sampling == "dual"


@dataclass(frozen=True)
class PhasePlan:
    """What one phase of one method does.

    Attributes:
        method: ``train.method``.
        phase: 1 or 2.
        trains: False when the phase only copies the phase-1 model as the final one.
        sampling: ``ib``, ``cb`` or ``dual``.
        loss: ``agcl``, ``ce`` or ``la``.
    """

    method: str
    phase: int
    trains: bool
    sampling: Sampling
    loss: Loss

    @property
    def dual_sampling(self) -> bool:
        """CB + IB streams per step."""
        return self.sampling == "dual"

    @property
    def streams(self) -> tuple[str, ...]:
        """The sampler streams a step draws from: ``("ib",)``, ``("cb",)`` or ``("cb", "ib")``."""
        return {"ib": ("ib",), "cb": ("cb",), "dual": ("cb", "ib")}[self.sampling]


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("linear_probe", ("head",), "ib", "ce", label="linear probe (CE)"),
        MethodSpec("linear_probe_la", ("head",), "ib", "la", label="linear probe (LA)"),
        MethodSpec("linear_probe_cb", ("head",), "cb", "ce", label="linear probe (CB sampling)"),
        MethodSpec("vpt_deep", ("shared_prompt", "head"), "ib", "ce", label="VPT-deep (CE)"),
        MethodSpec("vpt_deep_la", ("shared_prompt", "head"), "ib", "la", label="VPT-deep (LA)"),
        MethodSpec("lift", ("adapters", "head"), "ib", "la", head_init="class_mean", label="LIFT",
                   recipe=LIFT_RECIPE),
        MethodSpec("lpt_phase1", ("shared_prompt", "head"), "dual", "agcl", label="LPT phase 1"),
        MethodSpec("lpt", ("shared_prompt", "group_prompts", "keys", "head"), "dual", "agcl", label="LPT"),
    )
}
"""Every method by name, in the order comparison tables list them (floors first, LPT last)."""

REFERENCE_METHOD = "lpt"
"""The method comparisons judge: every other row is called a win, tie or loss against it."""
PROBE_METHOD = "linear_probe"
"""The plain floor: one forward of the frozen backbone + a CE-trained head (the gate's probe, the inference
cost unit, the project's original target)."""


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` called ``name``.

    Raises:
        MethodError: no such method.
    """
    try:
        return METHODS[name]
    except KeyError:
        raise MethodError(f"train.method {name!r} is not one of {', '.join(METHODS)}") from None


def own(value: float | None, recipe: Recipe, key: str) -> float:
    """``value`` as set in params, or the method's own (``recipe.<key>``, :class:`Recipe`) when it is null.

    Example:
        >>> lift = get_method("lift").recipe
        >>> own(None, lift, "scale"), own(30.0, lift, "scale"), own(None, LPT_RECIPE, "scale")
        (25.0, 30.0, 20.0)
    """
    return float(getattr(recipe, key)) if value is None else float(value)


def phase_plan(method: str, phase: int) -> PhasePlan:
    """The :class:`PhasePlan` of ``method`` in ``phase``.

    Raises:
        MethodError: unknown method or phase.
    """
    if phase not in (1, 2):
        raise MethodError(f"phase must be 1 or 2, got {phase}")
    spec = get_method(method)
    trains = phase == 1 or spec.trains_phase2
    return PhasePlan(method, phase, trains, spec.sampling, spec.loss)
