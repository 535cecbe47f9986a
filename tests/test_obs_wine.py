"""The OBS plugin's C client core built for Windows (MinGW) and run under Wine (issue 18):
its Windows branches really run, not only compile.

- ``ld_selftest.exe bench`` and ``client`` against a real daemon here, inline transport across
  the Wine boundary: round trips, a live parameter change seen in the pixels, and the
  reconnect logic (the daemon starts after the client).
- ``ring-create`` / ``ring-write`` / ``ring-read`` in three Wine processes: OpenFileMappingW
  rings shared between Windows processes, the frame checked against the pattern.

libzmq for Windows comes from pyzmq 25.1.2's win_amd64 wheel on PyPI (the newer wheels link
it statically into their extension), downloaded once per run.  Debian's wine and
gcc-mingw-w64 are needed (``.ci/run`` installs them; LIVEDIFFUSION_REQUIRE_OBS=1 turns their
absence into a failure).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import skip_or_fail
from test_obs_plugin import pattern

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="Wine runs on POSIX")
WINE = "/usr/lib/wine/wine64"
PYZMQ_WIN = "pyzmq==25.1.2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def exe(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """ld_selftest.exe beside its DLLs, and the environment Wine runs it in."""
    from livediffusion.plugins.obs.build import SOURCE_DIR
    gcc = shutil.which("x86_64-w64-mingw32-gcc")
    if gcc is None or not os.path.exists(WINE):
        skip_or_fail("MinGW or Wine is missing (apt-get install gcc-mingw-w64-x86-64 wine64)")
    root = tmp_path_factory.mktemp("wine")
    got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", PYZMQ_WIN,
                          "--platform", "win_amd64", "--python-version", "3.11",
                          "--only-binary=:all:", "--no-deps", "-d", str(root)],
                         capture_output=True, text=True, timeout=300)
    wheels = list(root.glob("pyzmq-*.whl"))
    if got.returncode != 0 or not wheels:
        skip_or_fail(f"no Windows libzmq: pip could not fetch {PYZMQ_WIN} ({got.stderr[-200:]})")
    with zipfile.ZipFile(wheels[0]) as z:
        for name in z.namelist():
            if name.startswith("pyzmq.libs/") and name.endswith(".dll"):
                target = root / Path(name).name
                target.write_bytes(z.read(name))
    libzmq = next(root.glob("libzmq-*.dll"))
    # the delocated file keeps the DLL name the import table asks for, minus its hash
    shutil.copy(libzmq, root / (libzmq.name.rsplit("-", 1)[0] + ".dll"))
    sources = [SOURCE_DIR / s for s in ("src/ld_msgpack.c", "src/ld_ring.c", "src/ld_schema.c",
                                        "src/ld_client.c", "tests/ld_selftest.c")]
    built = subprocess.run([gcc, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror",
                            "-Wno-format-truncation", "-idirafter", "/usr/include",
                            "-I", str(SOURCE_DIR / "src"), *map(str, sources), str(libzmq),
                            "-lws2_32", "-o", str(root / "ld_selftest.exe")],
                           capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    env = {**os.environ, "WINEDEBUG": "-all", "WINEPREFIX": str(root / "prefix")}
    subprocess.run([WINE, "cmd", "/c", "exit"], env=env, capture_output=True, timeout=180)
    return root / "ld_selftest.exe", env


def wine(exe, *args: str, env: dict[str, str], timeout: float = 60):
    return subprocess.run([WINE, str(exe[0]), *args], capture_output=True, text=True,
                          env={**exe[1], **env}, timeout=timeout, cwd=exe[0].parent)


def test_the_windows_client_core_streams_through_a_daemon_across_the_wine_boundary(
        exe, tmp_path):
    port = _free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    env = {"LD_SELFTEST_TRANSPORT": "inline"}
    # the client starts first: it must keep reconnecting until the daemon is there
    client = subprocess.Popen([WINE, str(exe[0]), "client", endpoint, "passthrough", "64",
                               "48", "5", "", "mode=invert", str(tmp_path / "out"), "60"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**exe[1], **env}, cwd=exe[0].parent)
    time.sleep(2.0)
    daemon = subprocess.Popen([sys.executable, "-m", "livediffusion.daemon", "daemon", "--port",
                               str(port), "--engines", "passthrough"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "LIVEDIFFUSION_PRESETS":
                                   str(tmp_path / "presets.json")})
    try:
        out, _ = client.communicate(timeout=120)
        assert client.returncode == 0, out
        # it found no daemon first, then reconnected by itself once the daemon was up
        assert "status no daemon at" in out and "status streaming passthrough 64x48" in out
        first = np.fromfile(tmp_path / "out.1", np.uint8).reshape(48, 64, 4)
        second = np.fromfile(tmp_path / "out.2", np.uint8).reshape(48, 64, 4)
        # identity, then the live change: inverted (G and R of the test pattern do not move
        # from frame to frame; B does, with the frame's seq)
        np.testing.assert_array_equal(second[..., 1:3], 255 - first[..., 1:3])
        assert (first[..., 3] == 255).all() and (second[..., 3] == 255).all()
        bench = wine(exe, "bench", endpoint, "64", "48", "30", env=env)
        assert bench.returncode == 0, bench.stdout + bench.stderr
        fields = bench.stdout.split()
        p50, fps = float(fields[1]), float(fields[5])
        assert 0 < p50 < 200 and fps > 5, bench.stdout
    finally:
        daemon.terminate()
        daemon.wait(30)
        if client.poll() is None:
            client.kill()


def test_rings_are_shared_between_windows_processes(exe, tmp_path):
    name = f"Local\\ldwine{os.getpid()}"
    holder = subprocess.Popen([WINE, str(exe[0]), "ring-create", name, "3", "4096", "20"],
                              stdout=subprocess.PIPE, text=True, env=exe[1],
                              cwd=exe[0].parent)
    try:
        assert holder.stdout.readline().startswith(f"created {name}")
        wrote = wine(exe, "ring-write", name, "1", "7", "16", "16", "42", env={})
        assert wrote.returncode == 0 and wrote.stdout.split()[:4] == \
            ["slots", "3", "capacity", "4096"], wrote.stdout + wrote.stderr
        read = wine(exe, "ring-read", name, "1", "7", str(tmp_path / "frame"), env={})
        assert read.returncode == 0 and read.stdout.split()[:3] == ["ok", "16", "16"], \
            read.stdout + read.stderr
        frame = np.fromfile(tmp_path / "frame", np.uint8).reshape(16, 16, 4)
        np.testing.assert_array_equal(frame, pattern(16, 16, 7))
        # a stale sequence number is refused (the seqlock check on Windows too)
        stale = wine(exe, "ring-read", name, "1", "6", str(tmp_path / "g"), env={})
        assert stale.stdout.startswith("torn"), stale.stdout
    finally:
        holder.kill()
        holder.wait(10)
