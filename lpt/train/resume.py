"""Resume state: data only (safetensors + JSON of plain values), kept outside the stage's outputs.

A phase run keeps its resumable state in a scratch folder ``<train.out_dir>/.scratch/phase{N}-{fingerprint}``
beside (never inside) the DVC output ``<train.out_dir>/phase{N}``. The fingerprint hashes the phase's
recipe (every params value that shapes the trajectory: :func:`phase_recipe`) and its inputs (data
manifest, backbone weights, phase-1 checkpoint), so a run only ever resumes its own state, several
settings can each keep an interrupted run, and DVC's run cache is untouched (the outputs are not
``persist``). The folder is removed when the phase finishes and its outputs are in place.

``scratch/last/`` holds ``state.safetensors`` (trainable tensors, best-epoch tensors, optimizer buffers)
and ``state.json`` (progress, optimizer/scheduler scalars, per-rank sampler and RNG states as ints and
base64 bytes). Nothing in it is ever unpickled or executed: a damaged or malformed state is reported and
ignored (training starts from the beginning), never fatal.
"""

from __future__ import annotations

import base64
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lpt.config import Params, PhaseConfig
from lpt.methods import MethodSpec, Recipe, own
from lpt.tensors import recipe_keys
from lpt.utils import atomic_dir, save_safetensors, sha256_json

__all__ = ["RESUME_FORMAT", "RESUME_PARTS", "join_resume_tensors", "split_resume_tensors", "phase_recipe", "filled_phase", "head_init", "fingerprint", "scratch_dir", "ResumeState", "save_resume_state",
           "load_resume_state", "capture_rng_state", "restore_rng_state", "optimizer_to_flat", "optimizer_from_flat",
           "ResumeStateError", "check_structure", "check_tensors"]

RESUME_FORMAT = 3
"""Version of the ``last/`` layout; a different version is never resumed."""
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


class ResumeStateError(ValueError):
    """A resume state is damaged or malformed (the message names the file and the field)."""


# ============================================================================================ recipe
_AGCL_PHASE1 = ("scale", "margin", "noise_mul", "noise_std", "label_smoothing", "gamma_pos_cb", "gamma_neg_cb",
                "gamma_pos_ib", "gamma_neg_ib", "ib_weight")


def head_init(params: Params, spec: MethodSpec) -> str:
    """How phase 1 starts the head: ``model.head_init``, or the method's own (``spec.head_init``) when null."""
    return params.model.head_init or spec.head_init


def phase_recipe(params: Params, phase: int, spec: MethodSpec) -> dict[str, Any]:
    """Every params value that shapes phase ``phase``'s trajectory and result, and nothing else.

    This is exactly what the phase reads besides paths and hardware knobs; ``dvc.yaml`` lists the same
    keys for the phase stages (a test checks both against what the code reads). It is hashed into the
    resume fingerprint and recorded in ``model.json``.
    """
    loss = params.loss
    if spec.loss == "ce":
        loss_keys: tuple[str, ...] = ("scale",)
    elif spec.loss == "la":
        loss_keys = ("scale", "la_tau")
    else:
        loss_keys = _AGCL_PHASE1 + (("key_weight",) if phase == 2 else ())
    model = params.model
    recipe = spec.recipe  # the values of the keys left null (lpt.methods.Recipe)
    own_values = {"head_dropout": own(model.head_dropout, recipe, "head_dropout"), "head_init": head_init(params, spec)}
    # the model.* keys that shape the tensors the method has in this phase (lpt.tensors.recipe_keys)
    geometry: dict[str, Any] = {key: own_values[key] if key in own_values else getattr(model, key)
                                for key in recipe_keys(spec.tensors, phase)}
    bb, tf, tr = params.backbone, params.transforms, params.train
    return {
        "seed": params.seed,
        "method": tr.method,
        "phase": phase,
        "backbone": {"name": bb.name, "weights": str(bb.weights), "timm_kwargs": dict(bb.timm_kwargs),
                     "ln_eps": bb.ln_eps},
        "transforms": {"input_size": tf.input_size, "resize": tf.resize, "train_scale_min": tf.train_scale_min,
                       "hflip": tf.hflip, "mean": None if tf.mean is None else list(tf.mean),
                       "std": None if tf.std is None else list(tf.std)},
        "model": geometry,
        "loss": {k: own(loss.scale, recipe, "scale") if k == "scale" else getattr(loss, k) for k in loss_keys},
        "optim": filled_phase(getattr(tr, f"phase{phase}"), recipe).model_dump(mode="json"),
        "amp": tr.amp,
        "compile": tr.compile,
        "val_batch_size": params.evaluate.batch_size,
    }


