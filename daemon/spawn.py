"""Start a daemon in a child process (demo, benchmarks, tests): real process boundary,
real sockets, real shared memory."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import Iterator

from livediffusion.shared import Client

from .server import free_port


@contextlib.contextmanager
def spawned_daemon(engines: str = "passthrough", *, device: str = "cpu",
                   log_level: str = "warning", startup_timeout: float = 120.0,
                   extra: tuple[str, ...] = ()) -> Iterator[str]:
    """Yield the endpoint of a freshly started daemon; stop it with SIGINT afterwards."""
    port = free_port()
    cmd = [sys.executable, "-m", "livediffusion.daemon", "--log-level", log_level, "daemon",
           "--port", str(port), "--engines", engines, "--device", device, *extra]
    # Windows: a group of its own, so the stop signal below does not reach this console too
    flags = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, creationflags=flags)
    endpoint = f"tcp://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with status {proc.returncode} during "
                                   f"start-up (see its log above).")
            try:
                Client(endpoint, name="probe").connect(timeout=1.0).close()
                break
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the daemon did not answer within {startup_timeout:g} s.")
        yield endpoint
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT if os.name == "posix" else signal.CTRL_BREAK_EVENT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
