"""The trained tensors, in one spec: the model, the methods, resume, task packs and the runtime derive from it.

Symbols: L blocks, S shared-only blocks, T prompt length, D embed dim, P pool size, C classes.

========================  ========================  ==============  ==========  ================================
name (pack / graph input) model parameter           shape           trained in  ``model.*`` keys that shape it
========================  ========================  ==============  ==========  ================================
shared_prompt             shared_prompt.prompt      [L, T, D]       phase 1     prompt_length
group_prompts             group_pool.prompts        [P, L-S, T, D]  phase 2     pool_size, shared_blocks, top_k,
                                                                                block_reuse
keys                      group_pool.keys           [P, D]          phase 2     pool_size
head                      head.weight               [C, D]          1 and 2     head_dropout
adapters                  adapters.* (LIFT)         per block       phase 1     adapter_dim
========================  ========================  ==============  ==========  ================================

A tensor exists in a model from the first phase that trains it (the pool from phase 2) and is trainable
exactly in the phases listed; a method (:class:`lpt.methods.MethodSpec`) names the tensors it trains. T, P
and C may differ from task to task, so they are dynamic axes of a backbone graph; L, S and D are fixed by it.

Adding a trained tensor = one :class:`TrainedTensor` here + the method that trains it (and the forward that
uses it). A tensor at ``extra_tensors.<name>`` needs no model code to exist: the model builds it as a plain
parameter of its spec shape (:meth:`lpt.model.lpt.LPTModel.symbol_sizes`). Training (which tensors are trainable, what a checkpoint holds, what the resume recipe records),
task packs (pack tensors, graph inputs and their dynamic axes) and the runtime (which task inputs a pack may
carry and their shapes) read this spec. Torch-free: the runtime imports it.

Example:
    >>> [t.name for t in trained_tensors(("shared_prompt", "group_prompts", "keys", "head"), phase=1)]
    ['shared_prompt', 'head']
    >>> task_inputs()["group_prompts"], dynamic_axes(("P", "L-S", "T", "D"))
    (('P', 'L-S', 'T', 'D'), {0: 'pool_size', 2: 'prompt_length'})
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["TrainedTensor", "TRAINED_TENSORS", "DYNAMIC_DIMS", "get_tensor", "trained_tensors", "method_phases",
           "pack_names", "task_inputs", "dynamic_axes", "recipe_keys"]


@dataclass(frozen=True)
class TrainedTensor:
    """One trained tensor (or, unpackable, one group of them) of :class:`lpt.model.lpt.LPTModel`.

    Attributes:
        name: its name in a task pack and as a backbone-graph input.
        path: the model's parameter path (a module prefix for a group: every parameter under it).
        dims: the shape in symbols (L, S, L-S, T, D, P, C); empty for a group of per-block tensors.
        phases: the phases that train it; it exists in a model from the first of them on.
        config: the ``model.*`` params keys that shape it or how it is used (the resume recipe records them).
        packable: a backbone graph can take it as an input (a group inside the backbone's blocks cannot).
    """

    name: str
    path: str
    dims: tuple[str, ...]
    phases: tuple[int, ...]
    config: tuple[str, ...] = ()
    packable: bool = True

    @property
    def first_phase(self) -> int:
        """The phase from which a model has this tensor."""
        return min(self.phases)


TRAINED_TENSORS: tuple[TrainedTensor, ...] = (
    TrainedTensor("shared_prompt", "shared_prompt.prompt", ("L", "T", "D"), (1,)),
    TrainedTensor("group_prompts", "group_pool.prompts", ("P", "L-S", "T", "D"), (2,),
                  ("pool_size", "shared_blocks", "top_k", "block_reuse")),
    TrainedTensor("keys", "group_pool.keys", ("P", "D"), (2,), ("pool_size",)),
    TrainedTensor("head", "head.weight", ("C", "D"), (1, 2)),
    TrainedTensor("adapters", "adapters", (), (1,), ("adapter_dim",), packable=False),
)
"""Every trained tensor, in graph-input (and pack) order."""

DYNAMIC_DIMS: dict[str, str] = {"T": "prompt_length", "P": "pool_size", "C": "num_classes"}
"""The symbols that may differ from task to task: a backbone graph's dynamic axes (named so)."""

_BASE_RECIPE_KEYS = ("prompt_length", "head_dropout", "head_init")
"""What the resume recipe records of the model for every method (``head_init`` is the method's own rule)."""


def get_tensor(name: str) -> TrainedTensor:
    """The :class:`TrainedTensor` called ``name``.

    Raises:
        KeyError: no such tensor (the message lists the names).
    """
    for tensor in TRAINED_TENSORS:
        if tensor.name == name:
            return tensor
    raise KeyError(f"no trained tensor {name!r}; the spec has {', '.join(t.name for t in TRAINED_TENSORS)}")


def trained_tensors(names: Iterable[str], phase: int | None = None) -> list[TrainedTensor]:
    """The tensors among ``names`` (spec order) that a model in ``phase`` has (``None``: every phase)."""
    wanted = set(names)
    return [t for t in TRAINED_TENSORS if t.name in wanted and (phase is None or t.first_phase <= phase)]


def method_phases(names: Iterable[str]) -> tuple[int, ...]:
    """The phases a method training ``names`` has: 1, and 2 when one of its tensors first exists in phase 2."""
    return tuple(sorted({1} | {t.first_phase for t in trained_tensors(names)}))


def pack_names() -> dict[str, str]:
    """Model parameter path -> pack / graph-input name, for every packable tensor (spec order)."""
    return {t.path: t.name for t in TRAINED_TENSORS if t.packable}


def task_inputs() -> dict[str, tuple[str, ...]]:
    """Graph-input name -> its shape in symbols: the task tensors a backbone graph can take (spec order)."""
    return {t.name: t.dims for t in TRAINED_TENSORS if t.packable}


def dynamic_axes(dims: Iterable[str]) -> dict[int, str]:
    """The dynamic axes of a tensor of shape ``dims``: axis -> name, for the symbols of :data:`DYNAMIC_DIMS`."""
    return {axis: DYNAMIC_DIMS[d] for axis, d in enumerate(dims) if d in DYNAMIC_DIMS}


def recipe_keys(names: Iterable[str], phase: int) -> tuple[str, ...]:
    """The ``model.*`` keys the resume recipe of ``phase`` records for a method training ``names``.

    Example:
        >>> recipe_keys(("adapters", "head"), 1)
        ('prompt_length', 'head_dropout', 'head_init', 'adapter_dim')
    """
    keys = list(_BASE_RECIPE_KEYS)
    for tensor in trained_tensors(names, phase):
        keys += [k for k in tensor.config if k not in keys]
    return tuple(keys)
