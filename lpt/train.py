"""Training: backbone pretraining (embedded default) and the two LPT phases.

``run_phase(params, phase)`` trains one phase of the method named by ``train.method``:

============  ==========================================  ===================================
method        phase 1                                     phase 2
============  ==========================================  ===================================
lpt           shared prompt + head, A-GCL, dual sampling  pool + keys + head, A-GCL, dual
lpt_phase1    shared prompt + head, A-GCL, dual sampling  copies the phase-1 model (final)
vpt_deep      shared prompt + head, plain CE, IB only     copies the phase-1 model (final)
linear_probe  head only, plain CE, IB only                copies the phase-1 model (final)
============  ==========================================  ===================================

Dual sampling (LPT spec): each optimizer step sees a class-balanced (CB) batch from the class-aware
sampler and an instance-balanced (IB) batch of the same size;
``loss = AGCL_cb - kw*sim_cb + w(e) * (AGCL_ib - kw*sim_ib)``, ``w(e) = max(0, ib_weight*(E-e)/E)``.

``train.phaseN.batch_size`` is the *global* batch of one optimizer step (the recipe's 256). It is split
over ``world_size`` DDP ranks and ``grad_accum`` micro-batches, so results do not depend on the hardware
split. ``lr = phaseN.lr * batch_size / 256``; cosine schedule per step with a linear warm-up from
``warmup_lr``; ``floor(N / B) + 1`` steps per epoch.

Determinism and resume: every augmentation is seeded from ``(seed, phase, epoch, step, stream, rank,
position)``, samplers are restored from their state at the start of the epoch, RNG states (python,
numpy, torch, CUDA) are saved with the step. A run resumed from ``last/`` therefore follows exactly the
same trajectory as an uninterrupted run (on the same hardware / thread count).

Outputs in ``train.out_dir/phase{1,2}/``: ``model.safetensors`` + ``model.json`` (best validation
epoch), ``last/`` (resumable state, rewritten atomically every ``train.checkpoint_every`` steps and at
every epoch end), ``live/`` (dvclive metrics: ``train/loss``, ``train/lr``, ``val/acc`` per epoch).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import math
import os
import pickle
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lpt.config import Params, PhaseConfig
from lpt.losses import agcl_loss, ib_stream_weight, scaled_ce_loss  # w(e) = max(0, ib_weight * (E - e) / E), re-exported
from lpt.utils import atomic_dir, resolve_device, seed_everything, sha256_file, write_json_atomic

__all__ = [
    "TrainError",
    "PhasePlan",
    "phase_plan",
    "steps_per_epoch",
    "ib_stream_weight",
    "scaled_lr",
    "warmup_cosine_lr",
    "build_optimizer",
    "build_scheduler",
    "capture_rng_state",
    "restore_rng_state",
    "run_phase",
    "pretrain_backbone",
]

RESUME_FORMAT = 1
"""Version of the ``last/`` layout; a different version is never resumed."""

StepHook = Callable[[int], None]


class TrainError(RuntimeError):
    """Training cannot start or continue; the message says what is missing and how to fix it."""


# ============================================================================================ formulas
def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Optimizer steps per epoch, ``floor(N / B) + 1`` as in the authors' recipe."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"need num_samples >= 1 and batch_size >= 1, got {num_samples}, {batch_size}")
    return num_samples // batch_size + 1


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """Linear scaling rule: ``base_lr`` is quoted for batch 256."""
    return base_lr * batch_size / 256.0


def warmup_cosine_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float, warmup_lr: float,
                     min_lr: float = 0.0) -> float:
    """Learning rate used for optimizer step ``step`` (0-based).

    Linear warm-up from ``warmup_lr`` to ``peak_lr`` over ``warmup_steps`` steps, then a half cosine
    from ``peak_lr`` down to ``min_lr`` at ``total_steps``.
    """
    if step < warmup_steps:
        return warmup_lr + (peak_lr - warmup_lr) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: PhaseConfig) -> torch.optim.SGD:
    """SGD with momentum over the parameters that require grad only.

    Raises:
        TrainError: the model has nothing to train.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise TrainError("the model has no trainable parameters (check train.method and the phase)")
    return torch.optim.SGD(trainable, lr=scaled_lr(cfg.lr, cfg.batch_size), momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    warmup_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step warm-up + cosine schedule (:func:`warmup_cosine_lr`) relative to the optimizer's lr."""
    peak = optimizer.param_groups[0]["lr"]

    def factor(step: int) -> float:
        return warmup_cosine_lr(step, total_steps, warmup_steps, peak, warmup_lr) / peak

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ============================================================================================ methods
@dataclass(frozen=True)
class PhasePlan:
    """What one phase of one method does.

    Attributes:
        method: ``train.method``.
        phase: 1 or 2.
        trains: False when the phase only copies the phase-1 model as the final one.
        dual_sampling: CB + IB streams (LPT) instead of the IB stream alone.
        loss: ``agcl`` (A-GCL + key matching) or ``ce`` (plain cross-entropy on scaled cosine logits).
    """

    method: str
    phase: int
    trains: bool
    dual_sampling: bool
    loss: Literal["agcl", "ce"]


def phase_plan(method: str, phase: int) -> PhasePlan:
    """The :class:`PhasePlan` of ``method`` in ``phase``.

    Raises:
        TrainError: unknown method or phase.
    """
    if phase not in (1, 2):
        raise TrainError(f"phase must be 1 or 2, got {phase}")
    if method == "lpt":
        return PhasePlan(method, phase, True, True, "agcl")
    if method == "lpt_phase1":
        return PhasePlan(method, phase, phase == 1, True, "agcl")
    if method in ("vpt_deep", "linear_probe"):
        return PhasePlan(method, phase, phase == 1, False, "ce")
    raise TrainError(f"train.method {method!r} is not one of lpt, lpt_phase1, vpt_deep, linear_probe")


# ============================================================================================ distributed
@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun launch (``world_size`` 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_from_env() -> DistInfo:
    """Read ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` as set by torchrun."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def _init_distributed(dist_info: DistInfo, device: str) -> str:
    """Join the process group (nccl on GPU, gloo on CPU); returns this rank's device."""
    import torch.distributed as tdist

    if not dist_info.enabled:
        return device
    if device.startswith("cuda"):
        torch.cuda.set_device(dist_info.local_rank)
        device = f"cuda:{dist_info.local_rank}"
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def _barrier(dist_info: DistInfo) -> None:
    if dist_info.enabled:
        import torch.distributed as tdist

        tdist.barrier()


def _all_gather(dist_info: DistInfo, obj: Any) -> list[Any]:
    if not dist_info.enabled:
        return [obj]
    import torch.distributed as tdist

    out: list[Any] = [None] * dist_info.world_size
    tdist.all_gather_object(out, obj)
    return out


def _relaunch_with_torchrun(params: Params, phase: int) -> dict[str, Any]:
    """Run this phase under ``torch.distributed.run`` with ``train.nproc`` processes and wait for it."""
    nproc = params.train.nproc
    with tempfile.TemporaryDirectory(prefix="lpt-torchrun-") as tmp:
        import yaml

        params_file = Path(tmp) / "params.yaml"
        params_file.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "lpt", "train", "--phase", str(phase), "--params", str(params_file)]
        print(f"[train] launching {nproc} processes: {' '.join(cmd)}", flush=True)
        result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise TrainError(f"torchrun with {nproc} processes failed (exit code {result.returncode}); see the log above")
    phase_dir = Path(params.train.out_dir) / f"phase{phase}"
    meta = json.loads((phase_dir / "model.json").read_text())
    return {"checkpoint": str(phase_dir / "model.safetensors"), "best_val_acc": meta.get("best_val_acc"),
            "phase_dir": str(phase_dir)}


# ============================================================================================ RNG state
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA RNG states as a JSON-friendly dict."""
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


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]])


def _encode_object(obj: Any) -> Any:
    """Sampler states as JSON when they are JSON, else a tagged base64 pickle (our own files only)."""
    try:
        json.dumps(obj)
        return {"json": obj}
    except TypeError:
        return {"pickle": _b64(pickle.dumps(obj))}


def _decode_object(enc: dict[str, Any]) -> Any:
    if "json" in enc:
        return enc["json"]
    return pickle.loads(base64.b64decode(enc["pickle"]))  # noqa: S301 - written by this module


# ============================================================================================ resume state
def _optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into safetensors-able tensors and JSON-able rest."""
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


def _optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_resume_state(last_dir: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``last/state.safetensors`` + ``last/state.json`` as one atomic folder swap."""
    from safetensors.torch import save_file

    with atomic_dir(last_dir) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))


def load_resume_state(phase_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Read ``phase_dir/last`` (or the ``.last.old`` left by a kill between the two renames); None if absent."""
    from safetensors.torch import load_file

    for candidate in (phase_dir / "last", phase_dir / ".last.old"):
        if (candidate / "state.json").is_file() and (candidate / "state.safetensors").is_file():
            try:
                meta = json.loads((candidate / "state.json").read_text())
                return load_file(str(candidate / "state.safetensors")), meta
            except (OSError, ValueError) as err:
                print(f"[train] ignoring unreadable resume state {candidate}: {err}", flush=True)
    return None


# ============================================================================================ data
@dataclass
class PhaseData:
    """Train and validation images of the target task, with their transforms and class counts."""

    train: Any
    val: Any
    train_transform: Callable[[Any], torch.Tensor]
    val_transform: Callable[[Any], torch.Tensor]
    class_counts: list[int]
    num_classes: int
    manifest_sha: str


def load_phase_data(params: Params) -> PhaseData:
    """Open the train/val splits of ``data.out_dir``.

    Raises:
        TrainError: shards/manifest missing or no validation split.
    """
    from lpt.data.reader import ShardImages, build_transform, load_manifest

    manifest_path = Path(params.data.out_dir) / "manifest.json"
    if not manifest_path.is_file():
        raise TrainError(f"no data manifest at {manifest_path}: run `lpt ingest` (dvc stage ingest) first")
    manifest = load_manifest(manifest_path)
    splits = manifest.get("splits", {})
    if not splits.get("val", {}).get("count"):
        raise TrainError(f"{manifest_path}: no validation split; model selection needs one (never the test split)")
    shards = Path(params.data.out_dir)
    train = ShardImages(shards, "train", in_memory=params.train.in_memory)
    val = ShardImages(shards, "val", in_memory=params.train.in_memory)
    return PhaseData(train=train, val=val, train_transform=build_transform(params.transforms, train=True),
                     val_transform=build_transform(params.transforms, train=False),
                     class_counts=[int(c) for c in manifest["train_counts"]],
                     num_classes=int(manifest["num_classes"]), manifest_sha=sha256_file(manifest_path))


def _sample_seeds(*key: int, count: int) -> np.ndarray:
    """``count`` augmentation seeds that depend only on ``key`` (seed, phase, epoch, step, stream, rank)."""
    return np.random.SeedSequence([int(k) for k in key]).generate_state(count)


def _load_batch(images: Any, transform: Callable[[Any], torch.Tensor], indices: list[int],
                seeds: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode + augment ``indices``, each image under its own seed; the global RNG is left untouched."""
    xs, ys = [], []
    with torch.random.fork_rng(devices=[]):
        for idx, seed in zip(indices, seeds):
            torch.manual_seed(int(seed))
            image, label = images[int(idx)]
            xs.append(transform(image))
            ys.append(int(label))
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


class _EpochBatches(torch.utils.data.Dataset):
    """Item ``i`` = the batches of step ``i`` of one epoch, one ``(x, y)`` per stream.

    Indexing by step (not by sample) keeps every batch a pure function of the epoch's index lists and
    the step number, so DataLoader workers, resumes and re-runs all see the same pixels.
    """

    def __init__(self, images: Any, transform: Callable[[Any], torch.Tensor],
                 streams: dict[str, list[int]], batch: int, key: tuple[int, ...]) -> None:
        self.images, self.transform, self.streams, self.batch, self.key = images, transform, streams, batch, key

    def __len__(self) -> int:
        return min(len(v) for v in self.streams.values()) // self.batch

    def __getitem__(self, step: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for stream_id, (name, indices) in enumerate(sorted(self.streams.items())):
            chunk = indices[step * self.batch:(step + 1) * self.batch]
            seeds = _sample_seeds(*self.key, step, stream_id, count=len(chunk))
            out[name] = _load_batch(self.images, self.transform, chunk, seeds)
        return out


# ============================================================================================ the phase run
@dataclass
class _Progress:
    """Everything that changes during training and must survive a resume (besides tensors)."""

    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    global_step: int = 0
    loss_sum: float = 0.0  # sum of step losses in the current epoch
    best_val_acc: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, float]] = field(default_factory=list)
    sampler_states: dict[str, Any] = field(default_factory=dict)  # states before set_epoch(epoch)


def _autocast(device: str, amp: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on GPU for ``amp=auto``; nothing on CPU unless asked for."""
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if amp == "off" or (amp == "auto" and device_type == "cpu"):
        return contextlib.nullcontext()
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device_type, dtype=dtype)


class _PhaseRun:
    """One phase of one method: setup, resume, epochs of steps, validation, checkpoints, final model."""

    def __init__(self, params: Params, phase: int, plan: PhasePlan, on_step: StepHook | None) -> None:
        self.params, self.phase, self.plan, self.on_step = params, phase, plan, on_step
        self.cfg: PhaseConfig = getattr(params.train, f"phase{phase}")
        self.phase_dir = Path(params.train.out_dir) / f"phase{phase}"
        self.dist = dist_from_env()
        self.progress = _Progress()

    # ------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        tcfg = self.params.train
        if tcfg.threads > 0:
            torch.set_num_threads(tcfg.threads)
        self.device = _init_distributed(self.dist, resolve_device(tcfg.device))
        world, accum, batch = self.dist.world_size, self.cfg.grad_accum, self.cfg.batch_size
        if batch % (world * accum):
            raise TrainError(f"train.phase{self.phase}.batch_size ({batch}) must be divisible by "
                             f"world_size x grad_accum ({world} x {accum})")
        self.rank_batch = batch // world
        self.micro_batch = self.rank_batch // accum

        self.data = load_phase_data(self.params)
        self.steps_per_epoch = steps_per_epoch(len(self.data.train), batch)
        self.total_steps = self.steps_per_epoch * self.cfg.epochs
        self.warmup_steps = round(self.cfg.warmup_epochs * self.steps_per_epoch)

        self.model = self._build_model()
        self.model.to(self.device)
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, self.warmup_steps, self.cfg.warmup_lr)
        self.scaler = torch.amp.GradScaler("cuda") if tcfg.amp == "fp16" and self.device.startswith("cuda") else None
        self.forward_model = self._wrap_model()
        self.samplers = self._build_samplers()
        self.fingerprint = self._fingerprint()

    def _build_model(self) -> nn.Module:
        from lpt.model.lpt import create_lpt_model

        seed_everything(self.params.seed)
        model = create_lpt_model(self.params, self.data.num_classes)
        if self.phase == 2:
            self._load_phase1_into(model)
            model.set_phase(2)
        return model

    def _phase1_dir(self) -> Path:
        return Path(self.params.train.out_dir) / "phase1"

    def _load_phase1_into(self, model: nn.Module) -> None:
        from safetensors.torch import load_file

        ckpt = self._phase1_dir() / "model.safetensors"
        meta_path = self._phase1_dir() / "model.json"
        if not ckpt.is_file() or not meta_path.is_file():
            raise TrainError(f"phase 2 needs the phase-1 checkpoint {ckpt} (+ model.json): run "
                             "`lpt train --phase 1` (dvc stage phase1) first")
        meta = json.loads(meta_path.read_text())
        if meta.get("method") != self.plan.method or int(meta.get("num_classes", -1)) != self.data.num_classes:
            raise TrainError(f"{meta_path} was trained with method {meta.get('method')!r} on "
                             f"{meta.get('num_classes')} classes; phase 2 expects {self.plan.method!r} on "
                             f"{self.data.num_classes}: re-run phase 1")
        model.load_trainable_state_dict(load_file(str(ckpt)))

    def _wrap_model(self) -> nn.Module:
        model: nn.Module = self.model
        if self.params.train.compile:
            model = torch.compile(model)
        if self.dist.enabled and any(p.requires_grad for p in self.model.parameters()):
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.dist.local_rank] if self.device.startswith("cuda") else None
            # Top-k selection leaves unselected pool prompts without gradient in a step.
            model = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=self.phase == 2)
        return model

    def _build_samplers(self) -> dict[str, Any]:
        from lpt.data.sampling import ClassAwareSampler, InstanceBalancedSampler

        per_epoch = self.steps_per_epoch * self.rank_batch  # indices this rank draws per epoch and stream
        seed = self.params.seed * 1000 + self.phase
        rank, world = self.dist.rank, self.dist.world_size
        labels = np.asarray(self.data.train.labels)
        samplers: dict[str, Any] = {
            "ib": InstanceBalancedSampler(len(labels), num_samples=per_epoch * world, seed=seed + 1,
                                          rank=rank, world_size=world)}
        if self.plan.dual_sampling:
            samplers["cb"] = ClassAwareSampler(labels, samples_per_class=self.cfg.samples_per_class,
                                               num_samples=per_epoch * world, seed=seed + 2, rank=rank,
                                               world_size=world)
        return samplers

    def _fingerprint(self) -> str:
        """Hash of everything that determines the trajectory; a resume needs an equal fingerprint."""
        p = self.params.to_dict()
        ignored = ("threads", "num_workers", "checkpoint_every", "out_dir", "nproc", "device", "in_memory",
                   f"phase{3 - self.phase}")
        train = {k: v for k, v in p["train"].items() if k not in ignored}
        basis = {"format": RESUME_FORMAT, "phase": self.phase, "seed": p["seed"], "backbone": p["backbone"],
                 "backbone_weights": self.model.backbone_fingerprint(), "transforms": p["transforms"],
                 "model": p["model"], "loss": p["loss"], "train": train, "world_size": self.dist.world_size,
                 "data": self.data.manifest_sha}
        if self.phase == 2:
            basis["phase1"] = sha256_file(self._phase1_dir() / "model.safetensors")
        return hashlib.sha256(json.dumps(basis, sort_keys=True, default=str).encode()).hexdigest()[:20]

    # ------------------------------------------------------------------------------------ resume
    def try_resume(self) -> bool:
        """Load ``last/`` when it exists and matches this config; otherwise clear stale outputs."""
        state = load_resume_state(self.phase_dir)
        if state is not None:
            tensors, meta = state
            finished = meta.get("progress", {}).get("epoch", 0) >= self.cfg.epochs
            if meta.get("fingerprint") == self.fingerprint and not finished:
                self._restore(tensors, meta)
                return True
            if self.dist.is_main:
                why = "belongs to a finished run" if finished else "was written with another config"
                print(f"[train] {self.phase_dir}/last {why}; starting fresh", flush=True)
        _barrier(self.dist)
        if self.dist.is_main:
            for stale in ("last", ".last.old", "live", "model.safetensors", "model.json"):
                target = self.phase_dir / stale
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        _barrier(self.dist)
        return False

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.model.load_trainable_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        _optimizer_from_flat(self.optimizer, tensors, meta["optimizer"])
        self.scheduler.load_state_dict(meta["scheduler"])
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        rank_state = meta["ranks"][self.dist.rank]
        prog = meta["progress"]
        self.progress = _Progress(**{**prog, "sampler_states": {k: _decode_object(v) for k, v in
                                                                rank_state["samplers"].items()}})
        restore_rng_state(rank_state["rng"])
        if self.dist.is_main:
            print(f"[train] resumed phase {self.phase} from {self.phase_dir / 'last'} at step "
                  f"{self.progress.global_step} (epoch {self.progress.epoch}, step {self.progress.step_in_epoch})",
                  flush=True)

    def save_checkpoint(self) -> None:
        """Atomically rewrite ``last/`` (rank 0 writes; every rank contributes its sampler + RNG state)."""
        rank_state = {"samplers": {k: _encode_object(v) for k, v in self.progress.sampler_states.items()},
                      "rng": capture_rng_state()}
        ranks = _all_gather(self.dist, rank_state)
        if self.dist.is_main:
            tensors = {f"model.{k}": v for k, v in self.model.trainable_state_dict().items()}
            tensors.update({f"best.{k}": v for k, v in self.best_state.items()})
            optim_tensors, optim_meta = _optimizer_to_flat(self.optimizer)
            tensors.update(optim_tensors)
            prog = {k: v for k, v in vars(self.progress).items() if k != "sampler_states"}
            meta = {"format": RESUME_FORMAT, "fingerprint": self.fingerprint, "method": self.plan.method,
                    "phase": self.phase, "progress": prog, "optimizer": optim_meta,
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                    "ranks": ranks, "config": self.params.to_dict()}
            save_resume_state(self.phase_dir / "last", tensors, meta)
        _barrier(self.dist)

    # ------------------------------------------------------------------------------------ training
    def _epoch_indices(self, epoch: int) -> dict[str, list[int]]:
        """This rank's index list per stream for ``epoch``.

        ``progress.sampler_states`` holds each sampler's state *before* ``set_epoch(epoch)``: saved at
        the epoch start on a fresh run, restored on a resume, so both draw the same indices.
        """
        streams = {}
        need = self.steps_per_epoch * self.rank_batch
        for name, sampler in self.samplers.items():
            if name in self.progress.sampler_states:
                sampler.load_state_dict(self.progress.sampler_states[name])
            else:
                self.progress.sampler_states[name] = sampler.state_dict()
            sampler.set_epoch(epoch)
            indices = [int(i) for i in itertools.islice(iter(sampler), need)]
            if len(indices) < need:
                raise TrainError(f"sampler {name!r} yielded {len(indices)} indices for epoch {epoch}, expected {need}")
            streams[name] = indices
        return streams

    def _stream_loss(self, out: Any, target: torch.Tensor, stream: str) -> torch.Tensor:
        lcfg = self.params.loss
        logits = out.logits.float()
        if self.plan.loss == "ce":
            return scaled_ce_loss(logits, target, lcfg.scale)

        gp, gn = (lcfg.gamma_pos_cb, lcfg.gamma_neg_cb) if stream == "cb" else (lcfg.gamma_pos_ib, lcfg.gamma_neg_ib)
        loss = agcl_loss(logits, target, self.class_counts_t, gp, gn, lcfg)
        return loss - lcfg.key_weight * out.sim

    def _micro_batches(self, batches: dict[str, tuple[torch.Tensor, torch.Tensor]],
                       ib_w: float) -> list[tuple[str, float, torch.Tensor, torch.Tensor]]:
        """``(stream, weight, x, y)`` per micro-batch; the IB stream is skipped when its weight is 0."""
        weights = {"cb": 1.0, "ib": ib_w} if self.plan.dual_sampling else {"ib": 1.0}
        parts = []
        for name, weight in weights.items():
            if weight <= 0 or name not in batches:
                continue
            x, y = batches[name]
            for j in range(self.cfg.grad_accum):
                sl = slice(j * self.micro_batch, (j + 1) * self.micro_batch)
                parts.append((name, weight, x[sl], y[sl]))
        return parts

    def _train_step(self, batches: dict[str, tuple[torch.Tensor, torch.Tensor]], ib_w: float) -> float:
        """One optimizer step: CB (and IB) batch in ``grad_accum`` micro-batches, one backward each.

        Each stream gets its own forward/backward (gradients accumulate); under DDP only the last
        backward synchronises (``no_sync`` for the others).
        """
        accum = self.cfg.grad_accum
        parts = self._micro_batches(batches, ib_w)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i, (name, weight, x, y) in enumerate(parts):
            last = i == len(parts) - 1
            sync = contextlib.nullcontext() if last or not self.dist.enabled else self.forward_model.no_sync()
            with sync:
                with _autocast(self.device, self.params.train.amp):
                    out = self.forward_model(x.to(self.device, non_blocking=True))
                loss = self._stream_loss(out, y.to(self.device, non_blocking=True), name) * (weight / accum)
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += float(loss.detach())
        if not math.isfinite(total):
            raise TrainError(f"loss is {total} at step {self.progress.global_step} (phase {self.phase}); "
                             f"lower train.phase{self.phase}.lr or check the data")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return total

    def _loader(self, epoch: int, streams: dict[str, list[int]], ib_w: float) -> Iterator[dict[str, Any]]:
        if self.plan.dual_sampling and ib_w <= 0:
            streams = {"cb": streams["cb"]}  # w(e) == 0: skip loading (and forwarding) the IB batch
        dataset = _EpochBatches(self.data.train, self.data.train_transform, streams, self.rank_batch,
                                (self.params.seed, self.phase, epoch, self.dist.rank))
        start = self.progress.step_in_epoch
        steps = list(range(start, self.steps_per_epoch))
        workers = self.params.train.num_workers
        # An own generator: creating the loader must not draw from the global RNG (resume equality).
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=steps, num_workers=workers,
                                             pin_memory=self.device.startswith("cuda"),
                                             generator=torch.Generator().manual_seed(epoch))
        return iter(loader)

    def train_epoch(self, epoch: int) -> None:
        from tqdm.auto import tqdm

        streams = self._epoch_indices(epoch)
        ib_w = ib_stream_weight(epoch, self.cfg.epochs, self.params.loss.ib_weight) if self.plan.dual_sampling else 1.0
        self.model.train()
        bar = tqdm(total=self.steps_per_epoch, initial=self.progress.step_in_epoch, disable=not self.dist.is_main,
                   desc=f"phase {self.phase} epoch {epoch + 1}/{self.cfg.epochs}", leave=False, mininterval=2.0)
        for batches in self._loader(epoch, streams, ib_w):
            loss = self._train_step(batches, ib_w)
            prog = self.progress
            prog.loss_sum += loss
            prog.step_in_epoch += 1
            prog.global_step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}", refresh=False)
            if prog.global_step % self.params.train.checkpoint_every == 0:
                self.save_checkpoint()
            if self.on_step is not None:
                self.on_step(prog.global_step)
        bar.close()

    # ------------------------------------------------------------------------------------ validation
    @torch.no_grad()
    def val_accuracy(self) -> float:
        """Top-1 accuracy on the validation split (split over ranks, summed)."""
        from lpt.data.reader import TransformedDataset

        self.model.eval()
        indices = list(range(self.dist.rank, len(self.data.val), self.dist.world_size))
        dataset = torch.utils.data.Subset(TransformedDataset(self.data.val, self.data.val_transform), indices)
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.params.evaluate.batch_size, shuffle=False,
                                             num_workers=self.params.train.num_workers,
                                             generator=torch.Generator().manual_seed(0))
        counts = torch.zeros(2, dtype=torch.float64)
        for x, y in loader:
            with _autocast(self.device, self.params.train.amp):
                logits = self.model(x.to(self.device)).logits
            counts[0] += (logits.argmax(dim=1).cpu() == y).sum().item()
            counts[1] += len(y)
        if self.dist.enabled:
            import torch.distributed as tdist

            counts = counts.to(self.device)
            tdist.all_reduce(counts)
            counts = counts.cpu()
        return float(counts[0] / counts[1].clamp_min(1))

    def end_epoch(self, epoch: int, live: Any) -> None:
        acc = self.val_accuracy()
        prog = self.progress
        row = {"epoch": epoch + 1, "step": prog.global_step, "loss": prog.loss_sum / max(1, self.steps_per_epoch),
               "lr": float(self.scheduler.get_last_lr()[0]), "val_acc": acc}
        prog.history.append(row)
        if acc > prog.best_val_acc:
            prog.best_val_acc, prog.best_epoch = acc, epoch + 1
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.trainable_state_dict().items()}
        if self.dist.is_main:
            _log_live(live, row)
            print(f"[train] phase {self.phase} epoch {epoch + 1}/{self.cfg.epochs}: loss {row['loss']:.4f}  "
                  f"lr {row['lr']:.2e}  val acc {acc:.4f}  (best {prog.best_val_acc:.4f} @ epoch {prog.best_epoch})",
                  flush=True)
        prog.epoch, prog.step_in_epoch, prog.loss_sum = epoch + 1, 0, 0.0
        prog.sampler_states = {name: sampler.state_dict() for name, sampler in self.samplers.items()}
        self.save_checkpoint()

    # ------------------------------------------------------------------------------------ driver
    def run(self) -> dict[str, Any]:
        self.setup()
        self.best_state: dict[str, torch.Tensor] = {}
        resumed = self.try_resume()
        self.class_counts_t = torch.tensor(self.data.class_counts, dtype=torch.float32, device=self.device)
        if self.dist.is_main:
            self._print_start(resumed)
        live = _open_live(self.phase_dir / "live", self.progress.history) if self.dist.is_main else None
        t0 = time.time()
        try:
            for epoch in range(self.progress.epoch, self.cfg.epochs):
                self.train_epoch(epoch)
                self.end_epoch(epoch, live)
        finally:
            if live is not None:
                live.end()
        result = self._finalize(time.time() - t0)
        if self.dist.enabled:
            import torch.distributed as tdist

            tdist.destroy_process_group()
        return result

    def _print_start(self, resumed: bool) -> None:
        from lpt.model.lpt import format_parameter_report

        report = self.model.parameter_report()
        streams = "class-aware (CB) + instance-balanced (IB)" if self.plan.dual_sampling else "instance-balanced"
        print(f"[train] method {self.plan.method}, phase {self.phase}: {len(self.data.train)} train / "
              f"{len(self.data.val)} val images, {self.data.num_classes} classes; {self.cfg.epochs} epochs x "
              f"{self.steps_per_epoch} steps, global batch {self.cfg.batch_size} ({streams}), "
              f"world size {self.dist.world_size}, grad accum {self.cfg.grad_accum}, device {self.device}, "
              f"amp {self.params.train.amp}, lr {scaled_lr(self.cfg.lr, self.cfg.batch_size):.4g}"
              f"{' (resumed)' if resumed else ''}", flush=True)
        print(format_parameter_report(report), flush=True)

    def _finalize(self, seconds: float) -> dict[str, Any]:
        """Load the best-validation tensors and write ``model.safetensors`` + ``model.json`` (rank 0)."""
        from lpt.model.lpt import save_trained_model

        if self.best_state:
            self.model.load_trainable_state_dict(self.best_state)
        prog = self.progress
        checkpoint = self.phase_dir / "model.safetensors"
        if self.dist.is_main:
            meta = {"class_counts": self.data.class_counts, "params": self.params.to_dict(),
                    "best_val_acc": prog.best_val_acc, "best_epoch": prog.best_epoch, "epochs": self.cfg.epochs,
                    "steps": prog.global_step, "history": prog.history, "train_seconds": round(seconds, 1),
                    "world_size": self.dist.world_size}
            save_trained_model(self.model, self.phase_dir, meta)
            print(f"[train] phase {self.phase} done: best val acc {prog.best_val_acc:.4f} (epoch {prog.best_epoch}); "
                  f"model -> {checkpoint}, metrics -> {self.phase_dir / 'live'}, resume state -> "
                  f"{self.phase_dir / 'last'}", flush=True)
        _barrier(self.dist)
        return {"checkpoint": str(checkpoint), "best_val_acc": prog.best_val_acc, "phase_dir": str(self.phase_dir)}