def filled_phase(cfg: PhaseConfig, recipe: Recipe) -> PhaseConfig:
    """The ``train.phaseN`` section with its null recipe keys (weight decay, warm-up) set to the method's own."""
    return cfg.model_copy(update={key: own(getattr(cfg, key), recipe, key) for key in ("weight_decay", "warmup_epochs")})


def fingerprint(recipe: dict[str, Any], inputs: dict[str, Any]) -> str:
    """Short hash of the recipe plus the input hashes (manifest, backbone, phase-1 weights, world size)."""
    return sha256_json({"format": RESUME_FORMAT, "recipe": recipe, "inputs": inputs}, compact=False, length=20)


def scratch_dir(train_out_dir: str | Path, phase: int, key: str) -> Path:
    """``<train.out_dir>/.scratch/phase{N}-{key}``: this run's resume state and live logs."""
    return Path(train_out_dir) / ".scratch" / f"phase{phase}-{key}"


# ============================================================================================ RNG
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA RNG states as JSON values (ints, lists of ints, base64 bytes)."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _b64(torch.get_rng_state().numpy().tobytes()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s.numpy().tobytes()) for s in torch.cuda.get_rng_state_all()]
    return state


def _bytes_tensor(text: Any, where: str) -> torch.Tensor:
    if not isinstance(text, str):
        raise ResumeStateError(f"{where}: expected base64 text")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise ResumeStateError(f"{where}: not valid base64") from None
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _int_list(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ResumeStateError(f"{where}: expected a list of integers")
    return value


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; every value is type-checked first.

    Raises:
        ResumeStateError: a field has the wrong shape or type.
    """
    try:
        py_version, py_state, py_gauss = state["python"]
        name, keys, pos, has_gauss, cached = state["numpy"]
        torch_state = _bytes_tensor(state["torch"], "rng.torch")
        cuda = [_bytes_tensor(s, "rng.cuda") for s in state.get("cuda", [])]
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, ResumeStateError):
            raise
        raise ResumeStateError(f"rng state malformed ({err})") from None
    if not (isinstance(py_version, int) and (py_gauss is None or isinstance(py_gauss, float))):
        raise ResumeStateError("rng.python: expected [version, [ints], gauss]")
    if not (name == "MT19937" and isinstance(pos, int) and isinstance(has_gauss, int) and isinstance(cached, float)):
        raise ResumeStateError("rng.numpy: expected ['MT19937', [ints], pos, has_gauss, cached]")
    random.setstate((py_version, tuple(_int_list(py_state, "rng.python")), py_gauss))
    np.random.set_state((name, np.asarray(_int_list(keys, "rng.numpy"), dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch_state)
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# ============================================================================================ optimizer
def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into safetensors-able tensors and a JSON-able rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                        meta: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_to_flat`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ============================================================================================ tensor keys
RESUME_PARTS = ("model", "best", "optim")
"""What a resume state's tensors hold, each under its own key prefix: the model's trained tensors, the best
epoch's copy of them, the optimizer's (:func:`optimizer_to_flat` names those ``optim.<index>.<key>``)."""


def join_resume_tensors(model: dict[str, torch.Tensor], best: dict[str, torch.Tensor],
                        optim: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One flat dict for ``state.safetensors``: ``model.<name>``, ``best.<name>`` and the optimizer's own keys."""
    return {**{f"model.{k}": v for k, v in model.items()}, **{f"best.{k}": v for k, v in best.items()}, **optim}


def split_resume_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Inverse of :func:`join_resume_tensors`: ``({"model": ..., "best": ..., "optim": ...}, stray keys)``.

    ``model`` and ``best`` come back under the model's tensor names; ``optim`` keeps its ``optim.`` keys (what
    :func:`optimizer_from_flat` reads). A key of no part is returned as stray.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {part: {} for part in RESUME_PARTS}
    stray = []
    for key, value in tensors.items():
        part, dot, name = key.partition(".")
        if not dot or part not in parts:
            stray.append(key)
        else:
            parts[part][key if part == "optim" else name] = value
    return parts, sorted(stray)


