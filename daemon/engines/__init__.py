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


def _image_tiny(device: str) -> Engine:
    from .image.factory import build_image_engine
    return build_image_engine("tiny", device=device)


def _image(model: str) -> Callable[[str], Engine]:
    def factory(device: str) -> Engine:
        from .image.factory import build_real_image_engine
        return build_real_image_engine(model, device=device)
    return factory


def _video(size: str) -> Callable[[str], Engine]:
    def factory(device: str) -> Engine:
        from .video.factory import build_real_video_engine
        return build_real_video_engine(size, device=device)
    return factory


def _video_family(member: str) -> Callable[[str], Engine]:
    """Another causal generator of the Wan 2.1 family (models/family.py) on the Wan base."""
    def factory(device: str) -> Engine:
        from ..models.family import FAMILY
        from .video.factory import build_real_video_engine
        return build_real_video_engine(FAMILY[member].base, device=device, family=member,
                                       name=family_engine_name(member))
    return factory


def family_engine_name(member: str) -> str:
    """self-forcing-1.3b -> video-self-forcing (the 14B ones keep their size)."""
    return "video-" + member.removesuffix("-1.3b")


def _video_random(size: str) -> Callable[[str], Engine]:
    """The real architecture at its real size with RANDOM weights (umT5-XXL included, kept
    in host memory as the real engine does): for ``bench stream`` on a GPU, never loaded
    unless named."""
    def factory(device: str) -> Engine:
        from .video.factory import build_video_engine
        engine = build_video_engine(size, device=device)
        engine.name = f"video-{size}-random"
        return engine
    return factory


def _weights_present(*names: str) -> Callable[[], bool]:
    """Real engines need their weights and a CUDA GPU to be loaded by default."""
    def check() -> bool:
        import torch
        from ..models.registry import local_path
        return torch.cuda.is_available() and all(local_path(n) is not None for n in names)
    return check


REGISTRY["passthrough"] = (_passthrough, "frames back unchanged (or inverted), format-converted")
REGISTRY["video-tiny"] = (_video_tiny, "video engine, tiny random-weight Wan (abstract output)")
REGISTRY["video"] = (_video("1.3b"), "video engine, Wan 2.1 1.3B + StreamDiffusionV2 generator")
REGISTRY["video-14b"] = (_video("14b"), "video engine, Wan 2.1 14B + StreamDiffusionV2 generator")
def _register_family() -> None:
    from ..models.family import FAMILY
    for member, entry in FAMILY.items():
        if member.startswith("sdv2-"):
            continue   # "video" and "video-14b" are StreamDiffusionV2's
        name = family_engine_name(member)
        REGISTRY[name] = (_video_family(member), f"video engine, {entry.display} "
                          f"(Wan 2.1 {entry.base.upper()}, {entry.licence.spdx})")
        AVAILABLE_FAMILY[name] = (entry.base_entry, member)


#: family engines -> (the Wan base's registry name, the member's), for AVAILABLE
AVAILABLE_FAMILY: dict[str, tuple[str, str]] = {}
_register_family()

REGISTRY["video-1.3b-random"] = (_video_random("1.3b"),
                                 "video engine, Wan 2.1 1.3B size, RANDOM weights (benchmarks)")
REGISTRY["video-14b-random"] = (_video_random("14b"),
                                "video engine, Wan 2.1 14B size, RANDOM weights (benchmarks)")
REGISTRY["image-tiny"] = (_image_tiny, "image engine, tiny random-weight SD UNet (abstract output)")
REGISTRY["image"] = (_image("sd-turbo"), "image engine, sd-turbo 1 step + TAESD")
REGISTRY["image-sdxl-turbo"] = (_image("sdxl-turbo"), "image engine, sdxl-turbo + TAESDXL")
REGISTRY["image-sd15-lcm"] = (_image("sd15-lcm"), "image engine, SD 1.5 + LCM-LoRA, 2-4 steps")

#: engines that can split their DiT over pipeline ranks (``--gpus``), and the parts each
#: rank builds for them (see ``video.factory.build_parts``)
PIPELINE_PARTS: dict[str, str] = {
    "video-tiny": "random:tiny", "video": "real:1.3b", "video-14b": "real:14b",
    "video-1.3b-random": "random:1.3b", "video-14b-random": "random:14b",
}


def pipeline_factory(name: str, devices: tuple[str, ...]) -> Callable[[str], Engine]:
    """The factory of engine ``name`` split over ``devices`` (rank 0 on the first)."""
    def factory(device: str) -> Engine:
        from ..profiles import fp8_override
        from .video.pipelined import build_pipeline_engine
        spec = PIPELINE_PARTS[name] + ("@fp8" if fp8_override() else "")
        return build_pipeline_engine(spec, list(devices), name=name)
    return factory


#: engines whose step is a copy: they run on the daemon's front thread (a hand-off to the
#: engine thread would cost more than the step)
INLINE = {"passthrough"}

def _folder_of(size: str) -> bool:
    """Whether ``--weights DIR`` names a folder holding the Wan model of this size."""
    from .video.factory import weights_folder
    folder = weights_folder()
    if folder is None:
        return False
    from ..models import wan_folders
    try:
        return wan_folders.folder_size(folder) == size
    except Exception:  # noqa: BLE001 - the daemon's start reports an unusable folder
        return False


#: engines loaded when the daemon is started without --engines: those that need no download,
#: plus those whose weights are present
AVAILABLE: dict[str, Callable[[], bool]] = {
    "passthrough": lambda: True,
    "video-tiny": lambda: True,
    "video": lambda: _folder_of("1.3b") or _weights_present("wan-1.3b", "sdv2-1.3b")(),
    "video-14b": lambda: _folder_of("14b") or _weights_present("wan-14b", "sdv2-14b")(),
    "video-1.3b-random": lambda: False,  # benchmarks name them
    "video-14b-random": lambda: False,
    "image-tiny": lambda: True,
    "image": _weights_present("sd-turbo"),
    "image-sdxl-turbo": _weights_present("sdxl-turbo"),
    "image-sd15-lcm": _weights_present("sd15", "lcm-lora-sdv1-5"),
    **{name: _weights_present(*needs) for name, needs in AVAILABLE_FAMILY.items()},
}


def available_engines() -> tuple[str, ...]:
    return tuple(name for name in REGISTRY if AVAILABLE.get(name, lambda: True)())


def best_engine() -> str:
    """The most capable engine that can run here without downloads (used by the demo)."""
    for name in ("video", "video-tiny", "passthrough"):
        if name in REGISTRY and AVAILABLE.get(name, lambda: True)():
            return name
    return "passthrough"


__all__ = ["Engine", "EngineError", "INLINE", "PIPELINE_PARTS", "ParamError", "REGISTRY",
           "available_engines", "best_engine", "pipeline_factory"]