def _open_live(live_dir: Path, history: list[dict[str, float]]) -> Any:
    """A fresh dvclive folder with the epochs already done replayed (so a resume leaves no duplicates).

    dvclive is used as a file logger only: ``dvc.yaml`` declares the plots itself, so the logger must
    neither edit ``dvc.yaml`` nor save experiments, and its DVC/Git probing is skipped (it raises in a
    Git repo without commits, e.g. a fresh ``git init``).
    """
    from dvclive import Live

    class _FileOnlyLive(Live):
        def _init_dvc(self) -> None:  # no DVC repo / Git lookups: plain files under ``dir``
            return None

    live = _FileOnlyLive(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)
    for row in history:
        _log_live(live, row)
    return live


def _log_live(live: Any, row: dict[str, float]) -> None:
    live.step = int(row["step"])
    live.log_metric("train/loss", row["loss"])
    live.log_metric("train/lr", row["lr"])
    live.log_metric("val/acc", row["val_acc"])
    live.log_metric("epoch", row["epoch"], plot=False)
    live.make_summary()


def _copy_phase1_as_final(params: Params, plan: PhasePlan) -> dict[str, Any]:
    """Phase 2 of a one-phase method: the phase-1 model becomes the final model in ``phase2/``."""
    src = Path(params.train.out_dir) / "phase1"
    dst = Path(params.train.out_dir) / "phase2"
    files = ("model.safetensors", "model.json")
    if not all((src / f).is_file() for f in files):
        raise TrainError(f"method {plan.method!r}: phase 2 copies the phase-1 model, but {src}/model.safetensors "
                         "is missing: run `lpt train --phase 1` (dvc stage phase1) first")
    meta = json.loads((src / "model.json").read_text())
    if meta.get("method") != plan.method:
        raise TrainError(f"{src}/model.json was trained with method {meta.get('method')!r}, not {plan.method!r}: "
                         "re-run phase 1")
    with atomic_dir(dst) as tmp:
        for f in files:
            shutil.copy2(src / f, tmp / f)
        if (src / "live").is_dir():
            shutil.copytree(src / "live", tmp / "live")
    print(f"[train] method {plan.method} has one phase: copied {src}/model.* -> {dst}/ (final model)", flush=True)
    return {"checkpoint": str(dst / "model.safetensors"), "best_val_acc": meta.get("best_val_acc"),
            "phase_dir": str(dst)}


