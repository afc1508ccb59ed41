"""Train-step and inference benchmark of the LPT model: phase 1 vs phase 2, block reuse vs two passes.

Usage::

    python -m bench.train_step                       # tiny preset on CPU (the embedded default geometry)
    python -m bench.train_step --preset vitb --device auto   # ViT-B/16 224 px, batch 128, bf16 on GPU

Prints one table:
    - images/s of a phase-1 and a phase-2 train step (same config, same batch, side by side), and the
      phase-2 / phase-1 step-time ratio (goal <= 1.15);
    - block-reuse speed-up over the straightforward two passes, for the eval forward and the train step;
    - achieved FLOP/s of a train step (FLOPs counted with ``torch.utils.flop_counter.FlopCounterMode``)
      as a share of this process's measured matmul throughput (goal >= 50 % on the tiny preset);
    - memory: activations saved for backward (exact, any device) and peak memory (GPU: allocator peak;
      CPU: peak RSS above the pre-step baseline, sampled).

Variants are timed round-robin (one step of each per round, median over rounds), so a noisy shared
machine slows them alike and the ratios stay meaningful. A train step = forward + loss (A-GCL with the
key-matching term) + backward + SGD update on one batch; the real loop runs two such streams (CB + IB).
Self-contained: imports only torch, lpt.config, lpt.model and lpt.losses.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lpt.config import BackboneConfig, LossConfig, ModelConfig  # noqa: E402
from lpt.losses import agcl_loss  # noqa: E402
from lpt.model.backbone import create_backbone  # noqa: E402
from lpt.model.lpt import LPTModel  # noqa: E402
from bench.timing import write_figures


@dataclass(frozen=True)
class Preset:
    """One benchmark geometry."""

    name: str
    backbone: BackboneConfig
    model: ModelConfig
    img_size: int
    num_classes: int
    batch: int


PRESETS: dict[str, Preset] = {
    # the embedded default of params.yaml (small ViT on 32 px images)
    "tiny": Preset(
        "tiny",
        BackboneConfig(name="vit_tiny_patch16_224", weights="none",
                       timm_kwargs=dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4)),
        ModelConfig(prompt_length=10, pool_size=20, shared_blocks=3, top_k=2),
        img_size=32, num_classes=100, batch=64,
    ),
    # the paper's geometry: ViT-B/16 at 224 px, L=12, S=6, T=10, P=20, k=2
    "vitb": Preset(
        "vitb",
        BackboneConfig(name="vit_base_patch16_224", weights="none", timm_kwargs=dict(img_size=224)),
        ModelConfig(prompt_length=10, pool_size=20, shared_blocks=6, top_k=2),
        img_size=224, num_classes=365, batch=128,
    ),
}


# ------------------------------------------------------------------------------------------ helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # non-Linux: coarse fallback
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _PeakMemory:
    """Peak memory above the baseline while the block runs: CUDA allocator peak, or sampled CPU RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _rss_bytes()
            self._max = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss_bytes())
            time.sleep(0.0005)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, _rss_bytes()) - self._base


def _saved_for_backward_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of tensors autograd saves for backward during ``fn()`` (storage-deduplicated)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    del loss
    return sum(seen.values())


