"""Training of the two LPT phases (and the one-phase baselines), resumable exactly.

Where things live:

- :mod:`lpt.train.run` — the driver ``run_phase``: setup, the epoch loop, validation, publishing the model.
- :mod:`lpt.train.step` — one optimizer step (streams, micro-batches, A-GCL / CE, the key term).
- :mod:`lpt.train.batches` — splits, samplers and each step's seeded batches.
- :mod:`lpt.train.resume` — the phase recipe and fingerprint, the data-only resume state in its scratch folder.
- :mod:`lpt.optim` — lr scaling, warm-up + cosine, the optimizer, autocast (shared with pretraining).
- :mod:`lpt.train.distributed` — rank info and collectives (launching is the pipeline layer's job).

The backbone pretraining of the embedded default is a stage of its own: :mod:`lpt.pretrain`.
"""

from lpt.losses import ib_stream_weight
from lpt.methods import PhasePlan, phase_plan
from lpt.errors import TrainError
from lpt.train.resume import capture_rng_state, restore_rng_state
from lpt.train.run import run_phase
from lpt.optim import build_optimizer, build_scheduler, scaled_lr, steps_per_epoch, warmup_cosine_lr

__all__ = ["TrainError", "PhasePlan", "phase_plan", "steps_per_epoch", "ib_stream_weight", "scaled_lr",
           "warmup_cosine_lr", "build_optimizer", "build_scheduler", "capture_rng_state", "restore_rng_state",
           "run_phase"]
