"""bench.faults: the checks it applies after each injected fault (the harness itself is its own command)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from bench.faults import leftovers, lock_hashes, report_markdown

from conftest import REPO_ROOT


def test_leftovers_finds_our_temporaries_old_folders_and_weights_without_json(tmp_path: Path) -> None:
    (tmp_path / "models" / "phase1").mkdir(parents=True)
    (tmp_path / "models" / "phase1" / "model.safetensors").write_bytes(b"w")  # no model.json beside it
    (tmp_path / "models" / ".phase2.host-123.abcd.tmp").mkdir()
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / ".figures.old").mkdir()
    (tmp_path / "models" / "phase2").mkdir()
    (tmp_path / "models" / "phase2" / "model.safetensors").write_bytes(b"w")
    (tmp_path / "models" / "phase2" / "model.json").write_text("{}")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / ".index.tmp").write_text("git's own")
    assert leftovers(tmp_path) == ["models/.phase2.host-123.abcd.tmp", "models/phase1/model.safetensors (no model.json)",
                                   "reports/.figures.old"]


def test_lock_hashes_and_the_report_count_what_was_injected(tmp_path: Path) -> None:
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "ingest": {"outs": [{"path": "data/shards", "md5": "a.dir"}]},
        "evaluate": {"outs": [{"path": "reports/metrics.json", "md5": "b"}, {"path": "reports/plots", "md5": "c.dir"}]}}}))
    assert lock_hashes(tmp_path) == {"ingest:data/shards": "a.dir", "evaluate:reports/metrics.json": "b",
                                     "evaluate:reports/plots": "c.dir"}
    row = {"stage": "ingest", "moment": "mid", "at_s": 1.0, "stage_s": 2.0, "recovered": True, "status_clean": True}
    res = {"seed": 0, "kills_per_stage": 2, "wall_s": 10.0, "stage_seconds": {"ingest": 2.0},
           "fault_free_rerun_identical": {"ingest": True},
           "rows": [{**row, "injected": True, "identical": True, "differences": [], "leftovers": []},
                    {**row, "injected": False, "identical": True, "differences": [], "leftovers": []}]}
    text = report_markdown(res)
    assert "| ingest | 2.0 | yes | 1 | 1 | 1 | 1 | 0 |" in text
    assert "In all: 1 injected, 1 recovered, 0 with different outputs, 0 leftovers; temporaries" in text


def test_the_harness_command_checks_its_arguments() -> None:
    ok = subprocess.run([sys.executable, "-m", "bench.faults", "--help"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and "SIGKILL" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "bench.faults", "--stages", "nope"], cwd=REPO_ROOT, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_the_report_rewrites_only_its_own_section(tmp_path: Path) -> None:
    from bench.faults import BEGIN, END, write_section

    page = tmp_path / "reliability.md"
    page.write_text("# Reliability\n\n## Fuzz\n\nfigures\n")
    write_section(page, "## Kills\n\nfirst")
    write_section(page, "## Kills\n\nsecond")
    text = page.read_text()
    assert text.startswith("# Reliability\n\n## Fuzz\n\nfigures\n\n") and text.count(BEGIN) == text.count(END) == 1
    assert "second" in text and "first" not in text


def _served(**kw):
    row = {"scenario": "s", "injected": True, "final_state": "CRASHED", "message": "m", "identical": True,
           "params_unchanged": True, "status_clean": True, "leftovers": [], "orphans": [], "orphans_after_kill": [],
           "rerun_state": "COMPLETED"}
    return {**row, **kw}


def test_a_full_disk_or_a_served_run_that_misses_the_target_fails_the_harness() -> None:
    """The harness exits 1 when any row of the new tables misses: two error lines, a traceback, outputs touched,
    a killed run left 'RUNNING' or a process left running, a refused run that changed params.yaml."""
    from bench.faults import failures

    disk = {"stage": "phase1", "limit_bytes": 2048, "exit_code": 1, "error_lines": 1, "traceback": False,
            "names_fault": True, "error": "error: cannot write x: File too large [EFBIG]; nothing was written",
            "previous_intact": True, "leftovers": [], "rerun_ok": True, "rerun_identical": True}
    good = [_served(), _served(final_state="CANCELLED", rerun_state="–"),
            _served(final_state="FAILED", rerun_state="–", first_completed=True)]
    res = {"rows": [], "concurrent": [], "disk": [disk], "served": good}
    assert failures(res) == []
    for bad_disk in ({"error_lines": 2}, {"traceback": True}, {"previous_intact": False}, {"leftovers": ["a.tmp"]},
                     {"rerun_identical": False}):
        assert failures({**res, "disk": [{**disk, **bad_disk}]}), bad_disk
    for i, bad_served in ((0, {"final_state": "RUNNING"}), (0, {"orphans_after_kill": ["lpt train"]}),
                          (0, {"rerun_state": "FAILED"}), (1, {"params_unchanged": False}), (2, {"first_completed": False}),
                          (2, {"final_state": "COMPLETED"}), (1, {"injected": False})):
        served = list(good)
        served[i] = {**served[i], **bad_served}
        assert failures({**res, "served": served}), (i, bad_served)
    text = report_markdown({"seed": 0, "kills_per_stage": 1, "wall_s": 1.0, "stage_seconds": {}, "rows": [],
                            "fault_free_rerun_identical": {}, **res})
    assert "| phase1 | 2.0 KiB | 1 | 1 | no | yes | 0 | yes | `error: cannot write x" in text
    assert "| s | yes | CRASHED | yes | yes | yes | 0 | 0 | COMPLETED |" in text
    assert "| a full disk (file size limit, EFBIG) | phase1 | 1 | 1 | 1 | 0 |" in text
    assert "| s | served `lpt/full` | 1 | 1 | 1 | 0 |" in text
