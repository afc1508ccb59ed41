"""Numbers the README, docs and params.yaml quote as the committed pipeline's metrics are those metrics.

Each claim is a pattern whose named groups are metric keys of ``reports/metrics.json`` (or ``pixel_ncm``
of ``reports/gate.json``); the quoted number must equal the committed value rounded as quoted. Any other
line that names ``reports/metrics.json`` next to a decimal number is a claim nobody checks: it fails.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

NUMBER = r"(?P<{}>\d+\.\d+)"
CLAIMS: list[tuple[str, str, float]] = [  # (file, pattern with {key} placeholders, scale of the quoted figure)
    ("README.md", "overall {overall} \\| many {many} \\| medium {medium} \\| few {few} \\| ECE {ece}", 100),
    ("README.md", "pipeline's LPT gives {overall} overall / {few} few \\(seed 0\\)", 100),
    ("docs/results.md", "\\({overall} / {few}, `reports/metrics.json`\\)", 100),
    ("docs/training.md", "{overall} / {few} \\(seed 0, `reports/metrics.json`\\)", 100),
    ("params.yaml", "LPT reaches {overall} overall / {few} few \\(reports/metrics.json\\)", 1),
    ("params.yaml", "the pixel NCM {pixel_ncm}", 1),
]
FILES = ["README.md", "params.yaml", *sorted(p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "docs").glob("*.md"))]


def _committed() -> dict[str, float]:
    metrics = json.loads((REPO_ROOT / "reports/metrics.json").read_text())
    gate = json.loads((REPO_ROOT / "reports/gate.json").read_text())
    return {**metrics, **gate.get("pixel_overall", {})}


def _regex(pattern: str) -> re.Pattern[str]:
    keys = re.findall(r"\{(\w+)\}", pattern)
    return re.compile(pattern.format(**{k: NUMBER.format(k) for k in keys}))


@pytest.mark.parametrize("path, pattern, scale", CLAIMS, ids=[f"{c[0]}:{c[1][:30]}" for c in CLAIMS])
def test_a_quoted_metric_is_the_committed_one(path: str, pattern: str, scale: float) -> None:
    committed = _committed()
    matches = list(_regex(pattern).finditer((REPO_ROOT / path).read_text()))
    assert matches, f"{path}: the claim {pattern!r} is gone: update CLAIMS"
    for match in matches:
        for key, quoted in match.groupdict().items():
            decimals = len(quoted.split(".")[1])
            assert f"{scale * committed[key]:.{decimals}f}" == quoted, (
                f"{path}: quotes {key} as {quoted}; the committed metrics give {scale * committed[key]:.{decimals}f}")


def test_no_unchecked_line_quotes_the_committed_metrics() -> None:
    checked = [(path, _regex(pattern)) for path, pattern, _ in CLAIMS]
    unchecked = []
    for path in FILES:
        for n, line in enumerate((REPO_ROOT / path).read_text().splitlines(), 1):
            if "reports/metrics.json" in line and re.search(r"\d+\.\d+", line):
                if not any(p == path and rx.search(line) for p, rx in checked):
                    unchecked.append(f"{path}:{n}: {line.strip()[:120]}")
    assert not unchecked, "quoted without a check (add a CLAIMS entry, or do not name reports/metrics.json):\n" + \
        "\n".join(unchecked)
