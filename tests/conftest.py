"""Fixtures: a real daemon on a free loopback port, raw sockets to poke it with."""

from __future__ import annotations

import pytest

from livediffusion.daemon.server import Daemon
from livediffusion.shared import Client

from helpers import Raw


@pytest.fixture
def daemon():
    d = Daemon(port=0).start()
    yield d
    d.stop()


@pytest.fixture
def client(daemon):
    c = Client(daemon.endpoint, name="test").connect()
    yield c
    c.close()


@pytest.fixture
def raw(daemon):
    sockets: list[Raw] = []

    def make() -> Raw:
        r = Raw(daemon.endpoint)
        sockets.append(r)
        return r

    yield make
    for r in sockets:
        r.close()
