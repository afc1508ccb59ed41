"""iNaturalist scale (docs/scale.md): the iNat-shaped profile, lazily rendered classes past the 480
combinations, the uncarved counts, the samplers and reports at many classes, the capped parity sample, and
two processes acting as two nodes (static rendezvous over loopback, gloo)."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from lpt.config import Params
from tests.conftest import REPO_ROOT, make_tiny_params


# ------------------------------------------------------------------------------------------ profile
def test_inat2018_profile_holds_inat_2018_images_between_its_ends() -> None:
    from lpt.data.longtail import INAT2018, inat2018_shape, longtail_counts, profile_counts

    counts = profile_counts("inat2018", 8142, 1000, 500)
    assert len(counts) == INAT2018["classes"] == 8142
    assert sum(counts) == INAT2018["train"] == 437_513  # the competition's published total
    assert counts[0] == 1000 and counts[-1] == 2
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert 0.5 < inat2018_shape() < 0.8  # each group's segment falls faster at its start
    # iNat-2018's group sizes under the standard thresholds: 842 many (> 100), 4,076 medium, 3,224 few (< 20)
    c = np.asarray(counts)
    assert ((c > 100).sum(), ((c >= 20) & (c <= 100)).sum(), (c < 20).sum()) == (842, 4076, 3224)
    assert (c[841], c[842], c[4917], c[4918]) == (101, 100, 20, 19)  # the knots, exactly
    # the plain exponential with iNat's ends holds about three times as many images
    assert sum(longtail_counts(8142, 1000, 500)) > 3 * 437_513 * 0.9
    # the exponential profile is the CIFAR-100-LT one: 500 -> 5, 10,847 images
    assert sum(profile_counts("exponential", 100, 500, 100)) == 10_847


def test_solve_shape_refuses_an_unreachable_total() -> None:
    from lpt.data.longtail import solve_shape

    with pytest.raises(ValueError, match="cannot be spread"):
        solve_shape(10, 100, 10, total=5_000)  # more than 10 classes x 100


def test_profile_is_a_strict_params_key() -> None:
    from lpt.config import ParamsError, load_params

    with pytest.raises(ParamsError, match="data.synthetic.profile"):
        load_params(REPO_ROOT / "params.yaml", {"data.synthetic.profile": "zipf"})


# ------------------------------------------------------------------------------------------ classes
def test_classes_past_480_are_hue_variants_disjoint_from_the_pretraining_classes() -> None:
    from lpt.data.sources.synthetic import (VOCABULARY_SIZE, class_identities, class_name, class_vocabulary,
                                            source_class_combos)

    small = class_identities(100)
    assert (small[:, :3] == np.array(class_vocabulary()[:100])).all() and not small[:, 3].any()
    big = class_identities(8142)
    names = [class_name(tuple(c)) for c in big]
    assert len(set(names)) == 8142
    assert big[:, 3].min() == 1, "past 480 classes no target is a plain combination"
    pretraining = {class_name(tuple(c)) for c in source_class_combos(VOCABULARY_SIZE)}  # every plain one
    assert not pretraining & set(names)


def test_more_than_480_classes_pass_the_disjointness_check_and_fewer_still_must_fit() -> None:
    from lpt.config import ParamsError, load_params

    params = load_params(REPO_ROOT / "params.yaml", {"data.synthetic.num_classes": 8142})
    assert params.data.synthetic.num_classes == 8142
    with pytest.raises(ParamsError, match="at most 480"):
        load_params(REPO_ROOT / "params.yaml", {"data.synthetic.num_classes": 400, "pretrain.source_classes": 200})


def test_hue_variant_changes_the_colours_not_the_randomness() -> None:
    from lpt.data.sources.synthetic import class_identities, render

    rows = class_identities(1000)[[5, 485]]  # the same combination, variants 1 and 2
    assert (rows[0, :3] == rows[1, :3]).all() and rows[0, 3] != rows[1, 3]
    a = render(rows[:1], 16, 1.0, np.random.default_rng(0))
    b = render(rows[1:], 16, 1.0, np.random.default_rng(0))
    plain = render(rows[:1, :3], 16, 1.0, np.random.default_rng(0))
    assert not np.array_equal(a, b) and not np.array_equal(a, plain)
    assert a.shape == b.shape == (1, 16, 16, 3)


def test_a_rendered_split_is_the_same_images_every_pass_and_as_one_render() -> None:
    from lpt.data.sources.synthetic import CHUNK, RenderedSplit, class_identities, render

    combos = class_identities(12)
    labels = np.arange(CHUNK + 37) % 12  # more than one chunk
    split = RenderedSplit("train", labels, combos, 8, 1.0, np.random.default_rng([3, 0]))
    first = np.stack([item.payload for item in split])
    again = np.stack([item.payload for item in split])
    rng = np.random.default_rng([3, 0])
    eager = np.concatenate([render(combos[labels[s: s + CHUNK]], 8, 1.0, rng) for s in range(0, len(labels), CHUNK)])
    assert len(split) == len(labels) and np.array_equal(first, again) and np.array_equal(first, eager)
    assert [item.label for item in split][:13] == labels[:13].tolist()


# ------------------------------------------------------------------------------- carved counts
def test_groups_and_cloud_size_come_from_the_counts_that_train() -> None:
    from lpt.data.ingest import full_train_counts
    from lpt.data.longtail import holdout_size
    from lpt.data.reader import group_counts
    from lpt.data.shards import SplitWriteResult
    from lpt.data.sources.base import SourceData

    train = SplitWriteResult(shards=[], labels=[0, 0, 0, 1])
    val = SplitWriteResult(shards=[], labels=[0, 1])
    carved = SourceData(class_names=["a", "b"], splits={}, val_from_train=True)
    assert full_train_counts(carved, {"train": train, "val": val}, [3, 1]) == [4, 2]  # kept for reference
    kept = SourceData(class_names=["a", "b"], splits={}, val_from_train=False)
    assert full_train_counts(kept, {"train": train, "val": val}, [3, 1]) == [3, 1]
    # the groups follow what each class trains on
    assert group_counts({"num_classes": 2, "train_counts": [19, 1], "full_train_counts": [20, 2]}) == [19, 1]
    # iNat's 2-image classes are not carved at all (floor of 5 training images), so they stay 2-image classes
    assert holdout_size(2, per_class=1) == 0 and holdout_size(6, per_class=1) == 1


# ------------------------------------------------------------------------------------------ samplers
def test_take_is_iteration_without_python_ints() -> None:
    from lpt.data.sampling import ClassAwareSampler

    labels = np.repeat(np.arange(7), [9, 5, 4, 3, 2, 2, 1])
    a = ClassAwareSampler(labels, samples_per_class=2, num_samples=40, seed=1, rank=1, world_size=2)
    b = ClassAwareSampler(labels, samples_per_class=2, num_samples=40, seed=1, rank=1, world_size=2)
    assert len(a) == 20
    first = a.take(7).tolist() + a.take(13).tolist()
    assert first == list(itertools.islice(iter(b), 7)) + list(itertools.islice(iter(b), 13))
    assert first == list(ClassAwareSampler(labels, samples_per_class=2, num_samples=40, seed=1, rank=1, world_size=2))
    assert a.state_dict() == b.state_dict()  # the same place in the epoch (a resume continues from it)
    assert a.take(5).tolist() == []  # the epoch is spent


def test_class_indices_from_one_sort_equal_where_per_class() -> None:
    from lpt.data.sampling import ClassAwareSampler

    labels = np.random.default_rng(0).integers(0, 50, 2000)
    sampler = ClassAwareSampler(labels, num_samples=8)
    expected = [np.where(labels == c)[0] for c in np.unique(labels)]
    assert len(sampler.class_indices) == len(expected)
    assert all(np.array_equal(a, b) for a, b in zip(sampler.class_indices, expected))


# ------------------------------------------------------------------------------------------ reports
def test_count_bins_never_straddle_a_group_boundary() -> None:
    from lpt.evaluate import count_bins

    counts = np.array([1000, 500, 150, 101, 100, 60, 20, 19, 5, 2])
    acc = np.array([1.0, 0.5, np.nan, 1.0, 0.0, 1.0, 0.5, 0.0, 0.0, 1.0])
    rows = count_bins(counts, acc, bins=4)
    assert sum(r["classes"] for r in rows) == 10
    for r in rows:
        members = counts[(counts >= r["low"]) & (counts <= r["high"])]
        assert len(members) == r["classes"]
        assert len({("many" if c > 100 else "medium" if c >= 20 else "few") for c in members}) == 1, r
    many = [r for r in rows if r["group"] == "many"]
    assert sum(r["classes"] for r in many) == 4
    # a bin's accuracy is the mean over its tested classes (the untested 150-image class is skipped)
    top = next(r for r in rows if r["low"] <= 1000 <= r["high"])
    members = (counts >= top["low"]) & (counts <= top["high"])
    assert top["accuracy"] == pytest.approx(np.nanmean(acc[members]))
    assert all(r["accuracy"] is None for r in rows if np.isnan(acc[(counts >= r["low"]) & (counts <= r["high"])]).all())


def test_worst_classes_hand_computed() -> None:
    from lpt.evaluate import worst_classes

    labels = np.array([0, 0, 1, 1, 2, 2, 3])
    pred = np.array([0, 0, 2, 2, 2, 1, 1])
    rows = worst_classes(pred, labels, np.array([50, 40, 30, 10]), ["a", "b", "c", "d"], limit=3)
    # class 1: 0/2 (confused with c, 2 of 2); class 3: 0/1 (confused with b); class 2: 1/2
    assert [(r["class"], r["accuracy"]) for r in rows] == [("d", 0.0), ("b", 0.0), ("c", 0.5)]
    assert rows[1]["confused_with"] == "c" and rows[1]["confused_share"] == 1.0
    assert rows[0]["train_count"] == 10 and rows[0]["test_images"] == 1


def test_parity_sample_covers_every_class_before_any_twice() -> None:
    from lpt.export import parity_sample

    labels = np.repeat(np.arange(6), [1, 2, 3, 5, 8, 13])
    assert np.array_equal(parity_sample(labels, None, 0), np.arange(32))
    assert np.array_equal(parity_sample(labels, 100, 0), np.arange(32))
    pick = parity_sample(labels, 9, seed=0)
    per_class = np.bincount(labels[pick], minlength=6)
    assert len(pick) == 9 and (per_class >= 1).all() and per_class.max() - per_class.min() <= 1
    few = parity_sample(labels, 4, seed=0)
    assert len(set(labels[few].tolist())) == 4  # below C: one image each of 4 classes
    assert np.array_equal(pick, parity_sample(labels, 9, seed=0))
    assert not np.array_equal(pick, parity_sample(labels, 9, seed=1))


# ------------------------------------------------------------------------------------------ stages
def test_validate_with_two_workers_gives_the_same_tables(tiny_shards: Params, tmp_path: Path) -> None:
    from lpt.data.reader import load_manifest
    from lpt.data.validate import IMAGE_COLUMNS, read_shards

    shards = Path(tiny_shards.data.out_dir)
    manifest = load_manifest(shards)
    rows1, images1 = read_shards(shards, manifest, workers=1)
    rows2, images2 = read_shards(shards, manifest, workers=2)
    assert rows1 == rows2
    for column in IMAGE_COLUMNS:
        assert np.array_equal(images1[column], images2[column]), column
    assert len(images1["label"]) == sum(s["count"] for s in manifest["splits"].values())


def test_max_steps_per_epoch_bounds_a_phase(tiny_shards: Params, tmp_path: Path) -> None:
    from lpt.train import run_phase

    params = make_tiny_params(tmp_path, data__out_dir=str(tiny_shards.data.out_dir), train__phase1__epochs=2,
                              train__phase1__max_steps_per_epoch=3)
    steps: list[int] = []
    run_phase(params, 1, on_step=steps.append)
    assert len(steps) == 6  # 2 epochs x 3, not floor(N / 16) + 1 each
    meta = json.loads((tmp_path / "models/phase1/model.json").read_text())
    assert len(meta["history"]) == 2


def test_many_classes_are_summarised_in_plots_and_report(tiny_shards: Params, tmp_path: Path) -> None:
    from lpt.evaluate import run_evaluate
    from lpt.train import run_phase

    params = make_tiny_params(tmp_path, data__out_dir=str(tiny_shards.data.out_dir),
                              train__phase1__max_steps_per_epoch=2, evaluate__max_plot_classes=4)
    run_phase(params, 1)
    result = run_evaluate(params, Path(params.train.out_dir) / "phase1")
    plots = Path(params.evaluate.out_dir) / "plots"
    per_class = json.loads((plots / "per_class_accuracy.json").read_text())
    # training-count bins (10 distinct counts: one class each here), not class names
    assert sum(r["classes"] for r in per_class) == 10
    assert all(r["class"].endswith("classes)") and r["group"] in ("many", "medium", "few") for r in per_class)
    confusion = json.loads((plots / "confusion.json").read_text())
    assert {r["actual"] for r in confusion} <= {"many", "medium", "few"}
    report = result.report_path.read_text()
    assert "## Classes by training count" in report and "lowest test accuracy" in report


# ------------------------------------------------------------------------------------------ nodes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(command_for_rank, tmp_path: Path, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Run two launchers at once, node ranks 0 and 1, and wait for both."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    procs = [subprocess.Popen(command_for_rank(r), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outs.append(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
    finally:
        for p in procs:
            p.kill()
    return outs


def test_two_nodes_see_every_train_sample_exactly_once_per_epoch(tiny_shards: Params, tmp_path: Path) -> None:
    from pipelines.launch import Nodes, build_command

    params = make_tiny_params(tmp_path, data__out_dir=str(tiny_shards.data.out_dir))
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.to_dict()))
    out, port = tmp_path / "probe.json", _free_port()

    def command(node_rank: int) -> list[str]:
        # the launcher's own torchrun command for this node, running the probe instead of `-m lpt ...`
        cmd = build_command(1, ["lpt", "probe"], Nodes(nnodes=2, node_rank=node_rank, master_addr="127.0.0.1",
                                                        master_port=port))
        assert f"--node_rank={node_rank}" in cmd and "--nnodes=2" in cmd and "--standalone" not in cmd
        return cmd[: cmd.index("-m", 3)] + [str(REPO_ROOT / "tests/ddp_epoch_probe.py"), str(params_file), str(out)]

    runs = _two_nodes(command, tmp_path, timeout=120)
    assert all(r.returncode == 0 for r in runs), "\n".join(r.stdout[-2000:] for r in runs)
    probe = json.loads(out.read_text())
    ranks, n, batch = probe["ranks"], probe["num_samples"], probe["batch"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 and r["local_world_size"] == 1
                                                        for r in ranks)
    # instance-balanced stream: rank r holds global positions r, r + 2, ...; the epoch's first N draws are a
    # permutation of the N samples, the rest (floor(N / B) + 1 steps hold fewer than B more) its next cycle
    ib = np.empty(2 * len(ranks[0]["ib"]), dtype=np.int64)
    ib[0::2], ib[1::2] = ranks[0]["ib"], ranks[1]["ib"]
    assert sorted(ib[:n].tolist()) == list(range(n)), "each sample exactly once among the epoch's N draws"
    assert len(ib) == (n // batch + 1) * batch and len(ib) - n < batch
    # class-aware stream: the two ranks' groups interleave to one global sequence, none lost
    assert len(ranks[0]["cb"]) == len(ranks[1]["cb"]) == len(ranks[0]["ib"])
    # WebDataset stream (shards split by node, then by worker): every key exactly once over ranks x workers
    keys = Counter(k for r in ranks for k in r["keys"])
    from lpt.data.reader import ShardImages

    expected = ShardImages(Path(params.data.out_dir), "train").keys
    assert sorted(keys) == sorted(expected) and set(keys.values()) == {1}
    assert all(r["keys"] for r in ranks), "both nodes read shards"


def test_lpt_train_runs_on_two_nodes_of_one_process(tiny_shards: Params, tmp_path: Path) -> None:
    params = make_tiny_params(tmp_path, data__out_dir=str(tiny_shards.data.out_dir),
                              train__phase1__max_steps_per_epoch=3)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.to_dict()))
    port = _free_port()

    def command(node_rank: int) -> list[str]:
        return [sys.executable, "-m", "pipelines.launch", "--nproc", "1", "--nnodes", "2", "--node-rank",
                str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port), "--", "lpt", "train",
                "--phase", "1", "--params", str(params_file)]

    runs = _two_nodes(command, tmp_path, timeout=300)
    assert all(r.returncode == 0 for r in runs), "\n".join(r.stdout[-2000:] for r in runs)
    meta = json.loads((tmp_path / "models/phase1/model.json").read_text())
    assert meta["world_size"] == 2  # one process on each of two nodes; rank 0 (node 0) wrote the model


@pytest.mark.parametrize("env, message", [
    ({"LPT_NNODES": "two"}, "LPT_NNODES='two' is not an integer"),
    ({"LPT_NNODES": "2"}, "needs --master-addr"),
    ({"LPT_NNODES": "2", "LPT_NODE_RANK": "2", "LPT_MASTER_ADDR": "h"}, "must be in [0, 2)"),
])
def test_bad_node_settings_are_one_line(env: dict[str, str], message: str) -> None:
    from pipelines.launch import build_command, nodes_from_env

    with pytest.raises(ValueError) as err:
        build_command(1, ["lpt", "train"], nodes_from_env(env))
    assert message in str(err.value)


def test_nodes_come_from_the_environment_so_dvc_yaml_stays_the_same() -> None:
    from pipelines.launch import Nodes, nodes_from_env

    env = {"LPT_NNODES": "3", "LPT_NODE_RANK": "1", "LPT_MASTER_ADDR": " node0 ", "LPT_MASTER_PORT": "29600"}
    assert nodes_from_env(env) == Nodes(3, 1, "node0", 29600)
    assert nodes_from_env({}) == Nodes()
