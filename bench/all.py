"""Run every benchmark family one after the other (`make bench` / `python -m bench.all`).

Each module prints its own side-by-side table; run them on an otherwise idle machine. Figures go to
``bench/results/<name>.json`` as well.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCHES: list[tuple[str, list[str]]] = [
    ("data_throughput", []),
    ("train_step", ["--preset", "tiny"]),
    ("families", []),
    ("onnx_latency", []),
    ("packs", []),
    ("pipeline_overhead", []),
    ("inat_scale", []),
    ("raw_consumers", []),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.all", description=__doc__.splitlines()[0],
                                 epilog="families: " + ", ".join(name for name, _ in BENCHES))
    ap.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this family (repeatable)")
    args_ns = ap.parse_args(argv)
    unknown = sorted(set(args_ns.only) - {name for name, _ in BENCHES})
    if unknown:
        ap.error(f"unknown family {', '.join(unknown)}")
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name, args in BENCHES:
        if args_ns.only and name not in args_ns.only:
            continue
        print(f"\n===== bench.{name} {' '.join(args)}", flush=True)
        rc = subprocess.call([sys.executable, "-m", f"bench.{name}", *args, "--json", str(out / f"{name}.json")])
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
