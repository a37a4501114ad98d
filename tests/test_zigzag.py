"""The zig-zag order of one token step (scheduler.zigzag_order), without a model."""

from __future__ import annotations

import pytest

from flexgen.scheduler import zigzag_order

SHAPES = [(1, range(1)), (4, range(1)), (5, range(3)), (3, range(2, 4))]   # (layers, gpu batches)


@pytest.mark.parametrize("num_layers,batches", SHAPES)
def test_layer_major_and_every_batch_visits_every_layer_in_order(num_layers, batches):
    order = zigzag_order(num_layers, batches)
    assert [(s.layer, s.batches) for s in order] == [(j, (k,)) for j in range(num_layers) for k in batches]
    for k in batches:
        assert [s.layer for s in order if s.batches == (k,)] == list(range(num_layers))


@pytest.mark.parametrize("num_layers,batches", SHAPES)
def test_each_layers_weights_are_loaded_once_per_token_step(num_layers, batches):
    order = zigzag_order(num_layers, batches)
    firsts = [s for s in order if s.first]
    # Sequential: a layer's weights are requested (and taken) at its first batch only.
    assert [s.layer for s in firsts] == list(range(num_layers))
    assert all(s.batches == (batches[0],) for s in firsts)
    # Overlapped: layer 0 is requested before the step, each first batch requests the
    # next layer: every layer once, layer 0 again for the next token step.
    requested = [0] + [s.next_weight for s in firsts]
    assert requested == list(range(num_layers)) + [0]


@pytest.mark.parametrize("num_layers,batches", SHAPES)
def test_prefetch_targets_are_the_following_steps(num_layers, batches):
    order = zigzag_order(num_layers, batches)
    # The next two positions in compute order, running on into the next token steps.
    stream = [(d, s.layer, s.batches) for d in range(3) for s in order]
    for n, s in enumerate(order):
        assert s.ahead == (stream[n + 1], stream[n + 2])
        assert s.next == ((order[n + 1].layer, order[n + 1].batches) if n + 1 < len(order) else None)
    later = [s for s in order[1:] if s.first]   # the next layer's first batch takes what was requested
    assert [s.next_weight for s in order if s.first][:-1] == [s.layer for s in later]


@pytest.mark.parametrize("num_layers,batches", SHAPES)
def test_a_merged_layer_computes_every_batch_in_one_step(num_layers, batches):
    merged = frozenset(range(1, num_layers, 2))
    order = zigzag_order(num_layers, batches, merged)
    want = []
    for j in range(num_layers):
        want += [(j, tuple(batches))] if j in merged and len(batches) > 1 else [(j, (k,)) for k in batches]
    assert [(s.layer, s.batches) for s in order] == want
    # Still one weight request and one take per layer, at the layer's first step.
    assert [s.layer for s in order if s.first] == list(range(num_layers))
    stream = [(d, s.layer, s.batches) for d in range(3) for s in order]
    for n, s in enumerate(order):
        assert s.ahead == (stream[n + 1], stream[n + 2])
    # Without layer 0 merged, the next token step starts the same way with or without
    # merged layers, so an unmerged prefill's last steps look ahead into a merged decode.
    plain = zigzag_order(num_layers, batches)
    assert plain[-1].ahead == order[-1].ahead


def test_steps_are_frozen():
    step = zigzag_order(2, range(1))[0]
    with pytest.raises(AttributeError):
        step.layer = 1
