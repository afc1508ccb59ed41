"""Data throughput: ingest, and shard read+decode side by side with raw decode of the same images.

Run: ``python -m bench.data_throughput`` (default synthetic params: 32,847 images) or ``--quick``.

Measured in one run, on the same images:
  * ingest: ``run_ingest`` wall time (generate + PNG-encode + write shards + manifest) -> img/s;
  * raw decode: PIL decode to RGB of the encoded bytes already in memory (the ceiling);
  * shard sequential: read the tar shards from disk, index them, decode every image;
  * shard random access: ``ShardImages(in_memory=False)`` index + ``ds[i]`` in a random order;
  * webdataset stream: ``wds.WebDataset(...).decode("pil")`` over the same shards;
  * integrity: sha256 over every shard of every split (read from disk, what a full verification costs),
    and the hashing inside one ``ShardImages`` open of the read split (its bytes hashed in memory, as
    the reader does) as a share of that open's wall time.
Each figure is the best of ``--repeats`` interleaved rounds (the machine is shared); the ratio to
raw decode is the number to watch (target >= 0.90).
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np

from lpt.config import load_params
from lpt.data.ingest import run_ingest
from lpt.data.reader import ShardImages, decode_image, iter_shard_samples, load_manifest, shard_paths
from bench.timing import write_figures

QUICK = {"data.synthetic.num_classes": 20, "data.max_per_class": 100,
         "data.test_per_class": 50}


def _rate(n: int, fn) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def _raw(blobs: list[bytes]) -> None:
    for b in blobs:
        decode_image(b)


def _sequential(paths: list[Path]) -> None:
    for path in paths:
        for _, parts in iter_shard_samples(path):
            decode_image(parts["png"] if "png" in parts else parts["jpg"])


def _random_access(out: Path, split: str, order: np.ndarray) -> None:
    ds = ShardImages(out, split, in_memory=False)
    for i in order:
        ds[int(i)]
    ds.close()


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _hash_files(paths: list[Path]) -> None:
    """sha256 over each file's bytes, read whole (what a reader verifying a shard does)."""
    for path in paths:
        hashlib.sha256(path.read_bytes()).hexdigest()


def _hash_bytes(blobs: list[bytes]) -> None:
    for raw in blobs:
        hashlib.sha256(raw).hexdigest()


def _wds(paths: list[Path]) -> None:
    import webdataset as wds

    ds = wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False).decode("pil").to_tuple("png;jpg", "cls")
    for image, _ in ds:
        image.convert("RGB")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--quick", action="store_true", help="a small synthetic set (seconds)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--split", default="train")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="lpt-bench-") as tmp:
        out = Path(tmp) / "shards"
        overrides = {"data.out_dir": str(out), **(QUICK if args.quick else {})}
        params = load_params(args.params, overrides)
        start = time.perf_counter()
        result = run_ingest(params)
        ingest_s = time.perf_counter() - start
        total = sum(result.counts.values())

        paths = shard_paths(out, args.split)
        manifest = load_manifest(out)
        all_shards = [p for split in manifest["splits"] for p in shard_paths(out, split, manifest)]
        all_mb = sum(p.stat().st_size for p in all_shards) / 1e6
        split_bytes = [p.read_bytes() for p in paths]
        mem = ShardImages(out, args.split, in_memory=True)
        blobs = [mem.image_bytes(i) for i in range(len(mem))]
        n = len(blobs)
        order = np.random.default_rng(0).permutation(n)
        rounds: dict[str, list[float]] = {"raw": [], "sequential": [], "random": [], "wds": []}
        seconds: dict[str, list[float]] = {"verify_all": [], "open": [], "open_hash": []}
        for _ in range(args.repeats):  # interleaved so load changes hit every method alike
            rounds["raw"].append(_rate(n, lambda: _raw(blobs)))
            rounds["sequential"].append(_rate(n, lambda: _sequential(paths)))
            rounds["random"].append(_rate(n, lambda: _random_access(out, args.split, order)))
            rounds["wds"].append(_rate(n, lambda: _wds(paths)))
            seconds["verify_all"].append(_seconds(lambda: _hash_files(all_shards)))
            seconds["open"].append(_seconds(lambda: ShardImages(out, args.split, in_memory=True)))
            seconds["open_hash"].append(_seconds(lambda: _hash_bytes(split_bytes)))
    best = {k: max(v) for k, v in rounds.items()}
    fastest = {k: min(v) for k, v in seconds.items()}
    hash_share = fastest["open_hash"] / fastest["open"]
    figures = {
        "ingest_images": total, "ingest_seconds": round(ingest_s, 2), "ingest_img_per_s": round(total / ingest_s),
        "read_split": args.split, "read_images": n,
        **{f"{k}_img_per_s": round(v) for k, v in best.items()},
        **{f"{k}_vs_raw": round(best[k] / best["raw"], 3) for k in ("sequential", "random", "wds")},
        "verify_all_shards": len(all_shards), "verify_all_mb": round(all_mb, 1),
        "verify_all_ms": round(fastest["verify_all"] * 1e3, 1),
        "open_ms": round(fastest["open"] * 1e3, 1), "open_hash_ms": round(fastest["open_hash"] * 1e3, 1),
        "open_hash_share": round(hash_share, 3),
    }
    print(f"ingest: {total} images in {ingest_s:.1f} s = {figures['ingest_img_per_s']} img/s ({result.counts})")
    print(f"read+decode of {n} {args.split} images (best of {args.repeats}):")
    print(f"  {'method':<28}{'img/s':>10}{'vs raw':>9}")
    labels = {"raw": "raw PIL decode (in memory)", "sequential": "shards sequential", "random": "ShardImages random access",
              "wds": "webdataset stream"}
    for k, label in labels.items():
        print(f"  {label:<28}{best[k]:>10.0f}{best[k] / best['raw']:>9.1%}")
    print(f"integrity (best of {args.repeats}):")
    print(f"  sha256 of every shard, all splits ({len(all_shards)} shards, {all_mb:.1f} MB, read from disk): "
          f"{fastest['verify_all'] * 1e3:.1f} ms ({all_mb / max(fastest['verify_all'], 1e-9):.0f} MB/s)")
    print(f"  ShardImages open of {args.split} (in memory, verified): {fastest['open'] * 1e3:.1f} ms, of which "
          f"sha256 {fastest['open_hash'] * 1e3:.1f} ms ({hash_share:.1%})")
    write_figures(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
