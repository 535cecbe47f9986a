"""Fill a folder that TouchDesigner's Python (3.11) reads: pyzmq and msgpack for TD's
platform, and the component's pure-Python code (the client library and livediffusion_td).
TD ships numpy itself.  ``livediffusion touchdesigner install DIR`` runs this."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

PLATFORMS = {"windows": ["win_amd64"],
             "mac": ["macosx_11_0_arm64", "macosx_10_9_x86_64", "macosx_10_9_universal2"]}


def default_platform() -> str:
    return "mac" if sys.platform == "darwin" else "windows"  # TD has no Linux build


def install(target: str | Path, platform: str | None = None, pip: bool = True) -> Path:
    target = Path(target).expanduser().resolve()
    target.mkdir(parents=True, exist_ok=True)
    if pip:
        tags = []
        for tag in PLATFORMS[platform or default_platform()]:
            tags += ["--platform", tag]
        subprocess.run([sys.executable, "-m", "pip", "install", "--upgrade", "--target",
                        str(target), "--only-binary=:all:", "--python-version", "3.11",
                        *tags, "pyzmq>=25", "msgpack>=1.0"], check=True)
    here = Path(__file__).resolve().parent
    root = target / "livediffusion"
    for src, dst in ((here.parent.parent / "shared", root / "shared"),
                     (here, root / "plugins" / "touchdesigner")):
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.tox"))
    (root / "plugins" / "__init__.py").write_text('"""Thin clients for the artists\' tools."""\n')
    return target
