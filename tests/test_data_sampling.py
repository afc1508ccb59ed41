"""Class-aware and instance-balanced samplers: pattern, balance, exact resume, DDP split."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lpt.data.sampling import ClassAwareSampler, InstanceBalancedSampler

LABELS = np.repeat(np.arange(5), [40, 20, 8, 3, 1])


def test_class_aware_groups_of_k_and_one_cycle_visits_each_class() -> None:
    sampler = ClassAwareSampler(LABELS, samples_per_class=4, num_samples=200, seed=0)
    seq = np.array(list(sampler))
    assert len(seq) == len(sampler) == 200
    groups = LABELS[seq].reshape(-1, 4)
    assert (groups == groups[:, :1]).all(), "k consecutive images of one class"
    assert sorted(groups[:5, 0].tolist()) == list(range(5)), "a cycle visits every class once"
    counts = np.bincount(LABELS[seq], minlength=5)
    assert counts.max() - counts.min() <= 4, counts


def test_class_list_reshuffled_only_when_exhausted() -> None:
    sampler = ClassAwareSampler(LABELS, samples_per_class=4, num_samples=400, seed=3)
    seq = np.array(list(sampler))
    tail = seq[LABELS[seq] == 3]  # class 3 has three images
    for start in range(0, len(tail) - 2, 3):
        assert sorted(tail[start: start + 3].tolist()) == sorted(np.where(LABELS == 3)[0].tolist())


def test_epochs_differ_and_replay_identically() -> None:
    sampler = ClassAwareSampler(LABELS, num_samples=64, seed=0)
    first = list(sampler)
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first


@pytest.mark.parametrize("make", [
    lambda: ClassAwareSampler(LABELS, samples_per_class=4, num_samples=120, seed=5),
    lambda: InstanceBalancedSampler(len(LABELS), num_samples=120, seed=5),
])
def test_resume_continues_exactly(make) -> None:
    reference = make()
    reference.set_epoch(2)
    full = list(reference)
    interrupted = make()
    interrupted.set_epoch(2)
    head = list(itertools.islice(iter(interrupted), 37))
    state = interrupted.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the trainer's loop calls this again on resume: must keep the offset
    assert head + list(resumed) == full
    # with prefetching, the trainer passes what it actually consumed
    resumed.load_state_dict(interrupted.state_dict(consumed=30))
    assert full[:30] + list(resumed) == full


def test_state_of_another_setup_is_refused() -> None:
    state = ClassAwareSampler(LABELS, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        ClassAwareSampler(LABELS, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="kind"):
        InstanceBalancedSampler(len(LABELS), seed=1).load_state_dict(state)


def test_class_aware_ranks_get_whole_groups_of_one_global_sequence() -> None:
    single = list(ClassAwareSampler(LABELS, samples_per_class=4, num_samples=96, seed=0))
    ranks = [list(ClassAwareSampler(LABELS, samples_per_class=4, num_samples=96, seed=0, rank=r, world_size=3))
             for r in range(3)]
    assert [len(r) for r in ranks] == [32, 32, 32]
    interleaved = [i for groups in zip(*(np.reshape(r, (-1, 4)) for r in ranks)) for g in groups for i in g]
    assert interleaved == single
    for r in ranks:
        groups = LABELS[np.reshape(r, (-1, 4))]
        assert (groups == groups[:, :1]).all()


def test_instance_balanced_is_a_permutation_split_across_ranks() -> None:
    n = len(LABELS)
    whole = list(InstanceBalancedSampler(n, seed=0))
    assert sorted(whole) == list(range(n))
    ranks = [list(InstanceBalancedSampler(n, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == (n + 1) // 2
    assert set(ranks[0]) | set(ranks[1]) == set(range(n))
    assert len(set(ranks[0]) & set(ranks[1])) <= 1  # at most the one padding index repeats
