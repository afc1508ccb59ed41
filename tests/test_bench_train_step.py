"""bench.train_step: each variant really runs the model it names (phase, block reuse on or off)."""

from __future__ import annotations

import torch

from bench.train_step import PRESETS, VARIANTS, Bench


def test_each_variant_configures_the_phase_and_block_reuse_it_names() -> None:
    """Before the model's phase was fixed at construction, block_reuse was read once when the pool was built, so
    the bench's 'two passes' rows silently timed block reuse; each variant now gets the forward it names."""
    torch.set_num_threads(1)
    bench = Bench(PRESETS["tiny"], torch.device("cpu"), amp=False, batch=2)
    for name, (phase, reuse, train) in VARIANTS.items():
        bench.configure(phase, reuse, train)
        model = bench.model
        assert model.phase == phase and model.training == train, name
        if phase == 2:
            assert model.block_reuse == reuse, name
            calls = []
            model.forward_two_pass, original = (lambda x: calls.append(1) or original(x)), model.forward_two_pass
            with torch.no_grad():
                model(bench.x)
            del model.forward_two_pass  # the bound method again
            assert bool(calls) == (not reuse), name
