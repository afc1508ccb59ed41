"""Run every benchmark family one after the other (`make bench` / `python -m bench.all`).

Each module prints its own side-by-side table; run them on an otherwise idle machine. Figures go to
``bench/results/<name>.json`` as well.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHES: list[tuple[str, list[str]]] = [
    ("data_throughput", []),
    ("train_step", ["--preset", "tiny"]),
    ("onnx_latency", []),
    ("pipeline_overhead", []),
]


def main() -> int:
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name, args in BENCHES:
        print(f"\n===== bench.{name} {' '.join(args)}", flush=True)
        rc = subprocess.call([sys.executable, "-m", f"bench.{name}", *args, "--json", str(out / f"{name}.json")])
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