def _flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts the CPU flash-attention kernel (torch registers only the GPU ones)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def fwd(q, k, v, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
        return sdpa_flop_count(q, k, v)

    def bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
        return sdpa_backward_flop_count(grad_out, q, k, v)

    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return FlopCounterMode(display=False, custom_mapping=mapping)


def matmul_throughput(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Measured FLOP/s of a large square matmul in ``dtype`` on ``device`` (this process, these threads)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while True:
        for _ in range(10 if device.type == "cuda" else 1):
            a @ b
            reps += 1
        _sync(device)
        if time.perf_counter() - t0 >= seconds:
            break
    return 2 * n**3 * reps / (time.perf_counter() - t0)


# --------------------------------------------------------------------------------------- the bench
class Bench:
    """Holds the model, data and closures for every timed variant."""

    def __init__(self, preset: Preset, device: torch.device, amp: bool, batch: int) -> None:
        torch.manual_seed(0)
        self.preset, self.device, self.batch = preset, device, batch
        self.amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp else nullcontext()
        self.loss_cfg = LossConfig()
        backbone = create_backbone(preset.backbone)
        # one model per phase on the one frozen backbone (a model's phase is fixed at construction)
        self.models = {phase: LPTModel(backbone, preset.num_classes, preset.model, "lpt", backbone_cfg=preset.backbone,
                                       phase=phase).to(device) for phase in (1, 2)}
        self.model = self.models[1]
        self.x = torch.randn(batch, 3, preset.img_size, preset.img_size, device=device)
        self.y = torch.randint(0, preset.num_classes, (batch,), device=device)
        # a long-tailed count profile 500 -> 5
        c = preset.num_classes
        self.counts = [max(1, int(500 * (0.01 ** (i / max(1, c - 1))))) for i in range(c)]
        self.opt: torch.optim.Optimizer | None = None

    def configure(self, phase: int, reuse: bool, train: bool) -> None:
        m = self.model = self.models[phase]
        m.block_reuse = reuse  # read by every phase-2 forward
        m.train(train)
        params = [p for p in m.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=0.01)

    def loss(self) -> torch.Tensor:
        with self.amp:
            out = self.model(self.x)
        return agcl_loss(out.logits, self.y, self.counts, 0.5, 8.0, self.loss_cfg, scale=20.0) - 0.5 * out.sim

    def train_step(self) -> None:
        assert self.opt is not None
        self.opt.zero_grad(set_to_none=True)
        self.loss().backward()
        self.opt.step()

    @torch.no_grad()
    def eval_forward(self) -> None:
        with self.amp:
            self.model(self.x)


VARIANTS: dict[str, tuple[int, bool, bool]] = {  # name -> (phase, block_reuse, train)
    "train phase 1": (1, True, True),
    "train phase 2 (reuse)": (2, True, True),
    "train phase 2 (two passes)": (2, False, True),
    "eval phase 1": (1, True, False),
    "eval phase 2 (reuse)": (2, True, False),
    "eval phase 2 (two passes)": (2, False, False),
}


def run(preset_name: str, device_choice: str, batch: int | None, rounds: int, warmup: int,
        amp_choice: str, threads: int) -> dict[str, Any]:
    """Run every variant and return the figures (also used by the table printer)."""
    if threads > 0:
        torch.set_num_threads(threads)
    if device_choice == "auto":
        device_choice = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_choice)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = device.type == "cuda" if amp_choice == "auto" else amp_choice == "bf16"
    preset = PRESETS[preset_name]
    bench = Bench(preset, device, amp, batch or preset.batch)
    step_of = {name: (bench.train_step if train else bench.eval_forward) for name, (_, _, train) in VARIANTS.items()}

    # warm-up (allocator, kernels, autotuning) for every variant
    for name, (phase, reuse, train) in VARIANTS.items():
        bench.configure(phase, reuse, train)
        for _ in range(warmup):
            step_of[name]()
    _sync(device)

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(rounds):  # round-robin: one step of each variant per round
        for name, (phase, reuse, train) in VARIANTS.items():
            bench.configure(phase, reuse, train)
            _sync(device)
            t0 = time.perf_counter()
            step_of[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)

    res: dict[str, Any] = {"preset": preset.name, "device": str(device), "amp": "bf16" if amp else "off",
                           "batch": bench.batch, "threads": torch.get_num_threads(), "rounds": rounds,
                           "model": bench.model.parameter_report(), "variants": {}}
    peak_dtype = torch.bfloat16 if amp else torch.float32
    res["matmul_flops"] = matmul_throughput(device, peak_dtype)
    for name, (phase, reuse, train) in VARIANTS.items():
        bench.configure(phase, reuse, train)
        with _flop_counter() as fc:
            step_of[name]()
        with _PeakMemory(device) as mem:
            step_of[name]()
        saved = _saved_for_backward_bytes(bench.loss) if train else 0
        med = statistics.median(times[name])
        res["variants"][name] = {
            "step_s": med, "images_per_s": bench.batch / med, "flops": fc.get_total_flops(),
            "flops_per_s": fc.get_total_flops() / med, "peak_mem_bytes": mem.peak, "saved_for_backward_bytes": saved,
        }
    v = res["variants"]
    res["ratios"] = {
        "phase2_over_phase1_train": v["train phase 2 (reuse)"]["step_s"] / v["train phase 1"]["step_s"],
        "reuse_speedup_train": v["train phase 2 (two passes)"]["step_s"] / v["train phase 2 (reuse)"]["step_s"],
        "reuse_speedup_eval": v["eval phase 2 (two passes)"]["step_s"] / v["eval phase 2 (reuse)"]["step_s"],
        "eval_phase2_over_phase1": v["eval phase 2 (reuse)"]["step_s"] / v["eval phase 1"]["step_s"],
    }
    return res


def format_table(res: dict[str, Any]) -> str:
    """One human-readable table of :func:`run`'s figures."""
    mm = res["matmul_flops"]
    rep = res["model"]
    lines = [
        f"LPT train-step bench: preset={res['preset']} device={res['device']} amp={res['amp']} "
        f"batch={res['batch']} threads={res['threads']} rounds={res['rounds']}",
        f"model: backbone {rep['backbone']:,} params (frozen); tuned prompts+keys+head {rep['tuned_total']:,}",
        f"measured matmul throughput ({'bf16' if res['amp'] == 'bf16' else 'fp32'}): {mm / 1e9:,.1f} GFLOP/s",
        "",
        f"{'variant':<28} {'ms/step':>9} {'img/s':>9} {'GFLOP/step':>11} {'GFLOP/s':>9} {'% matmul':>9} "
        f"{'peak MB':>8} {'saved MB':>9}",
    ]
    for name, v in res["variants"].items():
        lines.append(
            f"{name:<28} {1e3 * v['step_s']:>9.1f} {v['images_per_s']:>9.1f} {v['flops'] / 1e9:>11.2f} "
            f"{v['flops_per_s'] / 1e9:>9.1f} {100 * v['flops_per_s'] / mm:>8.1f}% "
            f"{v['peak_mem_bytes'] / 2**20:>8.1f} {v['saved_for_backward_bytes'] / 2**20:>9.1f}"
        )
    r = res["ratios"]
    lines += [
        "",
        f"phase-2 / phase-1 train step time : {r['phase2_over_phase1_train']:.3f}  (goal <= 1.15)",
        f"block reuse speed-up, train step  : {r['reuse_speedup_train']:.3f}x vs two passes",
        f"block reuse speed-up, eval forward: {r['reuse_speedup_eval']:.3f}x vs two passes",
        f"eval phase-2 / phase-1 forward    : {r['eval_phase2_over_phase1']:.3f}",
        f"train phase-1 FLOP/s share of matmul peak: "
        f"{100 * res['variants']['train phase 1']['flops_per_s'] / mm:.1f} %, phase 2: "
        f"{100 * res['variants']['train phase 2 (reuse)']['flops_per_s'] / mm:.1f} %  (goal >= 50 % on tiny)",
        "peak MB: GPU allocator peak above the pre-step baseline; CPU: sampled RSS above the baseline (coarse).",
        "saved MB: tensors autograd keeps for backward (exact).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--batch", type=int, default=None, help="default: the preset's (tiny 64, vitb 128)")
    ap.add_argument("--rounds", type=int, default=None, help="timed steps per variant (default 10 GPU, 5 CPU)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto", help="auto: bf16 on GPU, off on CPU")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    rounds = args.rounds or (10 if cuda else 5)
    res = run(args.preset, args.device, args.batch, rounds, args.warmup, args.amp, args.threads)
    print(format_table(res))
    write_figures(args.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
