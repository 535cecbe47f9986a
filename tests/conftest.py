"""Fixtures: a real daemon on a free loopback port, raw sockets to poke it with."""

from __future__ import annotations

import os

import pytest

from livediffusion.daemon.server import Daemon
from livediffusion.shared import Client

from helpers import Raw


@pytest.fixture(autouse=True, scope="session")
def _presets_file(tmp_path_factory):
    """Tests never touch the user's own presets (daemons started as processes inherit)."""
    os.environ.setdefault("LIVEDIFFUSION_PRESETS",
                          str(tmp_path_factory.mktemp("presets") / "presets.json"))


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


# --- the OBS plugin (plugins/obs): built once per session --------------------------------------

#: .ci/run sets this: there, a missing compiler, libzmq, libobs or OBS is a failure, not a skip
REQUIRE_OBS = os.environ.get("LIVEDIFFUSION_REQUIRE_OBS") == "1"


def skip_or_fail(reason: str):
    if REQUIRE_OBS:
        pytest.fail(f"{reason} (LIVEDIFFUSION_REQUIRE_OBS=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def obs_build(tmp_path_factory):
    """(build directory, whether the OBS module itself was built). The C client core and its
    test driver need only a C compiler, CMake and libzmq; the module also needs libobs."""
    from livediffusion.plugins.obs import build

    first_error = None
    for plugin in (True, False):
        try:
            path = build.build(tmp_path_factory.mktemp("obs-build"), plugin=plugin)
            if not plugin and REQUIRE_OBS:
                pytest.fail(f"the OBS plugin did not build: {first_error}")
            return path, plugin
        except build.BuildError as exc:
            first_error = first_error or exc
    skip_or_fail(f"the OBS plugin's C code cannot be built here: {first_error}")
