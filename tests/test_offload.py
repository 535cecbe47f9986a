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
