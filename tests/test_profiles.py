"""Memory profiles: chosen from the GPU's free memory, overridable, and applied by the
video engine (size cap, default steps and decoder, umT5 placement, FP8)."""

from __future__ import annotations

import pytest
import torch

from livediffusion.daemon import profiles
from livediffusion.daemon.engines.base import ParamError, StreamConfig
from livediffusion.daemon.engines.video.engine import VideoEngine
from livediffusion.daemon.engines.video.factory import build_video_parts
from livediffusion.shared.protocol import FrameSpec


@pytest.mark.parametrize("model,free,fp8_ok,name", [
    ("1.3b", 139.0, True, "roomy"),
    ("1.3b", 31.0, True, "32gb"),       # an RTX 5090
    ("1.3b", 23.0, True, "16gb"),       # a 24 GB card: 832 px, FP8 for the memory
    ("1.3b", 15.2, True, "16gb"),       # a 16 GB Ada card: FP8
    ("1.3b", 15.2, False, "16gb-bf16"), # a 16 GB Ampere card: no FP8 matmuls
    ("1.3b", 11.0, True, "12gb"),
    ("14b", 139.0, True, "roomy"),      # an H200: FP8 (faster for the 14B model)
    ("14b", 79.0, False, "roomy-bf16"), # an A100 80 GB: no FP8 matmuls
    ("14b", 47.0, True, "48gb"),
    ("14b", 31.0, True, "32gb"),        # 14B on an RTX 5090, in FP8, 1 step
])
def test_the_first_profile_that_fits_is_chosen(model, free, fp8_ok, name, monkeypatch):
    monkeypatch.delenv("LIVEDIFFUSION_PROFILE", raising=False)
    monkeypatch.delenv("LIVEDIFFUSION_FP8", raising=False)
    chosen = profiles.choose(model, free, fp8_ok)
    assert chosen.name == name
    assert chosen.needs_gib <= free and (fp8_ok or not chosen.fp8)
    assert f"{free:.1f} GiB free" in chosen.why and chosen.name in chosen.why
    assert chosen.summary()   # one line for the log, the welcome and doctor


def test_no_profile_fits_is_a_sentence_saying_what_would(monkeypatch):
    monkeypatch.delenv("LIVEDIFFUSION_PROFILE", raising=False)
    with pytest.raises(ValueError, match=r"14b video model needs 50\.0 GiB.*or 29\.8 GiB "
                                         r"with FP8.*has 23\.0 GiB free and no FP8 matmuls"
                                         r".*1\.3B"):
        profiles.choose("14b", 23.0, False)   # a 24 GB Ampere card
    with pytest.raises(ValueError, match=r"14b video model.*29\.8 GiB with FP8.*23\.0 GiB "
                                         r"free\. The 1\.3B"):
        profiles.choose("14b", 23.0, True)    # a 24 GB Ada card: not yet (issue 15)
    with pytest.raises(ValueError, match=r"needs 10\.5 GiB.*or 9\.7 GiB with FP8"):
        profiles.choose("1.3b", 6.0, True)


def test_a_profile_by_name_and_fp8_by_the_environment_override_the_choice(monkeypatch):
    monkeypatch.setenv("LIVEDIFFUSION_PROFILE", "12gb")
    chosen = profiles.choose("1.3b", 139.0, True)
    assert chosen.name == "12gb" and "asked for" in chosen.why
    assert profiles.choose("1.3b", 139.0, True, name="auto").name == "roomy"
    with pytest.raises(ValueError, match="no profile 'huge'.*roomy"):
        profiles.choose("1.3b", 139.0, True, name="huge")
    monkeypatch.setenv("LIVEDIFFUSION_PROFILE", "auto")
    monkeypatch.setenv("LIVEDIFFUSION_FP8", "1")
    chosen = profiles.choose("1.3b", 139.0, True)
    assert chosen.fp8 and chosen.name == "roomy" and "LIVEDIFFUSION_FP8" in chosen.why
    with pytest.raises(ValueError, match="no FP8 matmuls"):
        profiles.choose("1.3b", 139.0, False)
    monkeypatch.setenv("LIVEDIFFUSION_FP8", "0")
    assert not profiles.choose("1.3b", 15.2, True).fp8
    assert not profiles.choose("14b", 139.0, True).fp8


def test_no_profile_on_a_cpu():
    assert profiles.for_device("1.3b", "cpu") is None


def test_doctor_lists_each_video_models_profile_per_gpu(monkeypatch):
    from livediffusion.daemon import doctor
    monkeypatch.delenv("LIVEDIFFUSION_PROFILE", raising=False)
    monkeypatch.delenv("LIVEDIFFUSION_FP8", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (15 * 2**30, 16 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "RTX 4080")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 9))
    lines = doctor._profile_lines("cuda:0")
    assert "video 1.3b: profile 16gb: FP8 DiT" in lines[0] and "RTX 4080" in lines[0]
    assert "video 14b: cannot run here" in lines[1] and "29.8 GiB with FP8" in lines[1]


def _engine(profile):
    parts = build_video_parts("tiny")
    return VideoEngine("video-tiny", parts.transformer, parts.vae, parts.text,
                       tiny_decoder=parts.tiny_decoder, min_side=parts.min_side,
                       profile=profile)


def test_the_engine_serves_what_its_profile_says():
    profile = profiles.Profile("small", 8.0, False, "streamed", 128, 1, "tiny", why="a test")
    engine = _engine(profile)
    caps = engine.capabilities()
    assert caps["profile"]["name"] == "small" and caps["sizes"]["max"] == 128
    assert caps["params"]["steps"] == 1 and caps["params"]["decoder"] == "tiny"
    spec = FrameSpec(64, 64)
    opened = engine.open_stream(StreamConfig(1, spec, spec, 30.0, {}))
    assert opened["steps"] == 1 and opened["decoder"] == "tiny"
    opened = engine.open_stream(StreamConfig(2, spec, spec, 30.0, {"steps": 2}))
    assert opened["steps"] == 2   # a stream may still ask for other values
    big = FrameSpec(256, 64)
    with pytest.raises(ParamError, match="up to|from 32 to 128.*memory profile small: a test"):
        engine.open_stream(StreamConfig(3, big, big, 30.0, {}))
    assert engine.text_placement == "resident"   # on a CPU there is nothing to offload to
    no_profile = _engine(None).capabilities()
    assert no_profile["profile"] is None and no_profile["params"]["steps"] == 2
