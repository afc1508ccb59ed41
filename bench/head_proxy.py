"""What caps LPT's head on a data set? Converged heads on the frozen phase-1 features (validation split only).

``python -m bench.head_proxy --shards DIR [--params params.yaml] [--scales 10,20,50,100]``

The features are the LPT model's own at the start of phase 1 (``params.yaml``'s backbone with the
initial shared prompt; the test-time transform; no augmentation) of the long-tailed *train* split (fit) and
the balanced *validation* split (score), never the test split. Each head is fitted to convergence
(full-batch L-BFGS, class-weighted cross-entropy ``N / (C * n_c)``, class-mean initialisation):

* ``probe``: the balanced linear probe of ``bench/backbone_proxy.py`` (standardised features, bias);
* ``cosine s=S raw / centred / standardised``: LPT's cosine head (no bias) at scale ``S`` on the raw
  features, on features minus their train mean, and on standardised features;
* ``NCM``: nearest class mean (cosine), raw and centred.

It also prints the features' mean pairwise cosine: near 1, every feature points the same way and a cosine
head at a moderate scale cannot separate the classes however long it trains. The validation split is
small (200 images for Fashion-MNIST-LT: one standard error ~3 points).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.backbone_proxy import balanced_linear_probe, nearest_class_mean


def phase1_features(params_path: Path, shards: Path) -> tuple[torch.Tensor, ...]:
    """(train features, train labels, val features, val labels) of the phase-1 model at initialisation."""
    from lpt.config import load_params
    from lpt.data.reader import TransformedDataset
    from lpt.model.backbone import build_architecture, resolve_transforms
    from lpt.model.lpt import create_lpt_model
    from lpt.train.batches import load_phase_data
    from lpt.utils import seed_everything

    params = load_params(params_path, {"data.out_dir": str(shards)})
    transforms = resolve_transforms(params.transforms, build_architecture(params.backbone))
    data = load_phase_data(params, transforms)
    seed_everything(params.seed)
    model = create_lpt_model(params, data.num_classes).eval()
    out = []
    for split in (data.train, data.val):
        loader = torch.utils.data.DataLoader(TransformedDataset(split, data.val_transform), batch_size=256)
        with torch.no_grad():
            feats, labels = zip(*[(model(x).features, y) for x, y in loader])
        out += [torch.cat(feats), torch.cat(labels)]
    return tuple(out)


def cosine_head(ftr: torch.Tensor, ytr: torch.Tensor, fva: torch.Tensor, yva: torch.Tensor, scale: float,
                iters: int = 300) -> float:
    """Val accuracy of a converged cosine head ``scale * cos(f, w)`` (class-weighted CE, L-BFGS)."""
    classes = int(ytr.max()) + 1
    counts = torch.bincount(ytr, minlength=classes).float()
    weight = counts.sum() / (classes * counts)
    w = torch.stack([F.normalize(ftr[ytr == c].mean(0), dim=0) for c in range(classes)]).requires_grad_(True)
    opt = torch.optim.LBFGS([w], max_iter=iters, line_search_fn="strong_wolfe")
    a, b = F.normalize(ftr, dim=1), F.normalize(fva, dim=1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(scale * a @ F.normalize(w, dim=1).T, ytr, weight=weight)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((b @ F.normalize(w, dim=1).T).argmax(1) == yva).float().mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.head_proxy", description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=Path, required=True, help="ingested data set (train + val splits)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--scales", default="10,20,50,100")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    from lpt.config import ParamsError
    from lpt.errors import TrainError

    try:
        ftr, ytr, fva, yva = phase1_features(args.params, args.shards)
    except (ParamsError, TrainError, OSError) as err:  # no shards, bad params, unreadable weights: one line
        print(f"error: {err}", file=sys.stderr)
        return 2
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    unit = F.normalize(ftr, dim=1)
    print(f"{len(ftr)} train / {len(fva)} val features of dim {ftr.shape[1]}; mean pairwise cosine "
          f"{float((unit @ unit.T).mean()):.3f}")
    print(f"balanced linear probe (standardised, bias): {100 * balanced_linear_probe(ftr, ytr, fva, yva):.1f}")
    print(f"NCM raw {100 * nearest_class_mean(ftr, ytr, fva, yva):.1f}, centred "
          f"{100 * nearest_class_mean(ftr - mu, ytr, fva - mu, yva):.1f}")
    for s in (float(v) for v in args.scales.split(",")):
        accs = [cosine_head(a, ytr, b, yva, s) for a, b in ((ftr, fva), (ftr - mu, fva - mu),
                                                             ((ftr - mu) / sd, (fva - mu) / sd))]
        print(f"cosine head s={s:g}: raw {100 * accs[0]:.1f}, centred {100 * accs[1]:.1f}, "
              f"standardised {100 * accs[2]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
