"""The phase driver: set up, resume, run the epoch loop, validate, checkpoint, publish the final model.

``run_phase(params, phase)`` trains phase ``phase`` of ``train.method`` (:mod:`lpt.methods`). Outputs in
``<train.out_dir>/phase{N}/`` are replaced as a whole when the phase is done (``model.safetensors`` +
``model.json`` of the best validation epoch, ``live/`` curves); until then the previous outputs stay as
they were. The resumable state lives in a scratch folder beside them (:mod:`lpt.train.resume`).

``train.phaseN.batch_size`` is the *global* batch of one optimizer step, split over the ranks of a torchrun
launch and ``grad_accum`` micro-batches, so results do not depend on the hardware split. Every
augmentation is seeded from ``(seed, phase, epoch, rank, step, stream, position)``, samplers restart from
their saved state and RNG states are saved with the step: a resumed run follows exactly the trajectory of
an uninterrupted one (same hardware and thread count).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lpt.config import Params, PhaseConfig
from lpt.methods import PhasePlan, get_method, own, phase_plan
from lpt.train import distributed as D
from lpt.train.batches import EpochBatches, build_samplers, epoch_indices, epoch_loader, load_phase_data
from lpt.errors import TrainError
from lpt.train.resume import (RESUME_FORMAT, ResumeState, ResumeStateError, capture_rng_state, check_structure,
                              check_tensors, filled_phase, fingerprint, head_init, join_resume_tensors,
                              load_resume_state, optimizer_from_flat, optimizer_to_flat, phase_recipe,
                              restore_rng_state, save_resume_state, scratch_dir, split_resume_tensors)
from lpt.optim import build_optimizer, build_scheduler, ib_stream_weight, phase_schedule, scaled_lr, stopped_early
from lpt.optim import autocast
from lpt.train.step import StepContext, train_step
from lpt.utils import (atomic_dir, check_output_dir, refuse_protected, resolve_device, seed_everything, sha256_file,
                       sha256_json)

__all__ = ["run_phase", "train_phase", "build_phase", "PhaseRun", "StepHook"]

StepHook = Callable[[int], None]


@dataclass
class Progress:
    """Everything that changes during training and must survive a resume (besides tensors)."""

    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    global_step: int = 0
    loss_sum: float = 0.0  # sum of step losses in the current epoch
    best_val_acc: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, float]] = field(default_factory=list)
    curve: list[dict[str, float]] = field(default_factory=list)  # training-curve points (dvclive), step order
    window_loss: float = 0.0  # sum of step losses since the last curve point
    window_steps: int = 0
    sampler_states: dict[str, Any] = field(default_factory=dict)  # states before set_epoch(epoch)


def _progress_bar(total: int, initial: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on a terminal only: in logs (DVC, Prefect, CI) each epoch is one printed line instead."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, mininterval=2.0,
                disable=not (enabled and sys.stderr.isatty()))


# ====================================================================================== one phase's run
@dataclass
class PhaseRun:
    """Everything one phase's loop reads and updates, built at once by :func:`build_phase`.

    Attributes (besides the arguments of :func:`build_phase`):
        spec, cfg: the method and its phase config (null recipe keys filled with the method's own).
        phase_dir: ``<train.out_dir>/phase{N}``, replaced whole by :func:`publish`.
        dist, device: the process's rank layout and device.
        rank_batch: images per rank in one optimizer step (``batch_size / world_size``).
        transforms, data: the resolved preprocessing and the phase's splits.
        schedule: epochs, steps per epoch, warm-up (:func:`lpt.optim.phase_schedule`).
        ctx: model, wrapped forward model, optimizer, scheduler, scaler, loss settings.
        samplers: the resumable batch samplers, by stream.
        recipe, fingerprint: what shapes the trajectory, and its hash (names the scratch folder).
        scratch: this run's resume state and live curves.
        curve_every: optimizer steps between two training-curve points (0: epoch ends only).
        progress, best_state: what changes as it trains (saved in every resume state).
    """

    params: Params
    phase: int
    plan: PhasePlan
    on_step: StepHook | None
    spec: Any
    cfg: PhaseConfig
    phase_dir: Path
    dist: Any
    device: str
    rank_batch: int
    transforms: Any
    data: Any
    schedule: Any
    ctx: StepContext
    samplers: dict[str, Any]
    recipe: dict[str, Any]
    fingerprint: str
    scratch: Path
    curve_every: int
    progress: Progress = field(default_factory=Progress)
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def model(self) -> Any:
        return self.ctx.model

    @property
    def steps_per_epoch(self) -> int:
        return self.schedule.steps_per_epoch

    @property
    def epochs(self) -> int:
        return self.schedule.epochs


def _check_launch(params: Params, phase: int, cfg: PhaseConfig, dist: Any) -> None:
    """``train.nproc`` must be the processes per node of this launch, and the batch must split over the ranks."""
    tcfg = params.train
    # train.nproc is the processes per node; the node count is the launch's (pipelines.launch --nnodes)
    if tcfg.nproc != dist.local_world_size or dist.world_size % tcfg.nproc:
        raise TrainError(f"train.nproc is {tcfg.nproc} but this process is one of {dist.local_world_size} "
                         f"on its node ({dist.world_size} in all): launch it with `python -m pipelines.launch "
                         f"--nproc {tcfg.nproc} -- lpt train --phase {phase}` (what `dvc repro` runs)")
    if cfg.batch_size % (dist.world_size * cfg.grad_accum):
        raise TrainError(f"train.phase{phase}.batch_size ({cfg.batch_size}) must be divisible by "
                         f"world_size x grad_accum ({dist.world_size} x {cfg.grad_accum})")


def _build_model(params: Params, phase: int, spec: Any, data: Any, device: str) -> Any:
    """The phase's model on ``device``: phase 2 starts from phase 1's trained tensors (sha256-checked); a method
    whose head starts from the class means gets them (LIFT)."""
    from lpt.model.lpt import create_lpt_model, read_trained_tensors

    seed_everything(params.seed)
    model = create_lpt_model(params, data.num_classes, phase=phase)
    if phase == 2:
        phase1 = Path(params.train.out_dir) / "phase1"
        ckpt = phase1 / "model.safetensors"
        if not ckpt.is_file() or not (phase1 / "model.json").is_file():
            raise TrainError(f"phase 2 needs the phase-1 checkpoint {ckpt} (+ model.json): run "
                             "`lpt train --phase 1` (dvc stage phase1) first")
        state, meta = read_trained_tensors(phase1)
        if meta["method"] != spec.name or meta["num_classes"] != data.num_classes:
            raise TrainError(f"{phase1}/model.json was trained with method {meta['method']!r} on "
                             f"{meta['num_classes']} classes; phase 2 expects {spec.name!r} on "
                             f"{data.num_classes}: re-run phase 1")
        model.load_trainable_state_dict(state, phase=1)
    elif head_init(params, spec) == "class_mean":
        # on the training device: a pass over the train split (every rank computes the same means)
        init_head_from_class_means(model.to(device), data, params.evaluate.batch_size, params.train.num_workers)
    return model.to(device)


def _wrap(model: Any, params: Params, phase: int, dist: Any, device: str) -> Any:
    """What the step calls: ``torch.compile`` (``train.compile``) and DDP over the ranks, around the model."""
    wrapped = model
    if params.train.compile:
        wrapped = torch.compile(wrapped)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [dist.local_rank] if device.startswith("cuda") else None
        # Top-k selection leaves unselected pool prompts without gradient in a step.
        wrapped = DistributedDataParallel(wrapped, device_ids=ids, find_unused_parameters=phase == 2)
    return wrapped


def build_phase(params: Params, phase: int, plan: PhasePlan, on_step: StepHook | None = None) -> PhaseRun:
    """Everything phase ``phase`` needs, in the order it is built: launch checks, threads, process group, data,
    schedule, model, optimizer, samplers, recipe and its fingerprint (the scratch folder's name).

    Raises:
        TrainError: a launch that does not match ``train.nproc``, a batch that does not split over the ranks,
            missing shards or phase-1 checkpoint.
    """
    tcfg = params.train
    spec = get_method(plan.method)
    cfg: PhaseConfig = filled_phase(getattr(tcfg, f"phase{phase}"), spec.recipe)  # null keys: the method's own
    dist = D.dist_from_env()
    _check_launch(params, phase, cfg, dist)
    if tcfg.threads > 0:
        torch.set_num_threads(tcfg.threads)
    device = D.init_distributed(dist, resolve_device(tcfg.device))
    world, rank_batch = dist.world_size, cfg.batch_size // dist.world_size
    from lpt.model.backbone import build_architecture, resolve_transforms

    # transforms left null in params come from the backbone (its input size, pretrained mean/std/crop)
    transforms = resolve_transforms(params.transforms, build_architecture(params.backbone))
    data = load_phase_data(params, transforms)
    # epochs of floor(N / B) + 1 steps (or fewer: max_steps_per_epoch), at least min_steps in all; the
    # warm-up, the cosine schedule and the IB weight w(e) all count these epochs
    schedule = phase_schedule(len(data.train), cfg)
    model = _build_model(params, phase, spec, data, device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, schedule.total_steps, schedule.warmup_steps, cfg.warmup_lr)
    scaler = torch.amp.GradScaler("cuda") if tcfg.amp == "fp16" and device.startswith("cuda") else None
    ctx = StepContext(model=model, forward_model=_wrap(model, params, phase, dist, device), optimizer=optimizer,
                      scheduler=scheduler, scaler=scaler, plan=plan, loss_cfg=params.loss,
                      scale=own(params.loss.scale, spec.recipe, "scale"),
                      class_counts=torch.tensor(data.class_counts, dtype=torch.float32, device=device),
                      device=device, amp=tcfg.amp, grad_accum=cfg.grad_accum, micro_batch=rank_batch // cfg.grad_accum,
                      dist=dist)
    samplers = build_samplers(np.asarray(data.train.labels), per_rank_epoch=schedule.steps_per_epoch * rank_batch,
                              seed=params.seed * 1000 + phase, rank=dist.rank, world_size=world,
                              streams=plan.streams, samples_per_class=cfg.samples_per_class)
    recipe = phase_recipe(params, phase, spec)
    inputs = {"data": data.manifest_sha, "backbone": model.backbone_fingerprint(), "world_size": world,
              "curve_points": tcfg.curve_points}  # a resume keeps the curve's spacing
    if phase == 2:
        inputs["phase1"] = sha256_file(Path(tcfg.out_dir) / "phase1" / "model.safetensors")
    key = fingerprint(recipe, inputs)
    return PhaseRun(params=params, phase=phase, plan=plan, on_step=on_step, spec=spec, cfg=cfg,
                    phase_dir=Path(tcfg.out_dir) / f"phase{phase}", dist=dist, device=device, rank_batch=rank_batch,
                    transforms=transforms, data=data, schedule=schedule, ctx=ctx, samplers=samplers, recipe=recipe,
                    fingerprint=key, scratch=scratch_dir(tcfg.out_dir, phase, key),
                    curve_every=curve_spacing(schedule.epochs * schedule.steps_per_epoch, tcfg.curve_points))


# ============================================================================================ resume
def resume(run: PhaseRun) -> bool:
    """Apply this run's own scratch state when there is one; a damaged or foreign one is reported and ignored.

    The state is checked against the run before anything is applied (:func:`_check_fits`); should applying still
    fail half-way, the run is put back as :func:`build_phase` left it (:func:`_snapshot`), without building it
    again.
    """
    state = load_resume_state(run.scratch)
    if state is None:
        return False
    if state.meta["format"] != RESUME_FORMAT or state.meta["fingerprint"] != run.fingerprint:
        print(f"[train] {run.scratch}/last was written by another version or config; starting fresh", flush=True)
        return False
    undo = _snapshot(run)
    try:
        parts = _check_fits(run, state)
        _apply(run, state, parts)
    except (ResumeStateError, KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        print(f"[train] ignoring damaged resume state in {run.scratch}/last ({err}); training from the start",
              flush=True)
        undo()
        return False
    return True


def _snapshot(run: PhaseRun) -> Callable[[], None]:
    """What resuming may change (trained tensors, optimizer, scheduler, scaler, samplers, RNG), as a callable
    that puts it back."""
    import copy

    ctx = run.ctx
    tensors = run.model.trainable_state_dict()
    optim, sched = copy.deepcopy(ctx.optimizer.state_dict()), copy.deepcopy(ctx.scheduler.state_dict())
    scaler = copy.deepcopy(ctx.scaler.state_dict()) if ctx.scaler is not None else None
    samplers = {name: s.state_dict() for name, s in run.samplers.items()}
    rng = capture_rng_state()

    def undo() -> None:
        run.model.load_trainable_state_dict(tensors)
        ctx.optimizer.load_state_dict(optim)
        ctx.scheduler.load_state_dict(sched)
        if ctx.scaler is not None:
            ctx.scaler.load_state_dict(scaler)
        for name, sampler_state in samplers.items():
            run.samplers[name].load_state_dict(sampler_state)
        restore_rng_state(rng)
        run.progress, run.best_state = Progress(), {}

    return undo


def _check_fits(run: PhaseRun, state: ResumeState) -> dict[str, dict[str, torch.Tensor]]:
    """The state must fit this very run before any of it is applied: every tensor of the model's or the
    optimizer's dtype and shape, optimizer / scheduler / sampler states shaped like this run's own, progress
    counters within the phase. A crafted state that passes would otherwise fail inside torch (or publish a
    model of garbage) on every rerun.

    Returns:
        The state's tensors by part (:func:`lpt.train.resume.split_resume_tensors`).

    Raises:
        ResumeStateError: naming the first field or tensor that does not fit.
    """
    meta, where, ctx = state.meta, f"{run.scratch}/last", run.ctx
    own = {n: p.detach() for n, p in run.model.named_parameters() if not n.startswith("backbone.")}
    params = [p.detach() for group in ctx.optimizer.param_groups for p in group["params"]]
    parts, stray = split_resume_tensors(state.tensors)
    check_tensors(own, parts["model"], f"{where} (model)")
    check_tensors(own, parts["best"], f"{where} (best)")
    check_tensors({f"optim.{i}.momentum_buffer": p for i, p in enumerate(params)}, parts["optim"],
                  f"{where} (optimizer)")
    if stray or set(parts["model"]) != set(own) or (parts["best"] and set(parts["best"]) != set(own)):
        raise ResumeStateError(f"{where}: tensors {sorted(state.tensors)[:8]} are not this model's trainable set "
                               f"({sorted(own)})")
    check_structure(ctx.optimizer.state_dict()["param_groups"], meta["optimizer"].get("param_groups"),
                    "optimizer.param_groups")
    if meta["optimizer"].get("scalars") != {}:  # SGD keeps tensors only (momentum buffers)
        raise ResumeStateError(f"{where}: optimizer.scalars must be empty for SGD")
    check_structure(ctx.scheduler.state_dict(), meta["scheduler"], "scheduler")
    if ctx.scaler is not None:
        check_structure(ctx.scaler.state_dict(), meta.get("scaler"), "scaler")
    if len(meta["ranks"]) != run.dist.world_size:
        raise ResumeStateError(f"{where}: {len(meta['ranks'])} rank states for {run.dist.world_size} processes")
    for name, sampler in meta["ranks"][run.dist.rank]["samplers"].items():
        if name not in run.samplers or not 0 <= sampler["offset"] <= sampler["num_samples"]:
            raise ResumeStateError(f"{where}: sampler state {name!r} does not fit this run's samplers")
    _check_progress(meta["progress"], run.steps_per_epoch, run.epochs, where)
    return parts


def _check_progress(prog: dict[str, Any], spe: int, epochs: int, where: str) -> None:
    """Counters of a resumable point of this phase: epoch e, step s of it, e * steps_per_epoch + s steps
    done, one history row per finished epoch, a best epoch among them, curve points at increasing steps
    already done, finite numbers."""
    epoch, step = prog["epoch"], prog["step_in_epoch"]
    history, best = prog["history"], prog["best_epoch"]
    finite = all(math.isfinite(prog[k]) for k in ("loss_sum", "best_val_acc"))
    curve = prog["curve"]
    curve_ok = _rows_ok(curve)
    steps = [row["step"] for row in curve] if curve_ok else []
    curve_ok = curve_ok and steps == sorted(set(steps)) and all(0 < s <= prog["global_step"] for s in steps) \
        and 0 <= prog["window_steps"] <= prog["global_step"] and math.isfinite(prog["window_loss"])
    if not (0 <= epoch <= epochs and 0 <= step <= spe and prog["global_step"] == epoch * spe + step
            and len(history) == epoch and _rows_ok(history) and curve_ok and finite and -1 <= best <= epoch
            and (best == -1) == (epoch == 0) and -1.0 <= prog["best_val_acc"] <= 1.0):
        raise ResumeStateError(f"{where}: progress {json.dumps({k: v for k, v in prog.items() if k != 'history'})[:200]} "
                               f"is not a point of this phase ({epochs} epochs of {spe} steps)")


def _apply(run: PhaseRun, state: ResumeState, parts: dict[str, dict[str, torch.Tensor]]) -> None:
    """Load a checked state into the run: tensors, optimizer, scheduler, scaler, samplers, progress, RNG."""
    meta, ctx = state.meta, run.ctx
    run.model.load_trainable_state_dict(parts["model"])
    run.best_state = parts["best"]
    optimizer_from_flat(ctx.optimizer, parts["optim"], meta["optimizer"])
    ctx.scheduler.load_state_dict(meta["scheduler"])
    if ctx.scaler is not None and meta.get("scaler"):
        ctx.scaler.load_state_dict(meta["scaler"])
    rank_state = meta["ranks"][run.dist.rank]
    for name, sampler_state in rank_state["samplers"].items():  # refuses a state of another sampler setup
        run.samplers[name].load_state_dict(sampler_state)
    run.progress = Progress(**{**meta["progress"], "sampler_states": dict(rank_state["samplers"])})
    restore_rng_state(rank_state["rng"])
    if run.dist.is_main:
        prog = run.progress
        print(f"[train] resumed phase {run.phase} from {run.scratch / 'last'} at step {prog.global_step} "
              f"(epoch {prog.epoch}, step {prog.step_in_epoch})", flush=True)


def save_checkpoint(run: PhaseRun) -> None:
    """Atomically rewrite ``scratch/last`` (rank 0 writes; every rank contributes its sampler + RNG state)."""
    rank_state = {"samplers": dict(run.progress.sampler_states), "rng": capture_rng_state()}
    ranks = D.all_gather(run.dist, rank_state)
    if run.dist.is_main:
        ctx = run.ctx
        optim_tensors, optim_meta = optimizer_to_flat(ctx.optimizer)
        tensors = join_resume_tensors(run.model.trainable_state_dict(), run.best_state, optim_tensors)
        prog = {k: v for k, v in asdict(run.progress).items() if k != "sampler_states"}
        meta = {"format": RESUME_FORMAT, "fingerprint": run.fingerprint, "method": run.plan.method,
                "phase": run.phase, "progress": prog, "optimizer": optim_meta, "scheduler": ctx.scheduler.state_dict(),
                "scaler": ctx.scaler.state_dict() if ctx.scaler is not None else None, "ranks": ranks}
        save_resume_state(run.scratch / "last", ResumeState(tensors, meta))
    D.barrier(run.dist)


# ====================================================================================== the epoch loop
def train_epoch(run: PhaseRun, epoch: int, live: Any = None) -> None:
    """Steps ``progress.step_in_epoch..steps_per_epoch-1`` of ``epoch``, checkpointing every
    ``train.checkpoint_every`` steps and adding a curve point every ``curve_every`` steps."""
    prog, params = run.progress, run.params
    streams = epoch_indices(run.samplers, prog.sampler_states, epoch, run.steps_per_epoch * run.rank_batch)
    ib_w = ib_stream_weight(epoch, run.epochs, params.loss.ib_weight) if run.plan.dual_sampling else 1.0
    if run.plan.dual_sampling and ib_w <= 0:
        streams = {"cb": streams["cb"]}  # w(e) == 0: skip loading (and forwarding) the IB batch
    dataset = EpochBatches(run.data.train, run.data.train_transform, streams, run.rank_batch,
                           (params.seed, run.phase, epoch, run.dist.rank))
    loader = epoch_loader(dataset, prog.step_in_epoch, run.steps_per_epoch, num_workers=params.train.num_workers,
                          pin_memory=run.device.startswith("cuda"), epoch=epoch)
    run.model.train()
    bar = _progress_bar(run.steps_per_epoch, prog.step_in_epoch, f"phase {run.phase} epoch {epoch + 1}/{run.epochs}",
                        run.dist.is_main)
    for batches in loader:
        loss = train_step(run.ctx, batches, ib_w, prog.global_step)
        prog.loss_sum += loss
        prog.window_loss += loss
        prog.window_steps += 1
        prog.step_in_epoch += 1
        prog.global_step += 1
        bar.update(1)
        if run.curve_every and prog.global_step % run.curve_every == 0 \
                and prog.step_in_epoch < run.steps_per_epoch:  # an epoch's end has its own point
            curve_point(run, val_accuracy(run), live)
            run.model.train()
        if prog.global_step % params.train.checkpoint_every == 0:
            save_checkpoint(run)
        if run.on_step is not None:
            run.on_step(prog.global_step)
    bar.close()


@torch.no_grad()
def val_accuracy(run: PhaseRun) -> float:
    """Top-1 accuracy on the validation split (split over ranks, summed)."""
    from lpt.data.reader import TransformedDataset

    run.model.eval()
    indices = list(range(run.dist.rank, len(run.data.val), run.dist.world_size))
    dataset = torch.utils.data.Subset(TransformedDataset(run.data.val, run.data.val_transform), indices)
    loader = torch.utils.data.DataLoader(dataset, batch_size=run.params.evaluate.batch_size, shuffle=False,
                                         num_workers=run.params.train.num_workers,
                                         generator=torch.Generator().manual_seed(0))
    counts = torch.zeros(2, dtype=torch.float64)
    for x, y in loader:
        with autocast(run.device, run.params.train.amp):
            logits = run.model(x.to(run.device)).logits
        counts[0] += (logits.argmax(dim=1).cpu() == y).sum().item()
        counts[1] += len(y)
    counts = D.all_reduce_sum(run.dist, counts, run.device)
    return float(counts[0] / counts[1].clamp_min(1))


def curve_point(run: PhaseRun, acc: float, live: Any) -> None:
    """One point of the training curve at the current step: the mean loss since the previous point, the
    val accuracy, the lr and the (fractional) epoch; logged to dvclive (rank 0) and kept for a resume."""
    prog = run.progress
    row = {"step": prog.global_step, "epoch": round(prog.global_step / run.steps_per_epoch, 4),
           "loss": prog.window_loss / max(1, prog.window_steps),
           "lr": float(run.ctx.scheduler.get_last_lr()[0]), "val_acc": acc}
    prog.curve.append(row)
    prog.window_loss, prog.window_steps = 0.0, 0
    if live is not None:
        _log_live(live, row)


def end_epoch(run: PhaseRun, epoch: int, live: Any) -> None:
    """Validate, keep the best tensors, log one line, checkpoint the epoch boundary."""
    acc = val_accuracy(run)
    curve_point(run, acc, live)
    prog = run.progress
    row = {"epoch": epoch + 1, "step": prog.global_step, "loss": prog.loss_sum / max(1, run.steps_per_epoch),
           "lr": float(run.ctx.scheduler.get_last_lr()[0]), "val_acc": acc}
    prog.history.append(row)
    if acc > prog.best_val_acc:
        prog.best_val_acc, prog.best_epoch = acc, epoch + 1
        run.best_state = {k: v.detach().cpu().clone() for k, v in run.model.trainable_state_dict().items()}
    if run.dist.is_main:
        print(f"[train] phase {run.phase} epoch {epoch + 1}/{run.epochs}: loss {row['loss']:.4f}  "
              f"lr {row['lr']:.2e}  val acc {acc:.4f}  (best {prog.best_val_acc:.4f} @ epoch {prog.best_epoch})",
              flush=True)
    prog.epoch, prog.step_in_epoch, prog.loss_sum = epoch + 1, 0, 0.0
    prog.sampler_states = {name: sampler.state_dict() for name, sampler in run.samplers.items()}
    save_checkpoint(run)


def _print_start(run: PhaseRun, resumed: bool) -> None:
    from lpt.model.lpt import format_parameter_report

    streams = {"dual": "class-aware (CB) + instance-balanced (IB)", "cb": "class-aware (CB)",
               "ib": "instance-balanced (IB)"}[run.plan.sampling]
    cfg = run.cfg
    print(f"[train] method {run.plan.method}, phase {run.phase}: {len(run.data.train)} train / "
          f"{len(run.data.val)} val images, {run.data.num_classes} classes; {run.epochs} epochs x "
          f"{run.steps_per_epoch} steps{_cap_note(run)}, global batch {cfg.batch_size} ({streams}), "
          f"world size {run.dist.world_size}, grad accum {cfg.grad_accum}, device {run.device}, "
          f"amp {run.params.train.amp}, lr {scaled_lr(cfg.lr, cfg.batch_size):.4g}"
          f"{' (resumed)' if resumed else ''}; resume state: {run.scratch}", flush=True)
    print(format_parameter_report(run.model.parameter_report()), flush=True)


def _cap_note(run: PhaseRun) -> str:
    notes = []
    if run.steps_per_epoch != run.schedule.full_steps_per_epoch:
        notes.append(f"of {run.schedule.full_steps_per_epoch}: train.phase{run.phase}.max_steps_per_epoch")
    if run.epochs > run.cfg.epochs:
        notes.append(f"{run.epochs} epochs, not {run.cfg.epochs}: train.phase{run.phase}.min_steps "
                     f"{run.cfg.min_steps}")
    return f" ({'; '.join(notes)})" if notes else ""


def publish(run: PhaseRun) -> dict[str, Any]:
    """Write the best-validation model + curves into a temp folder that replaces ``phase{N}/`` whole,
    then drop the scratch state (rank 0)."""
    from lpt.model.lpt import save_trained_model

    if run.best_state:
        run.model.load_trainable_state_dict(run.best_state)
    prog = run.progress
    if run.dist.is_main:
        meta = {"class_counts": run.data.class_counts, "recipe": run.recipe,
                "recipe_sha256": sha256_json(run.recipe), "best_val_acc": prog.best_val_acc,
                "best_epoch": prog.best_epoch, "epochs": run.epochs, "epochs_run": prog.epoch,
                "steps": prog.global_step, "history": prog.history, "world_size": run.dist.world_size,
                "transforms": run.transforms.as_dict()}
        with atomic_dir(run.phase_dir, **_phase_output(run.phase_dir)) as tmp:
            save_trained_model(run.model, tmp, meta)
            if (run.scratch / "live").is_dir():
                shutil.copytree(run.scratch / "live", tmp / "live")
        shutil.rmtree(run.scratch, ignore_errors=True)
        print(f"[train] phase {run.phase} done: best val acc {prog.best_val_acc:.4f} (epoch {prog.best_epoch}); "
              f"model -> {run.phase_dir / 'model.safetensors'}, curves -> {run.phase_dir / 'live'}", flush=True)
    D.barrier(run.dist)
    return {"checkpoint": str(run.phase_dir / "model.safetensors"), "best_val_acc": prog.best_val_acc,
            "phase_dir": str(run.phase_dir)}


def train_phase(params: Params, phase: int, plan: PhasePlan, on_step: StepHook | None = None) -> dict[str, Any]:
    """The training run, top to bottom: build, resume, the epoch loop (early stop, epoch, epoch end), publish."""
    run = build_phase(params, phase, plan, on_step)
    resumed = resume(run)
    if run.dist.is_main:
        _print_start(run, resumed)
    live = _open_live(run.scratch / "live", run.progress.curve) if run.dist.is_main else None
    try:
        for epoch in range(run.progress.epoch, run.epochs):
            if stopped_early(run.progress.epoch, run.progress.best_epoch, run.cfg.patience):
                if run.dist.is_main:
                    print(f"[train] phase {phase}: stopped after epoch {run.progress.epoch} of {run.epochs}, no "
                          f"better val accuracy in {run.cfg.patience} epochs (train.phase{phase}.patience)", flush=True)
                break
            train_epoch(run, epoch, live)
            end_epoch(run, epoch, live)
    finally:
        if live is not None:
            live.end()
    result = publish(run)
    D.shutdown(run.dist)
    return result


@torch.no_grad()
def init_head_from_class_means(model: Any, data: Any, batch_size: int, num_workers: int = 0) -> torch.Tensor:
    """Set the cosine head's class weights to the mean feature of each class's training images.

    LIFT starts its cosine classifier from class prototypes (text features for CLIP; the class mean of the
    image features for other backbones); the cosine head normalises each row, so the mean's direction is
    what counts. Features come from the model as it is before training, on the test-time transform (no
    augmentation), in eval mode. A class without images keeps its random row.

    Args:
        model: an ``LPTModel`` (its adapters, if any, are still the identity here: ``up`` starts at zero).
        data: :class:`lpt.train.batches.PhaseData` (train images, test-time transform, class count).
        batch_size: images per forward.
        num_workers: DataLoader workers.

    Returns:
        The per-class image counts used ([C]).
    """
    from lpt.data.reader import TransformedDataset

    was_training = model.training
    model.eval()
    device = model.head.weight.device
    # a generator of its own: iterating a DataLoader draws a base seed, which must not come from the global RNG
    loader = torch.utils.data.DataLoader(TransformedDataset(data.train, data.val_transform), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers, generator=torch.Generator().manual_seed(0))
    sums = torch.zeros(data.num_classes, model.embed_dim, dtype=torch.float64)  # [C, D]
    counts = torch.zeros(data.num_classes, dtype=torch.float64)  # [C]
    for x, y in loader:
        feats = model(x.to(device)).features.double().cpu()  # [B, D] final-norm CLS
        sums.index_add_(0, y, feats)
        counts.index_add_(0, y, torch.ones(len(y), dtype=torch.float64))
    seen = counts > 0
    means = sums[seen] / counts[seen].unsqueeze(1)  # [C_seen, D]
    # unit rows, as LIFT: the cosine head ignores a row's length, but SGD turns a row by about lr / |w|^2,
    # so a raw mean (|w| ~ 10) would barely move
    model.head.weight[seen] = torch.nn.functional.normalize(means, dim=1).to(model.head.weight)
    model.train(was_training)
    return counts


def _rows_ok(rows: list[Any]) -> bool:
    """Every row an epoch-end or curve point: exactly epoch, step, loss, lr and val_acc, each a finite number."""
    return all(isinstance(row, dict) and set(row) == {"epoch", "step", "loss", "lr", "val_acc"}
               and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       for v in row.values()) for row in rows)


def curve_spacing(total_steps: int, points: int) -> int:
    """Optimizer steps between two training-curve points: ``points`` evenly spaced over the phase (0: none
    besides the epoch ends).

    >>> curve_spacing(170, 20), curve_spacing(600, 20), curve_spacing(10, 20), curve_spacing(170, 0)
    (9, 30, 1, 0)
    """
    return 0 if points <= 0 else max(1, -(-total_steps // points))


def _open_live(live_dir: Path, curve: list[dict[str, float]]) -> Any:
    """A fresh dvclive folder with the curve points already logged replayed (so a resume leaves no duplicates).

    dvclive is used as a file logger only: ``dvc.yaml`` declares the plots itself, so the logger must
    neither edit ``dvc.yaml`` nor save experiments, and its DVC/Git probing is skipped (it raises in a
    Git repo without commits, e.g. a fresh ``git init``). No timestamps: the curves are DVC outputs and
    must be byte-identical across reruns.
    """
    from dvclive import Live

    class _FileOnlyLive(Live):
        def _init_dvc(self) -> None:  # no DVC repo / Git lookups: plain files under ``dir``
            return None

    shutil.rmtree(live_dir, ignore_errors=True)
    live = _FileOnlyLive(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)
    for row in curve:
        _log_live(live, row)
    return live


def _log_live(live: Any, row: dict[str, float]) -> None:
    live.step = int(row["step"])
    live.log_metric("train/loss", row["loss"], timestamp=False)
    live.log_metric("train/lr", row["lr"], timestamp=False)
    live.log_metric("val/acc", row["val_acc"], timestamp=False)
    live.log_metric("epoch", row["epoch"], plot=False)
    live.make_summary()


def _copy_phase1_as_final(params: Params, plan: PhasePlan) -> dict[str, Any]:
    """Phase 2 of a one-phase method: the phase-1 model becomes the final model in ``phase2/``."""
    from lpt.model.lpt import read_checkpoint_meta

    src = Path(params.train.out_dir) / "phase1"
    dst = Path(params.train.out_dir) / "phase2"
    files = ("model.safetensors", "model.json")
    if not all((src / f).is_file() for f in files):
        raise TrainError(f"method {plan.method!r}: phase 2 copies the phase-1 model, but {src}/model.safetensors "
                         "is missing: run `lpt train --phase 1` (dvc stage phase1) first")
    meta = read_checkpoint_meta(src)
    if meta["method"] != plan.method:
        raise TrainError(f"{src}/model.json was trained with method {meta['method']!r}, not {plan.method!r}: "
                         "re-run phase 1")
    with atomic_dir(dst, **_phase_output(dst)) as tmp:
        for f in files:
            shutil.copy2(src / f, tmp / f)
        if (src / "live").is_dir():
            shutil.copytree(src / "live", tmp / "live")
    print(f"[train] method {plan.method} has one phase: copied {src}/model.* -> {dst}/ (final model)", flush=True)
    return {"checkpoint": str(dst / "model.safetensors"), "best_val_acc": meta.get("best_val_acc"),
            "phase_dir": str(dst)}


PHASE_OUTPUT = ("model.safetensors", "model.json", "live")
"""What ``<train.out_dir>/phase{N}/`` holds (``model.json`` always): a folder with anything else is never replaced
(:func:`lpt.utils.check_output_dir`)."""


def _phase_output(phase_dir: Path) -> dict[str, Any]:
    """:func:`lpt.utils.atomic_dir` / :func:`lpt.utils.check_output_dir` arguments for a phase folder."""
    return {"what": f"train.out_dir {phase_dir.name}", "own": PHASE_OUTPUT, "key": "model.json"}


def run_phase(params: Params, phase: int, *, on_step: StepHook | None = None) -> dict[str, Any]:
    """Train phase ``phase`` of ``params.train.method`` (resuming its own interrupted run, if any).

    Args:
        params: validated params.
        phase: 1 or 2.
        on_step: test hook called with the global step after every optimizer step (and after the
            periodic checkpoint); raising from it interrupts the run like a crash would.

    Returns:
        ``{"checkpoint": path of model.safetensors, "best_val_acc": float, "phase_dir": str}``.

    Raises:
        TrainError: missing inputs (shards, phase-1 checkpoint), bad batch split, non-finite loss, or
            ``train.nproc`` different from the processes actually launched.
        OutputDirError: ``train.out_dir`` is ``.``, a repository root, ... or ``phase{N}/`` holds files this
            project did not write (checked before training).
    """
    from lpt.methods import MethodError

    refuse_protected(params.train.out_dir, "train.out_dir")
    phase_dir = Path(params.train.out_dir) / f"phase{phase}"
    check_output_dir(phase_dir, **_phase_output(phase_dir))  # before training: a refusal costs nothing
    try:
        plan = phase_plan(params.train.method, phase)
    except MethodError as err:
        raise TrainError(str(err)) from None
    if not plan.trains:
        return _copy_phase1_as_final(params, plan)
    return train_phase(params, phase, plan, on_step)