def run_phase(params: Params, phase: int, *, on_step: StepHook | None = None) -> dict[str, Any]:
    """Train phase ``phase`` of ``params.train.method`` (resuming from ``last/`` when it matches).

    Args:
        params: validated params.
        phase: 1 or 2.
        on_step: test hook called with the global step after every optimizer step (and after the
            periodic checkpoint); raising from it interrupts the run like a crash would.

    Returns:
        ``{"checkpoint": path of model.safetensors, "best_val_acc": float, "phase_dir": str}``.

    Raises:
        TrainError: missing inputs (shards, phase-1 checkpoint), bad batch split, non-finite loss.
    """
    plan = phase_plan(params.train.method, phase)
    if not plan.trains:
        return _copy_phase1_as_final(params, plan)
    if params.train.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _relaunch_with_torchrun(params, phase)
    return _PhaseRun(params, phase, plan, on_step).run()


# ============================================================================================ pretrain
def _split_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class random split of indices into (train, held-out); at least one held out per class."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, int(round(fraction * len(idx)))) if len(idx) > 1 else 0
        held.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(held, dtype=np.int64))


@torch.no_grad()
def _accuracy(model: nn.Module, loader: torch.utils.data.DataLoader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(dim=1) == y).sum())
        total += len(y)
    return correct / max(1, total)