# ============================================================================================ fit
def check_structure(reference: Any, candidate: Any, where: str) -> None:
    """``candidate`` (read from a resume state) must have the shape of ``reference`` (this run's own fresh
    value): the same keys, list lengths and value kinds, every number finite.

    A well-formed but crafted state (right keys, a string where a step count belongs, a list of another
    length) is caught here, before anything is applied, instead of failing later inside torch on every
    rerun. ``None`` in the reference takes ``None`` or a bool (torch's optional flags: ``foreach``).

    Raises:
        ResumeStateError: naming the first field that differs (``where`` is its path).
    """
    def fail(expected: str) -> None:
        raise ResumeStateError(f"{where}: expected {expected}, got {type(candidate).__name__} {str(candidate)[:40]!r}")

    if isinstance(reference, dict):
        if not isinstance(candidate, dict) or set(map(str, candidate)) != set(map(str, reference)):
            fail(f"an object with keys {sorted(map(str, reference))}")
        by_name = {str(k): v for k, v in candidate.items()}
        for key, value in reference.items():
            check_structure(value, by_name[str(key)], f"{where}.{key}")
    elif isinstance(reference, (list, tuple)):
        if not isinstance(candidate, (list, tuple)) or len(candidate) != len(reference):
            fail(f"a list of {len(reference)}")
        for i, (ref, cand) in enumerate(zip(reference, candidate)):
            check_structure(ref, cand, f"{where}[{i}]")
    elif reference is None:
        if candidate is not None and not isinstance(candidate, bool):
            fail("null or a bool")
    elif isinstance(reference, bool):
        if not isinstance(candidate, bool):
            fail("a bool")
    elif isinstance(reference, int):
        if not _is_int(candidate):
            fail("an integer")
    elif isinstance(reference, float):
        if not (isinstance(candidate, (int, float)) and not isinstance(candidate, bool) and np.isfinite(candidate)):
            fail("a finite number")
    elif isinstance(reference, str):
        if not isinstance(candidate, str):
            fail("a string")
    elif isinstance(reference, torch.Tensor):
        check_tensors({where: reference}, {where: candidate}, where.rsplit(".", 1)[0] if "." in where else where)
    else:  # pragma: no cover - no other kind occurs in an optimizer/scheduler state
        fail(type(reference).__name__)


def check_tensors(reference: dict[str, torch.Tensor], candidate: dict[str, Any], where: str) -> None:
    """Each tensor of ``candidate`` must have the dtype and shape of the same-named ``reference`` tensor.

    Raises:
        ResumeStateError: a tensor that is not one of ``reference`` or differs from it (named).
    """
    for name, value in candidate.items():
        ref = reference.get(name)
        if ref is None:
            raise ResumeStateError(f"{where}: tensor {name!r} is not one of this run's ({sorted(reference)[:6]})")
        if not isinstance(value, torch.Tensor) or value.dtype != ref.dtype or tuple(value.shape) != tuple(ref.shape):
            got = f"{value.dtype} {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ResumeStateError(f"{where}: tensor {name!r} is {got}, this run's is {ref.dtype} {list(ref.shape)}")


