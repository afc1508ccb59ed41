"""Great Expectations validation: passes on good shards, names every failure on bad ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_tiny_params

from lpt.config import Params
from lpt.data.reader import iter_shard_samples, load_manifest
from lpt.data.shards import _ShardSink
from lpt.data.validate import run_validation
from lpt.utils import sha256_file, write_json_atomic


def _copy(params: Params, root: Path, **overrides) -> Params:
    new = make_tiny_params(root, **overrides)
    shutil.copytree(params.data.out_dir, new.data.out_dir)
    return new


def _rewrite_split(params: Params, split: str, edit) -> None:
    """Rewrite a split's shards with ``edit(samples) -> samples`` and update the manifest to match."""
    out = Path(params.data.out_dir)
    samples = [dict(parts, __key__=key) for p in sorted((out / split).glob("*.tar")) for key, parts in iter_shard_samples(p)]
    for p in (out / split).glob("*.tar"):
        p.unlink()
    sink = _ShardSink(out / split, split, maxcount=10_000)
    for s in edit(samples):
        sink.write(s)
    sink.close()
    manifest = load_manifest(params.data.out_dir)
    manifest["splits"][split]["shards"] = sink.shards
    manifest["splits"][split]["count"] = sum(s["count"] for s in sink.shards)
    write_json_atomic(params.data.out_dir / "manifest.json", manifest)


def test_good_shards_pass_and_summary_is_flat(tiny_shards, tmp_path: Path) -> None:
    params = make_tiny_params(tmp_path, data__out_dir=tiny_shards.data.out_dir)
    result = run_validation(params)
    assert result.success, result.failures
    assert result.failures == [] and result.report_path.is_file()
    summary = json.loads(result.summary_path.read_text())
    assert summary["success"] is True and summary["counts"]["images"] == 159 + 40 + 80
    names = {row["expectation"] for row in summary["expectations"]}
    assert {"expect_column_values_to_be_unique", "expect_column_pair_values_to_be_equal"} <= names
    for row in summary["expectations"]:
        assert {"expectation", "column", "success", "unexpected_count", "details"} <= row.keys()
        assert row["success"] is True


def test_every_kind_of_damage_is_reported(tiny_shards, tmp_path: Path) -> None:
    params = _copy(tiny_shards, tmp_path)
    train = [dict(parts, __key__=k) for p in sorted((Path(params.data.out_dir) / "train").glob("*.tar"))
             for k, parts in iter_shard_samples(p)]

    def damage_test(samples):
        kept = [s for s in samples if int(s["cls"]) != 0]  # class 0 vanishes from test
        leaked = next(dict(s, __key__="test_leak") for s in train if int(s["cls"]) != 0)  # a train image in test
        bad_label = dict(kept[1], __key__="test_badlabel", cls=b"99",
                         json=json.dumps({"label": 99, "source_id": "x"}).encode())
        broken = dict(kept[2], __key__="test_broken", png=b"\x89PNG broken")
        return kept + [leaked, bad_label, broken]

    _rewrite_split(params, "test", damage_test)
    result = run_validation(params)
    assert not result.success
    text = "\n".join(result.failures)
    for expected in ("labels within [0, 10)", "every image decodes", "no test image also in train",
                     "every class present in test"):
        assert expected in text, text
    assert "sha256" not in text, "manifest was updated consistently, hashes must still match"
    summary = json.loads(result.summary_path.read_text())
    assert not summary["success"] and any(r["unexpected_count"] > 0 for r in summary["expectations"])


def test_tampered_shard_and_counts_fail(tiny_shards, tmp_path: Path) -> None:
    params = _copy(tiny_shards, tmp_path)
    shard = next((Path(params.data.out_dir) / "val").glob("*.tar"))
    raw = bytearray(shard.read_bytes())
    raw[2000] ^= 0xFF  # one flipped byte in the first sample's image: same size, different content
    shard.write_bytes(bytes(raw))
    manifest = load_manifest(params.data.out_dir)
    manifest["train_counts"][0] += 1
    write_json_atomic(params.data.out_dir / "manifest.json", manifest)
    result = run_validation(params)
    text = "\n".join(result.failures)
    assert "shard sha256 equals the manifest" in text and "train per-class counts equal the manifest" in text
    assert sha256_file(shard) != manifest["splits"]["val"]["shards"][0]["sha256"]


def test_imbalance_ratio_other_than_configured_fails(tiny_shards, tmp_path: Path) -> None:
    params = make_tiny_params(tmp_path, data__out_dir=tiny_shards.data.out_dir,
                              data__imbalance_ratio=50)
    result = run_validation(params)
    assert not result.success and any("imbalance ratio 50" in f for f in result.failures)


def test_missing_manifest_fails_cleanly(tmp_path: Path) -> None:
    result = run_validation(make_tiny_params(tmp_path))
    assert not result.success and "manifest" in result.failures[0] and result.summary_path.is_file()


def test_cli_validate_exits_nonzero_on_failure(tiny_shards, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lpt.cli import app
    from lpt.config import write_params_atomic
    from lpt.exitcodes import VALIDATION_FAILED

    params = make_tiny_params(tmp_path, data__out_dir=tiny_shards.data.out_dir,
                              data__imbalance_ratio=50)
    path = tmp_path / "params.yaml"
    write_params_atomic(path, params.to_dict())
    result = CliRunner().invoke(app, ["validate", "-p", str(path)])
    assert result.exit_code == VALIDATION_FAILED
    assert "imbalance ratio" in result.output


@pytest.mark.parametrize("flag", [False])
def test_overlap_check_can_be_disabled(tiny_shards, tmp_path: Path, flag: bool) -> None:
    params = _copy(tiny_shards, tmp_path, validate__check_test_overlap=flag)
    train0 = next(iter_shard_samples(next((Path(params.data.out_dir) / "train").glob("*.tar"))))
    _rewrite_split(params, "test", lambda s: s + [dict(train0[1], __key__="test_leak")])
    result = run_validation(params)
    assert result.success, result.failures
