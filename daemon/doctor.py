"""``livediffusion doctor``: one screen of facts for a bug report."""

from __future__ import annotations

import argparse
import os
import importlib
import platform
import socket
import sys
from importlib.metadata import PackageNotFoundError, version

from . import __version__

PACKAGES = ["pyzmq", "msgpack", "numpy", "torch", "diffusers", "transformers", "huggingface_hub",
            "safetensors", "opencv-python-headless", "obsws-python", "pyvirtualcam", "SpoutGL"]

#: extra -> modules that must import for it to work
EXTRAS = {
    "core (client)": ["zmq", "msgpack", "numpy"],
    "daemon": ["torch", "diffusers", "transformers", "huggingface_hub", "cv2"],
    "obs": ["obsws_python"],
    "virtualcam": ["pyvirtualcam", "cv2"],
    "spout": ["SpoutGL"],
}

def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "-"


def _imports(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _profile_lines(device: str) -> list[str]:
    """What the video engines would choose on ``device`` (daemon/profiles.py)."""
    from . import profiles
    out = []
    for model in profiles.PROFILES:
        try:
            chosen = profiles.for_device(model, device)
            out.append(f"    video {model}: profile {chosen.name}: {chosen.summary()} "
                       f"({chosen.why})")
        except ValueError as exc:
            out.append(f"    video {model}: cannot run here: {exc}")
    return out


def run_doctor(args: argparse.Namespace) -> int:
    lines = [f"livediffusion {__version__}",
             f"python {sys.version.split()[0]} ({sys.executable})",
             f"platform {platform.platform()} {platform.machine()}"]
    try:
        import zmq
        lines.append(f"libzmq {zmq.zmq_version()}, CURVE {'yes' if zmq.has('curve') else 'no'}, "
                     f"ipc {'yes' if zmq.has('ipc') else 'no'}")
    except ImportError:
        lines.append("libzmq: pyzmq not installed")
    lines.append("")
    lines.append("packages:")
    for dist in PACKAGES:
        lines.append(f"  {dist:<24} {_version(dist)}")
    lines.append("")
    lines.append("extras:")
    for extra, modules in EXTRAS.items():
        missing = [m for m in modules if not _imports(m)]
        state = "ok" if not missing else f"missing {', '.join(missing)}"
        lines.append(f"  {extra:<16} {state}")
    lines.append("")
    lines.append("devices:")
    try:
        import torch
        lines.append(f"  torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}")
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(i)
                props = torch.cuda.get_device_properties(i)
                lines.append(f"  cuda:{i} {props.name}, capability {props.major}.{props.minor}, "
                             f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")
                lines += _profile_lines(f"cuda:{i}")
        else:
            lines.append("  no CUDA device: engines run on the CPU (tiny presets only)")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            lines.append("  Apple MPS available")
    except ImportError:
        lines.append("  torch not installed (pip install 'livediffusion[daemon]')")
    lines.append("")
    port_state = "free" if _port_free(args.port) else "IN USE (a daemon running, or another program)"
    lines.append(f"control port 127.0.0.1:{args.port}: {port_state}")
    lines.append("")
    from .config import ENVIRONMENT, env
    lines.append("settings (environment variables; * = set here):")
    for name, (default, about) in ENVIRONMENT.items():
        value = env(name)
        mark = "*" if name in os.environ else " "
        lines.append(f" {mark}{name:<28} {value or '-':<6} {about}")
    lines.append("")
    lines.append("weights (Hugging Face cache; fetch with 'livediffusion models pull NAME'):")
    try:
        from .models.registry import MODELS, local_path
        for entry in MODELS.values():
            state = "present" if local_path(entry.name) else "absent"
            lines.append(f"  {entry.name:<10} {state:<8} {entry.repo}")
    except ImportError as exc:
        lines.append(f"  cannot check ({exc})")
    print("\n".join(lines))
    return 0