# ============================================================================================ files
@dataclass
class ResumeState:
    """One resumable snapshot: tensors (safetensors) and plain values (JSON)."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def save_resume_state(last_dir: Path, state: ResumeState) -> None:
    """Write ``last/state.safetensors`` + ``last/state.json`` as one atomic folder swap."""
    with atomic_dir(last_dir, "resume state", own=(STATE_TENSORS, STATE_JSON)) as tmp:
        save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.tensors.items()}, tmp / STATE_TENSORS)
        (tmp / STATE_JSON).write_text(json.dumps(state.meta, indent=1, allow_nan=False))


_META_TYPES: dict[str, type] = {"format": int, "fingerprint": str, "progress": dict, "optimizer": dict,
                                "scheduler": dict, "ranks": list}
_PROGRESS_TYPES: dict[str, type | tuple[type, ...]] = {
    "epoch": int, "step_in_epoch": int, "global_step": int, "loss_sum": (int, float), "best_val_acc": (int, float),
    "best_epoch": int, "history": list, "curve": list, "window_loss": (int, float), "window_steps": int}


_SAMPLER_KEYS = frozenset({"kind", "epoch", "offset", "seed", "rank", "world_size", "num_samples"})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_meta(meta: Any, path: Path) -> dict[str, Any]:
    """The JSON half's shape, field by field (values are only ever used as numbers and lists)."""
    if not isinstance(meta, dict):
        raise ResumeStateError(f"{path}: expected a JSON object")
    for key, kind in _META_TYPES.items():
        if not isinstance(meta.get(key), kind):
            raise ResumeStateError(f"{path}: field {key!r} missing or not a {kind.__name__}")
    for key, kind in _PROGRESS_TYPES.items():
        if not isinstance(meta["progress"].get(key), kind):
            raise ResumeStateError(f"{path}: progress.{key} missing or of the wrong type")
    for i, rank in enumerate(meta["ranks"]):
        if not (isinstance(rank, dict) and isinstance(rank.get("rng"), dict) and isinstance(rank.get("samplers"), dict)):
            raise ResumeStateError(f"{path}: ranks[{i}] must hold 'rng' and 'samplers' objects")
        for name, sampler in rank["samplers"].items():
            if not (isinstance(sampler, dict) and set(sampler) == _SAMPLER_KEYS and isinstance(sampler["kind"], str)
                    and all(_is_int(sampler[k]) for k in _SAMPLER_KEYS - {"kind"})):
                raise ResumeStateError(f"{path}: ranks[{i}].samplers.{name} must hold exactly "
                                       f"{', '.join(sorted(_SAMPLER_KEYS))} (a string kind, integers otherwise)")
    return meta


def load_resume_state(scratch: Path) -> ResumeState | None:
    """Read ``scratch/last`` (or the ``.last.old`` a kill between the two renames of a swap leaves).

    Returns:
        The state, or None when there is none or it is damaged (the reason is printed: a damaged state
        means training starts from the beginning, never that it cannot start).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for candidate in (scratch / "last", scratch / ".last.old"):
        tensors_path, json_path = candidate / STATE_TENSORS, candidate / STATE_JSON
        if not (tensors_path.is_file() and json_path.is_file()):
            continue
        try:
            try:
                meta = json.loads(json_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ResumeStateError(f"{json_path}: not valid JSON ({err})") from None
            meta = _check_meta(meta, json_path)
            try:
                tensors = load_file(str(tensors_path))
            except (SafetensorError, OSError, ValueError) as err:
                raise ResumeStateError(f"{tensors_path}: not a readable safetensors file ({err})") from None
            return ResumeState(tensors, meta)
        except (ResumeStateError, OSError) as err:
            print(f"[train] ignoring damaged resume state: {err}; training from the start", flush=True)
    return None
