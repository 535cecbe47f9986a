"""Engines and the registry the daemon builds them from."""

from __future__ import annotations

from typing import Callable

from .base import Engine, EngineError, ParamError

#: engine name -> (factory(device) -> Engine, one line of description)
REGISTRY: dict[str, tuple[Callable[[str], Engine], str]] = {}


def _passthrough(device: str) -> Engine:
    from .passthrough import PassthroughEngine
    return PassthroughEngine(device)


def _video_tiny(device: str) -> Engine:
    from .video.factory import build_video_engine
    return build_video_engine("tiny", device=device)


REGISTRY["passthrough"] = (_passthrough, "frames back unchanged (or inverted), format-converted")
REGISTRY["video-tiny"] = (_video_tiny, "video engine, tiny random-weight Wan (abstract output)")


def best_engine() -> str:
    """The most capable engine that can run here without downloads (used by the demo)."""
    for name in ("video-tiny", "passthrough"):
        if name in REGISTRY:
            return name
    return "passthrough"


__all__ = ["Engine", "EngineError", "ParamError", "REGISTRY", "best_engine"]