def pretrain_backbone(params: Params) -> dict[str, Any]:
    """Supervised pretraining of the whole small ViT on the synthetic ``source`` split.

    Only when ``backbone.weights == 'pretrain'``: trains backbone + a linear head (AdamW, warm-up +
    cosine, ``transforms`` augmentation) on the balanced source classes (disjoint from the target),
    keeps 10 % of each source class out to report accuracy, and writes the backbone without its head
    to ``pretrain.out_dir/backbone.safetensors`` (atomic) plus ``pretrain.out_dir/pretrain.json``. Otherwise writes
    only ``pretrain.json`` saying no pretraining was needed (so the DVC stage output exists).

    Returns:
        ``{"path": backbone file or the marker json, "holdout_acc": float | None, ...}``.

    Raises:
        TrainError: no source split in the shards.
    """
    pcfg, bcfg = params.pretrain, params.backbone
    report_path = Path(pcfg.out_dir) / "pretrain.json"
    if bcfg.weights != "pretrain":
        write_json_atomic(report_path, {"pretrained": False,
                                        "reason": f"backbone.weights is {bcfg.weights!r}: no pretraining needed"})
        print(f"[pretrain] backbone.weights is {bcfg.weights!r}: nothing to pretrain; marker -> {report_path}")
        return {"path": str(report_path), "holdout_acc": None}

    from tqdm.auto import tqdm

    from lpt.data.reader import ShardImages, TransformedDataset, build_transform, load_manifest
    from lpt.model.backbone import create_backbone, pretrained_backbone_path, save_backbone

    manifest = load_manifest(Path(params.data.out_dir))
    if not manifest.get("splits", {}).get("source", {}).get("count"):
        raise TrainError(f"backbone.weights is 'pretrain' but {params.data.out_dir}/manifest.json has no 'source' split "
                         "(only the synthetic source provides one): set backbone.weights to 'hub', 'none' or a file")
    device = resolve_device("auto")  # the stage reads only seed/backbone/pretrain/transforms (dvc.yaml)
    seed_everything(params.seed)
    images = ShardImages(Path(params.data.out_dir), "source", in_memory=True)
    labels = np.asarray(images.labels)
    num_classes = int(labels.max()) + 1
    train_idx, held_idx = _split_holdout(labels, 0.1, params.seed)
    train_ds = torch.utils.data.Subset(TransformedDataset(images, build_transform(params.transforms, train=True)),
                                       train_idx.tolist())
    held_ds = torch.utils.data.Subset(TransformedDataset(images, build_transform(params.transforms, train=False)),
                                      held_idx.tolist())
    gen = torch.Generator().manual_seed(params.seed)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=pcfg.batch_size, shuffle=True, drop_last=True,
                                         generator=gen)
    held_loader = torch.utils.data.DataLoader(held_ds, batch_size=256)

    model = create_backbone(bcfg.model_copy(update={"weights": "none"}), num_classes=num_classes, frozen=False)
    model.to(device).train()
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(("pos_embed", "cls_token"))]
    decay = [p for n, p in model.named_parameters() if not (p.ndim <= 1 or n.endswith(("pos_embed", "cls_token")))]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": pcfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=pcfg.lr)
    total = len(loader) * pcfg.epochs
    scheduler = build_scheduler(optimizer, total, warmup_steps=len(loader), warmup_lr=pcfg.lr * 0.01)
    print(f"[pretrain] {bcfg.name} {dict(bcfg.timm_kwargs)}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"params, {len(train_idx)} source images / {num_classes} classes, {pcfg.epochs} epochs x {len(loader)} steps",
          flush=True)
    t0 = time.time()
    for epoch in range(pcfg.epochs):
        model.train()
        loss_sum = 0.0
        for x, y in tqdm(loader, desc=f"pretrain epoch {epoch + 1}/{pcfg.epochs}", leave=False, mininterval=2.0):
            with _autocast(device, "auto"):
                loss = F.cross_entropy(model(x.to(device)), y.to(device), label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach())
        print(f"[pretrain] epoch {epoch + 1}/{pcfg.epochs}: loss {loss_sum / max(1, len(loader)):.4f}", flush=True)
    model.cpu()
    acc = _accuracy(model, held_loader)
    path = save_backbone(model, pretrained_backbone_path(pcfg.out_dir), metadata={"source_classes": str(num_classes),
                                                              "holdout_acc": f"{acc:.4f}"})
    report = {"pretrained": True, "backbone": bcfg.name, "timm_kwargs": dict(bcfg.timm_kwargs), "path": str(path),
              "source_classes": num_classes, "train_images": int(len(train_idx)),
              "holdout_images": int(len(held_idx)), "holdout_acc": acc, "epochs": pcfg.epochs,
              "seconds": round(time.time() - t0, 1)}
    write_json_atomic(report_path, report)
    print(f"[pretrain] held-out source accuracy {acc:.4f}; backbone -> {path}; report -> {report_path}", flush=True)
    return {"path": str(path), "holdout_acc": acc, "report": str(report_path)}
