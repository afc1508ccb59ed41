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
from lpt.train.resume import (RESUME_FORMAT, ResumeState, fingerprint, load_resume_state, optimizer_from_flat,
                              optimizer_to_flat, phase_recipe, restore_rng_state, save_resume_state, scratch_dir,
                              capture_rng_state, check_structure, check_tensors, ResumeStateError, head_init,
                              filled_phase)
from lpt.optim import build_optimizer, build_scheduler, ib_stream_weight, phase_schedule, scaled_lr, stopped_early
from lpt.optim import autocast
from lpt.train.step import StepContext, train_step
from lpt.utils import atomic_dir, check_output_dir, refuse_protected, resolve_device, seed_everything, sha256_file

__all__ = ["run_phase", "StepHook"]

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


class _PhaseRun:
    """One phase of one method. Setup, then :meth:`run`: resume, the epoch loop, the final model."""

    def __init__(self, params: Params, phase: int, plan: PhasePlan, on_step: StepHook | None) -> None:
        self.params, self.phase, self.plan, self.on_step = params, phase, plan, on_step
        self.spec = get_method(plan.method)
        # null recipe keys are the method's own (lpt.methods.Recipe)
        self.cfg: PhaseConfig = filled_phase(getattr(params.train, f"phase{phase}"), self.spec.recipe)
        self.phase_dir = Path(params.train.out_dir) / f"phase{phase}"
        self.dist = D.dist_from_env()
        self.progress = Progress()
        self.best_state: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        tcfg = self.params.train
        # train.nproc is the processes per node; the node count is the launch's (pipelines.launch --nnodes)
        if tcfg.nproc != self.dist.local_world_size or self.dist.world_size % tcfg.nproc:
            raise TrainError(f"train.nproc is {tcfg.nproc} but this process is one of {self.dist.local_world_size} "
                             f"on its node ({self.dist.world_size} in all): launch it with `python -m pipelines.launch "
                             f"--nproc {tcfg.nproc} -- lpt train --phase {self.phase}` (what `dvc repro` runs)")
        if tcfg.threads > 0:
            torch.set_num_threads(tcfg.threads)
        self.device = D.init_distributed(self.dist, resolve_device(tcfg.device))
        world, accum, batch = self.dist.world_size, self.cfg.grad_accum, self.cfg.batch_size
        if batch % (world * accum):
            raise TrainError(f"train.phase{self.phase}.batch_size ({batch}) must be divisible by "
                             f"world_size x grad_accum ({world} x {accum})")
        self.rank_batch = batch // world
        from lpt.model.backbone import build_architecture, resolve_transforms

        # transforms left null in params come from the backbone (its input size, pretrained mean/std/crop)
        self.transforms = resolve_transforms(self.params.transforms, build_architecture(self.params.backbone))
        self.data = load_phase_data(self.params, self.transforms)
        # epochs of floor(N / B) + 1 steps (or fewer: max_steps_per_epoch), at least min_steps in all; the
        # warm-up, the cosine schedule and the IB weight w(e) all count these epochs
        self.schedule = phase_schedule(len(self.data.train), self.cfg)
        self.steps_per_epoch, self.epochs = self.schedule.steps_per_epoch, self.schedule.epochs
        model = self._build_model().to(self.device)
        optimizer = build_optimizer(model, self.cfg)
        scheduler = build_scheduler(optimizer, self.schedule.total_steps, self.schedule.warmup_steps,
                                    self.cfg.warmup_lr)
        scaler = torch.amp.GradScaler("cuda") if tcfg.amp == "fp16" and self.device.startswith("cuda") else None
        self.ctx = StepContext(model=model, forward_model=self._wrap(model), optimizer=optimizer, scheduler=scheduler,
                               scaler=scaler, plan=self.plan, loss_cfg=self.params.loss,
                               scale=own(self.params.loss.scale, self.spec.recipe, "scale"),
                               class_counts=torch.tensor(self.data.class_counts, dtype=torch.float32,
                                                         device=self.device),
                               device=self.device, amp=tcfg.amp, grad_accum=accum, micro_batch=self.rank_batch // accum,
                               dist=self.dist)
        self.samplers = build_samplers(np.asarray(self.data.train.labels), per_rank_epoch=self.steps_per_epoch * self.rank_batch,
                                       seed=self.params.seed * 1000 + self.phase, rank=self.dist.rank,
                                       world_size=world, streams=self.plan.streams,
                                       samples_per_class=self.cfg.samples_per_class)
        self.recipe = phase_recipe(self.params, self.phase, self.spec)
        inputs = {"data": self.data.manifest_sha, "backbone": model.backbone_fingerprint(), "world_size": world,
                  "curve_points": tcfg.curve_points}  # a resume keeps the curve's spacing
        self.curve_every = curve_spacing(self.epochs * self.steps_per_epoch, tcfg.curve_points)
        if self.phase == 2:
            inputs["phase1"] = sha256_file(self._phase1_dir() / "model.safetensors")
        self.fingerprint = fingerprint(self.recipe, inputs)
        self.scratch = scratch_dir(tcfg.out_dir, self.phase, self.fingerprint)

    @property
    def model(self) -> Any:
        return self.ctx.model

    def _phase1_dir(self) -> Path:
        return Path(self.params.train.out_dir) / "phase1"

    def _build_model(self) -> torch.nn.Module:
        from lpt.model.lpt import create_lpt_model

        seed_everything(self.params.seed)
        model = create_lpt_model(self.params, self.data.num_classes, phase=self.phase)
        if self.phase == 2:
            self._load_phase1_into(model)
        elif head_init(self.params, self.spec) == "class_mean":
            # on the training device: a pass over the train split (every rank computes the same means)
            init_head_from_class_means(model.to(self.device), self.data, self.params.evaluate.batch_size,
                                       self.params.train.num_workers)
        return model

    def _load_phase1_into(self, model: Any) -> None:
        """Start the phase-2 model from phase 1's trained tensors (sha256-checked; the pool keeps its initial values)."""
        from lpt.model.lpt import read_trained_tensors

        ckpt = self._phase1_dir() / "model.safetensors"
        if not ckpt.is_file() or not (self._phase1_dir() / "model.json").is_file():
            raise TrainError(f"phase 2 needs the phase-1 checkpoint {ckpt} (+ model.json): run "
                             "`lpt train --phase 1` (dvc stage phase1) first")
        state, meta = read_trained_tensors(self._phase1_dir())
        if meta["method"] != self.plan.method or meta["num_classes"] != self.data.num_classes:
            raise TrainError(f"{self._phase1_dir()}/model.json was trained with method {meta['method']!r} on "
                             f"{meta['num_classes']} classes; phase 2 expects {self.plan.method!r} on "
                             f"{self.data.num_classes}: re-run phase 1")
        model.load_trainable_state_dict(state, phase=1)

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        wrapped: torch.nn.Module = model
        if self.params.train.compile:
            wrapped = torch.compile(wrapped)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.dist.local_rank] if self.device.startswith("cuda") else None
            # Top-k selection leaves unselected pool prompts without gradient in a step.
            wrapped = DistributedDataParallel(wrapped, device_ids=ids, find_unused_parameters=self.phase == 2)
        return wrapped

    # ------------------------------------------------------------------------------------ resume
    def try_resume(self) -> bool:
        """Restore this run's own scratch state when there is one; a damaged one is reported and ignored."""
        state = load_resume_state(self.scratch)
        if state is None:
            return False
        if state.meta["format"] != RESUME_FORMAT or state.meta["fingerprint"] != self.fingerprint:
            print(f"[train] {self.scratch}/last was written by another version or config; starting fresh", flush=True)
            return False
        try:
            self._check_fits(state)
            self._restore(state)
        except (ResumeStateError, KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
            print(f"[train] ignoring damaged resume state in {self.scratch}/last ({err}); training from the start",
                  flush=True)
            self._reset()
            return False
        return True

    def _reset(self) -> None:
        """Back to the untouched start after a half-applied restore."""
        self.setup()
        self.progress, self.best_state = Progress(), {}

    def _check_fits(self, state: ResumeState) -> None:
        """The state must fit this very run before any of it is applied: every tensor of the model's or the
        optimizer's dtype and shape, optimizer / scheduler / sampler states shaped like this run's own, progress
        counters within the phase. A crafted state that passes would otherwise fail inside torch (or publish a
        model of garbage) on every rerun.

        Raises:
            ResumeStateError: naming the first field or tensor that does not fit.
        """
        tensors, meta, where = state.tensors, state.meta, f"{self.scratch}/last"
        own = {n: p.detach() for n, p in self.model.named_parameters() if not n.startswith("backbone.")}
        params = [p.detach() for group in self.ctx.optimizer.param_groups for p in group["params"]]
        model_part = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        best_part = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        optim_ref = {f"optim.{i}.momentum_buffer": p for i, p in enumerate(params)}
        check_tensors(own, model_part, f"{where} (model)")
        check_tensors(own, best_part, f"{where} (best)")
        check_tensors(optim_ref, {k: v for k, v in tensors.items() if k.startswith("optim.")}, f"{where} (optimizer)")
        stray = sorted(k for k in tensors if not k.startswith(("model.", "best.", "optim.")))
        if stray or set(model_part) != set(own) or (best_part and set(best_part) != set(own)):
            raise ResumeStateError(f"{where}: tensors {sorted(tensors)[:8]} are not this model's trainable set "
                                   f"({sorted(own)})")
        check_structure(self.ctx.optimizer.state_dict()["param_groups"], meta["optimizer"].get("param_groups"),
                        "optimizer.param_groups")
        if meta["optimizer"].get("scalars") != {}:  # SGD keeps tensors only (momentum buffers)
            raise ResumeStateError(f"{where}: optimizer.scalars must be empty for SGD")
        check_structure(self.ctx.scheduler.state_dict(), meta["scheduler"], "scheduler")
        if self.ctx.scaler is not None:
            check_structure(self.ctx.scaler.state_dict(), meta.get("scaler"), "scaler")
        if len(meta["ranks"]) != self.dist.world_size:
            raise ResumeStateError(f"{where}: {len(meta['ranks'])} rank states for {self.dist.world_size} processes")
        for name, sampler in meta["ranks"][self.dist.rank]["samplers"].items():
            if name not in self.samplers or not 0 <= sampler["offset"] <= sampler["num_samples"]:
                raise ResumeStateError(f"{where}: sampler state {name!r} does not fit this run's samplers")
        self._check_progress(meta["progress"], where)

    def _check_progress(self, prog: dict[str, Any], where: str) -> None:
        """Counters of a resumable point of this phase: epoch e, step s of it, e * steps_per_epoch + s steps
        done, one history row per finished epoch, a best epoch among them, curve points at increasing steps
        already done, finite numbers."""
        spe, epochs = self.steps_per_epoch, self.epochs
        epoch, step = prog["epoch"], prog["step_in_epoch"]
        history, best = prog["history"], prog["best_epoch"]
        finite = all(math.isfinite(prog[k]) for k in ("loss_sum", "best_val_acc"))
        rows_ok = _rows_ok(history)
        curve = prog["curve"]
        curve_ok = _rows_ok(curve)
        steps = [row["step"] for row in curve] if curve_ok else []
        curve_ok = curve_ok and steps == sorted(set(steps)) and all(0 < s <= prog["global_step"] for s in steps) \
            and 0 <= prog["window_steps"] <= prog["global_step"] and math.isfinite(prog["window_loss"])
        if not (0 <= epoch <= epochs and 0 <= step <= spe and prog["global_step"] == epoch * spe + step
                and len(history) == epoch and rows_ok and curve_ok and finite and -1 <= best <= epoch
                and (best == -1) == (epoch == 0) and -1.0 <= prog["best_val_acc"] <= 1.0):
            raise ResumeStateError(f"{where}: progress {json.dumps({k: v for k, v in prog.items() if k != 'history'})[:200]} "
                                   f"is not a point of this phase ({epochs} epochs of {spe} steps)")

    def _restore(self, state: ResumeState) -> None:
        tensors, meta = state.tensors, state.meta
        self.model.load_trainable_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        optimizer_from_flat(self.ctx.optimizer, tensors, meta["optimizer"])
        self.ctx.scheduler.load_state_dict(meta["scheduler"])
        if self.ctx.scaler is not None and meta.get("scaler"):
            self.ctx.scaler.load_state_dict(meta["scaler"])
        rank_state = meta["ranks"][self.dist.rank]
        for name, sampler_state in rank_state["samplers"].items():  # refuses a state of another sampler setup
            self.samplers[name].load_state_dict(sampler_state)
        self.progress = Progress(**{**meta["progress"], "sampler_states": dict(rank_state["samplers"])})
        restore_rng_state(rank_state["rng"])
        if self.dist.is_main:
            prog = self.progress
            print(f"[train] resumed phase {self.phase} from {self.scratch / 'last'} at step {prog.global_step} "
                  f"(epoch {prog.epoch}, step {prog.step_in_epoch})", flush=True)

    def save_checkpoint(self) -> None:
        """Atomically rewrite ``scratch/last`` (rank 0 writes; every rank contributes its sampler + RNG state)."""
        rank_state = {"samplers": dict(self.progress.sampler_states), "rng": capture_rng_state()}
        ranks = D.all_gather(self.dist, rank_state)
        if self.dist.is_main:
            tensors = {f"model.{k}": v for k, v in self.model.trainable_state_dict().items()}
            tensors.update({f"best.{k}": v for k, v in self.best_state.items()})
            optim_tensors, optim_meta = optimizer_to_flat(self.ctx.optimizer)
            tensors.update(optim_tensors)
            prog = {k: v for k, v in asdict(self.progress).items() if k != "sampler_states"}
            meta = {"format": RESUME_FORMAT, "fingerprint": self.fingerprint, "method": self.plan.method,
                    "phase": self.phase, "progress": prog, "optimizer": optim_meta,
                    "scheduler": self.ctx.scheduler.state_dict(),
                    "scaler": self.ctx.scaler.state_dict() if self.ctx.scaler is not None else None, "ranks": ranks}
            save_resume_state(self.scratch / "last", ResumeState(tensors, meta))
        D.barrier(self.dist)

    # ------------------------------------------------------------------------------------ the epoch loop
    def train_epoch(self, epoch: int, live: Any = None) -> None:
        """Steps ``progress.step_in_epoch..steps_per_epoch-1`` of ``epoch``, checkpointing every
        ``train.checkpoint_every`` steps and adding a curve point every ``curve_every`` steps."""
        prog = self.progress
        streams = epoch_indices(self.samplers, prog.sampler_states, epoch, self.steps_per_epoch * self.rank_batch)
        ib_w = ib_stream_weight(epoch, self.epochs, self.params.loss.ib_weight) if self.plan.dual_sampling else 1.0
        if self.plan.dual_sampling and ib_w <= 0:
            streams = {"cb": streams["cb"]}  # w(e) == 0: skip loading (and forwarding) the IB batch
        dataset = EpochBatches(self.data.train, self.data.train_transform, streams, self.rank_batch,
                               (self.params.seed, self.phase, epoch, self.dist.rank))
        loader = epoch_loader(dataset, prog.step_in_epoch, self.steps_per_epoch,
                              num_workers=self.params.train.num_workers, pin_memory=self.device.startswith("cuda"),
                              epoch=epoch)
        self.model.train()
        bar = _progress_bar(self.steps_per_epoch, prog.step_in_epoch,
                            f"phase {self.phase} epoch {epoch + 1}/{self.epochs}", self.dist.is_main)
        for batches in loader:
            loss = train_step(self.ctx, batches, ib_w, prog.global_step)
            prog.loss_sum += loss
            prog.window_loss += loss
            prog.window_steps += 1
            prog.step_in_epoch += 1
            prog.global_step += 1
            bar.update(1)
            if self.curve_every and prog.global_step % self.curve_every == 0 \
                    and prog.step_in_epoch < self.steps_per_epoch:  # an epoch's end has its own point
                self.curve_point(self.val_accuracy(), live)
                self.model.train()
            if prog.global_step % self.params.train.checkpoint_every == 0:
                self.save_checkpoint()
            if self.on_step is not None:
                self.on_step(prog.global_step)
        bar.close()

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
            with autocast(self.device, self.params.train.amp):
                logits = self.model(x.to(self.device)).logits
            counts[0] += (logits.argmax(dim=1).cpu() == y).sum().item()
            counts[1] += len(y)
        counts = D.all_reduce_sum(self.dist, counts, self.device)
        return float(counts[0] / counts[1].clamp_min(1))

    def curve_point(self, acc: float, live: Any) -> None:
        """One point of the training curve at the current step: the mean loss since the previous point, the
        val accuracy, the lr and the (fractional) epoch; logged to dvclive (rank 0) and kept for a resume."""
        prog = self.progress
        row = {"step": prog.global_step, "epoch": round(prog.global_step / self.steps_per_epoch, 4),
               "loss": prog.window_loss / max(1, prog.window_steps),
               "lr": float(self.ctx.scheduler.get_last_lr()[0]), "val_acc": acc}
        prog.curve.append(row)
        prog.window_loss, prog.window_steps = 0.0, 0
        if live is not None:
            _log_live(live, row)

    def end_epoch(self, epoch: int, live: Any) -> None:
        """Validate, keep the best tensors, log one line, checkpoint the epoch boundary."""
        acc = self.val_accuracy()
        self.curve_point(acc, live)
        prog = self.progress
        row = {"epoch": epoch + 1, "step": prog.global_step, "loss": prog.loss_sum / max(1, self.steps_per_epoch),
               "lr": float(self.ctx.scheduler.get_last_lr()[0]), "val_acc": acc}
        prog.history.append(row)
        if acc > prog.best_val_acc:
            prog.best_val_acc, prog.best_epoch = acc, epoch + 1
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.trainable_state_dict().items()}
        if self.dist.is_main:
            print(f"[train] phase {self.phase} epoch {epoch + 1}/{self.epochs}: loss {row['loss']:.4f}  "
                  f"lr {row['lr']:.2e}  val acc {acc:.4f}  (best {prog.best_val_acc:.4f} @ epoch {prog.best_epoch})",
                  flush=True)
        prog.epoch, prog.step_in_epoch, prog.loss_sum = epoch + 1, 0, 0.0
        prog.sampler_states = {name: sampler.state_dict() for name, sampler in self.samplers.items()}
        self.save_checkpoint()

    # ------------------------------------------------------------------------------------ driver
    def run(self) -> dict[str, Any]:
        self.setup()
        resumed = self.try_resume()
        if self.dist.is_main:
            self._print_start(resumed)
        live = _open_live(self.scratch / "live", self.progress.curve) if self.dist.is_main else None
        try:
            for epoch in range(self.progress.epoch, self.epochs):
                if stopped_early(self.progress.epoch, self.progress.best_epoch, self.cfg.patience):
                    if self.dist.is_main:
                        print(f"[train] phase {self.phase}: stopped after epoch {self.progress.epoch} of "
                              f"{self.epochs}, no better val accuracy in {self.cfg.patience} epochs "
                              f"(train.phase{self.phase}.patience)", flush=True)
                    break
                self.train_epoch(epoch, live)
                self.end_epoch(epoch, live)
        finally:
            if live is not None:
                live.end()
        result = self._publish()
        D.shutdown(self.dist)
        return result

    def _print_start(self, resumed: bool) -> None:
        from lpt.model.lpt import format_parameter_report

        streams = {"dual": "class-aware (CB) + instance-balanced (IB)", "cb": "class-aware (CB)",
                   "ib": "instance-balanced (IB)"}[self.plan.sampling]
        print(f"[train] method {self.plan.method}, phase {self.phase}: {len(self.data.train)} train / "
              f"{len(self.data.val)} val images, {self.data.num_classes} classes; {self.epochs} epochs x "
              f"{self.steps_per_epoch} steps{self._cap_note()}, global batch {self.cfg.batch_size} ({streams}), "
              f"world size {self.dist.world_size}, grad accum {self.cfg.grad_accum}, device {self.device}, "
              f"amp {self.params.train.amp}, lr {scaled_lr(self.cfg.lr, self.cfg.batch_size):.4g}"
              f"{' (resumed)' if resumed else ''}; resume state: {self.scratch}", flush=True)
        print(format_parameter_report(self.model.parameter_report()), flush=True)

    def _cap_note(self) -> str:
        notes = []
        if self.steps_per_epoch != self.schedule.full_steps_per_epoch:
            notes.append(f"of {self.schedule.full_steps_per_epoch}: train.phase{self.phase}.max_steps_per_epoch")
        if self.epochs > self.cfg.epochs:
            notes.append(f"{self.epochs} epochs, not {self.cfg.epochs}: train.phase{self.phase}.min_steps "
                         f"{self.cfg.min_steps}")
        return f" ({'; '.join(notes)})" if notes else ""

    def _publish(self) -> dict[str, Any]:
        """Write the best-validation model + curves into a temp folder that replaces ``phase{N}/`` whole,
        then drop the scratch state (rank 0)."""
        from lpt.model.lpt import save_trained_model

        if self.best_state:
            self.model.load_trainable_state_dict(self.best_state)
        prog = self.progress
        if self.dist.is_main:
            meta = {"class_counts": self.data.class_counts, "recipe": self.recipe,
                    "recipe_sha256": _sha256_json(self.recipe), "best_val_acc": prog.best_val_acc,
                    "best_epoch": prog.best_epoch, "epochs": self.epochs, "epochs_run": prog.epoch,
                    "steps": prog.global_step,
                    "history": prog.history, "world_size": self.dist.world_size,
                    "transforms": self.transforms.as_dict()}
            with atomic_dir(self.phase_dir, **_phase_output(self.phase_dir)) as tmp:
                save_trained_model(self.model, tmp, meta)
                if (self.scratch / "live").is_dir():
                    shutil.copytree(self.scratch / "live", tmp / "live")
            shutil.rmtree(self.scratch, ignore_errors=True)
            print(f"[train] phase {self.phase} done: best val acc {prog.best_val_acc:.4f} (epoch {prog.best_epoch}); "
                  f"model -> {self.phase_dir / 'model.safetensors'}, curves -> {self.phase_dir / 'live'}", flush=True)
        D.barrier(self.dist)
        return {"checkpoint": str(self.phase_dir / "model.safetensors"), "best_val_acc": prog.best_val_acc,
                "phase_dir": str(self.phase_dir)}


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


def _sha256_json(value: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
    return _PhaseRun(params, phase, plan, on_step).run()
