"""The text encoder's home in host memory, visiting the compute device per prompt."""

from __future__ import annotations

import pytest
import torch

from livediffusion.daemon.models.offload import Offloaded
from livediffusion.daemon.models.wan import PRESETS, build_text_encoder


@pytest.fixture()
def encoder():
    torch.manual_seed(0)
    return build_text_encoder(PRESETS["tiny"], torch.float32, "cpu")[1]


def test_a_visit_computes_the_same_and_leaves_the_weights_at_home(encoder):
    ids = torch.randint(2, 300, (1, 12))
    mask = torch.ones_like(ids)
    expected = encoder(ids, mask).last_hidden_state
    home = Offloaded(encoder, "cpu")
    host = [p.data_ptr() for p in encoder.parameters()]
    with home.visit() as device:
        assert device.type == "cpu"
        got = encoder(ids.to(device), mask.to(device)).last_hidden_state
    torch.testing.assert_close(got, expected)
    assert [p.data_ptr() for p in encoder.parameters()] == host  # back home, no copies kept
    assert home.visits == 1 and home.fallbacks == 0
    assert home.nbytes == sum(p.numel() * 4 for p in encoder.parameters()) + \
        sum(b.numel() * b.element_size() for b in encoder.buffers())


def test_no_room_on_the_device_means_an_encode_in_host_memory(encoder, monkeypatch):
    home = Offloaded(encoder, "cpu")
    home.device = torch.device("meta")  # a device the test can refuse
    real_to = torch.Tensor.to

    def refuse(self, *args, **kwargs):
        if args and str(args[0]) == "meta":
            raise torch.OutOfMemoryError("simulated")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", refuse)
    with home.visit() as device:
        assert device.type == "cpu"
        assert all(p.device.type == "cpu" for p in encoder.parameters())
    assert home.fallbacks == 1 and home.visits == 0


def test_a_streamed_visit_brings_one_layer_at_a_time_and_keeps_the_embedding_home(encoder):
    """16-24 GB cards: the layers come over one by one, each only while it runs, and the
    token embedding never travels (the lookup runs at home); the result is the same."""
    ids = torch.randint(2, 300, (1, 12))
    mask = torch.ones_like(ids)
    expected = encoder(ids, mask).last_hidden_state
    home = Offloaded(encoder, "cpu", streamed=True)
    layers = list(encoder.encoder.block)
    host = {id(p): p.data_ptr() for p in encoder.parameters()}
    seen = []

    def check(i):
        def hook(module, args):
            # this layer's weights are visiting copies, every other layer's are at home
            assert all(p.data_ptr() != host[id(p)] for p in layers[i].parameters())
            for j, other in enumerate(layers):
                if j != i:
                    assert all(p.data_ptr() == host[id(p)] for p in other.parameters())
            assert encoder.shared.weight.data_ptr() == host[id(encoder.shared.weight)]
            seen.append(i)
        return hook

    handles = [layer.register_forward_pre_hook(check(i)) for i, layer in enumerate(layers)]
    with home.visit() as device:
        got = encoder(ids.to(device), mask.to(device)).last_hidden_state
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(got, expected)
    assert seen == list(range(len(layers))) and home.peak_layers == 1
    assert all(p.data_ptr() == host[id(p)] for p in encoder.parameters())
    embedding = encoder.shared.weight.numel() * 4
    layer = sum(p.numel() * 4 for p in layers[0].parameters())
    rest = home.nbytes - embedding - len(layers) * layer  # final norm, not in a layer
    assert home.visit_nbytes == layer + rest  # one layer at a time, never the embedding
    # outside a visit the hooks do nothing: the encoder runs where its weights are
    torch.testing.assert_close(encoder(ids, mask).last_hidden_state, expected)
