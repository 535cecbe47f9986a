"""The causal Wan family (daemon/models/family.py) and the registry's pull/verify/list.

Every member's checkpoint layout is written at the tiny preset's shapes (container key,
wrapper prefixes, original Wan key names) and loaded back through load_family_generator; the
Hub is faked (monkeypatched huggingface_hub functions over a cache laid out as the real one).
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

import pytest
import torch

from livediffusion.daemon.models import family, registry
from livediffusion.daemon.models.family import FAMILY, load_family_generator
from livediffusion.daemon.models.loaders import WeightsError
from livediffusion.daemon.models.wan import PRESETS, build_transformer

from test_video_loaders import _assert_same_weights, _randomize, original_dit_state_dict

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    return _randomize(build_transformer(TINY), seed=11)


@pytest.fixture(scope="module")
def original(dit):
    return original_dit_state_dict(dit)


def _layout(entry, sd: dict[str, torch.Tensor]) -> dict:
    """``sd`` as the member's real checkpoint stores it (from the authors' loading code)."""
    wrapped = {"model." + k: v for k, v in sd.items()}   # WanDiffusionWrapper.model
    if not entry.keys:
        return wrapped                                    # Reward Forcing: bare, 'model.'
    if entry.name.startswith("causal-forcing") and "framewise" in entry.files[0]:
        # FSDP-wrapped EMA names, which Causal Forcing's inference.py rewrites
        wrapped = {"model._fsdp_wrapped_module." + k: v for k, v in sd.items()}
    return {entry.keys[0]: wrapped, "step": 3000}


# --------------------------------------------------------------------------- loading

@pytest.mark.parametrize("name", [n for n in FAMILY if not FAMILY[n].lora_file])
def test_every_member_loads_from_its_layout(name, dit, original, tmp_path):
    entry = FAMILY[name]
    path = tmp_path / Path(entry.files[0]).name
    torch.save(_layout(entry, original), path)

    model = load_family_generator(entry, path, "tiny", dtype=torch.float32)

    _assert_same_weights(model, dit)


def test_longlive_merges_its_lora(dit, original, tmp_path):
    entry = FAMILY["longlive-1.3b"]
    root = tmp_path / "snap"
    (root / "models").mkdir(parents=True)
    g = torch.Generator().manual_seed(5)
    base = dict(original)  # adapted weights below become W - delta: base + LoRA = source
    lora, r = {}, 4
    for module in ("blocks.0.self_attn.q", "blocks.1.cross_attn.o", "blocks.0.ffn.0"):
        w = original[module + ".weight"]
        a = torch.randn(r, w.shape[1], generator=g)
        b = torch.randn(w.shape[0], r, generator=g)
        scale = entry.lora_alpha / entry.lora_rank
        base[module + ".weight"] = w - scale * (b @ a)
        lora[f"base_model.model.{module}.lora_A.weight"] = a
        lora[f"base_model.model.{module}.lora_B.weight"] = b
    torch.save({"generator": {"model." + k: v for k, v in base.items()}},
               root / "models/longlive_base.pt")
    torch.save({"generator_lora": lora}, root / "models/lora.pt")

    model = load_family_generator(entry, root / "models/longlive_base.pt", "tiny",
                                  dtype=torch.float32)

    a, b = model.state_dict(), dit.state_dict()
    for k in b:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_longlive_without_its_lora_is_one_sentence(original, tmp_path):
    path = tmp_path / "longlive_base.pt"
    torch.save({"generator": {"model." + k: v for k, v in original.items()}}, path)
    with pytest.raises(WeightsError, match=r"needs its adapter models/lora.pt") as exc:
        load_family_generator("longlive-1.3b", path, "tiny", dtype=torch.float32)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("name,bad,match", [
    ("self-forcing-1.3b", lambda sd: {"model": sd}, "hold a state dict under 'generator_ema'"),
    ("causvid-1.3b", lambda sd: {"generator_ema": sd}, "hold a state dict under 'generator'"),
    ("reward-forcing-1.3b", lambda sd: {"generator": sd}, "hold a bare state dict"),
    ("causal-forcing-1.3b", lambda sd: {"generator": {"x." + k: v for k, v in sd.items()}},
     "no original Wan 2.1 DiT keys"),
])
def test_a_wrong_layout_fails_with_one_sentence(name, bad, match, original, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save(bad(dict(original)), path)
    with pytest.raises(WeightsError, match=match) as exc:
        load_family_generator(name, path, "tiny", dtype=torch.float32)
    assert "\n" not in str(exc.value) and str(exc.value).endswith((".", "?"))


def test_diffusers_keys_and_a_wrong_size_are_named(dit, original, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"generator_ema": {"model." + k: v for k, v in dit.state_dict().items()}}, path)
    with pytest.raises(WeightsError, match="diffusers key names"):
        load_family_generator("self-forcing-1.3b", path, "tiny", dtype=torch.float32)
    torch.save({"generator_ema": dict(original)}, path)
    with pytest.raises(WeightsError, match="has 2 transformer blocks but the 1.3b preset "
                                           "has 30: wrong model size"):
        load_family_generator("self-forcing-1.3b", path, dtype=torch.float32)


# --------------------------------------------------------------------------- schedules

def test_warped_timesteps_follow_the_shifted_scheduler():
    sf = FAMILY["self-forcing-1.3b"].schedule
    # Self-Forcing's FlowMatchScheduler(shift=5, sigma_min=0, extra_one_step=True) table at
    # index 1000 - t: sigma = 5u / (1 + 4u), u = t / 1000
    assert sf.sampling_timesteps() == pytest.approx((1000.0, 937.5, 833.333333, 625.0))
    assert FAMILY["causvid-1.3b"].schedule.sampling_timesteps() == (1000.0, 757.0, 522.0)
    assert FAMILY["sdv2-1.3b"].schedule.sampling_timesteps((700, 500)) == (700.0, 500.0)


def test_schedules_are_coherent():
    for e in FAMILY.values():
        s = e.schedule
        assert s is not None, e.name
        assert 0 <= s.sinks < s.window and s.chunk_frames >= 1 and s.first_chunk_frames >= 1
        assert list(s.timesteps) == sorted(s.timesteps, reverse=True)
        assert s.prompt_switch in ("none", "recache")
        assert (s.recache_frames > 0) == (s.prompt_switch == "recache")
        assert (s.v2v == "noise_scale") == (s.noise_scale is not None)
        assert e.base in ("1.3b", "14b") and e.size_bytes > 1e9 and e.licence.spdx
        assert e.name in registry.MODELS and registry.MODELS[e.name].allow == e.files
    assert FAMILY["longlive-1.3b"].schedule.prompt_switch == "recache"


# --------------------------------------------------------------------------- fake Hub

def _blob(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hugging Face cache laid out as huggingface_hub lays it out, and a fake Hub."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    contents: dict[str, dict[str, bytes]] = {}

    def put(repo: str, files: dict[str, bytes], rev: str = "abc123"):
        """Write files into the cache as a completed snapshot_download would."""
        contents.setdefault(repo, {}).update(files)
        root = cache / f"models--{repo.replace('/', '--')}"
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(rev)
        for rel, data in files.items():
            blob = root / "blobs" / _blob(data)
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = root / "snapshots" / rev / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.exists() or link.is_symlink():
                link.unlink()
            link.symlink_to(os.path.relpath(blob, link.parent))
        return root / "snapshots" / rev

    calls = []

    def fake_snapshot_download(repo_id, *, allow_patterns=None, local_files_only=False,
                               cache_dir=None, **kw):
        from huggingface_hub.errors import LocalEntryNotFoundError
        calls.append((repo_id, tuple(allow_patterns or ()), local_files_only))
        snap = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "abc123"
        if local_files_only:
            if not snap.exists():
                raise LocalEntryNotFoundError("not cached")
            return str(snap)
        return str(put(repo_id, {f: served[repo_id][f] for f in allow_patterns}))

    served: dict[str, dict[str, bytes]] = {}

    class FakeApi:
        def model_info(self, repo_id, files_metadata=False, **kw):
            from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling
            if not hub_online[0]:
                raise OSError("offline")
            sib = [RepoSibling(f, size=len(d), blob_id="0" * 40,
                               lfs=BlobLfsInfo(size=len(d), sha256=_blob(d), pointer_size=1))
                   for f, d in served[repo_id].items()]
            return type("Info", (), {"siblings": sib, "sha": "abc123"})()

    hub_online = [True]
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return argparse.Namespace(cache=cache, put=put, served=served, calls=calls,
                              online=hub_online)


def _small(entry_name: str, monkeypatch, files: dict[str, bytes]):
    """Shrink a registry entry's announced size to the fake files'."""
    entry = registry.MODELS[entry_name]
    monkeypatch.setitem(registry.MODELS, entry_name,
                        registry.ModelEntry(entry.name, entry.repo, entry.what, entry.allow,
                                            entry.licence, sum(map(len, files.values()))))


def _cli(*argv):
    from livediffusion.daemon.cli import build_parser
    args = build_parser().parse_args(["models", *argv])
    return args.func(args)


def test_pull_shows_the_licence_checks_space_then_downloads(hub, monkeypatch, capsys):
    files = {"checkpoints/self_forcing_dmd.pt": b"weights" * 100}
    hub.served["gdhe17/Self-Forcing"] = files
    _small("self-forcing-1.3b", monkeypatch, files)

    assert _cli("pull", "self-forcing-1.3b") == 0

    out = capsys.readouterr().out
    assert out.index("licence: Apache-2.0") < out.index("is in")
    assert hub.calls[-1] == ("gdhe17/Self-Forcing", ("checkpoints/self_forcing_dmd.pt",), False)
    assert registry.local_path("self-forcing-1.3b") is not None


def test_pull_refuses_when_the_disk_is_too_small(hub, monkeypatch, capsys):
    from livediffusion.daemon.cli import CliError
    hub.served["tianweiy/CausVid"] = {"autoregressive_checkpoint/model.pt": b"x"}
    hub.online[0] = False  # no listing from the Hub: the registry's size is the estimate
    monkeypatch.setattr(registry.shutil, "disk_usage",
                        lambda p: argparse.Namespace(total=10**12, used=10**12 - 10**9,
                                                     free=10**9))
    with pytest.raises(CliError) as exc:
        _cli("pull", "causvid-1.3b")
    msg = str(exc.value)
    assert "needs about 11.4 GB" in msg and "1.0 GB free" in msg and "\n" not in msg
    assert not any(not c[2] for c in hub.calls)  # nothing was downloaded
    assert "CC-BY-NC-SA-4.0" in capsys.readouterr().out  # the licence came first


def test_verify_online_and_offline(hub, monkeypatch, capsys):
    data = b"reward" * 50
    hub.served["JaydenLu666/Reward-Forcing-T2V-1.3B"] = {"rewardforcing.pt": data}
    snap = hub.put("JaydenLu666/Reward-Forcing-T2V-1.3B", {"rewardforcing.pt": data})

    report = registry.verify("reward-forcing-1.3b")
    assert report.ok and report.online and report.files[0].sha256_ok

    assert _cli("verify", "reward-forcing-1.3b") == 0
    assert "sha256 matches the Hub" in capsys.readouterr().out

    hub.online[0] = False
    report = registry.verify("reward-forcing-1.3b")
    assert report.ok and not report.online
    assert any("offline" in n for n in report.notes)

    # a corrupted blob: size differs from the Hub's, sha256 differs from its cache name
    blob = (snap / "rewardforcing.pt").resolve()
    blob.write_bytes(data[:-1] + b"X")
    assert not registry.verify("reward-forcing-1.3b").ok
    hub.online[0] = True
    bad = registry.verify("reward-forcing-1.3b")
    assert not bad.ok and bad.files[0].sha256_ok is False
    assert _cli("verify", "reward-forcing-1.3b") == 1


def test_verify_names_missing_files(hub, capsys):
    hub.served["zhuhz22/Causal-Forcing"] = {"chunkwise/causal_forcing.pt": b"c"}
    report = registry.verify("causal-forcing-1.3b")
    assert not report.ok and not report.files[0].present
    assert _cli("verify", "causal-forcing-1.3b") == 1
    assert "livediffusion models pull causal-forcing-1.3b" in capsys.readouterr().out


def test_list_shows_state_size_licence_and_repo(hub, capsys):
    hub.put("gdhe17/Self-Forcing", {"checkpoints/self_forcing_dmd.pt": b"w"})
    assert _cli("list") == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("self-forcing-1.3b "))
    assert "present" in line and "5.7 GB" in line and "Apache-2.0" in line \
        and "gdhe17/Self-Forcing" in line
    line = next(l for l in out.splitlines() if l.startswith("causvid-1.3b "))
    assert "absent" in line and "CC-BY-NC-SA-4.0" in line
    for name in ("wan-1.3b", "sdv2-1.3b", "sdv2-14b", "longlive-1.3b"):
        assert any(l.startswith(name + " ") for l in out.splitlines()), name


# --- the engine serving a family member (its schedule as the engine's defaults) ---------------

from helpers import feed_chunks  # noqa: E402


def _tiny_engine(member: str):
    from livediffusion.daemon.engines.video.engine import VideoEngine
    from livediffusion.daemon.engines.video.factory import build_video_parts
    from livediffusion.daemon.models.family import FAMILY
    parts = build_video_parts("tiny")
    return VideoEngine("video-x", parts.transformer, parts.vae, parts.text,
                       tiny_decoder=parts.tiny_decoder, min_side=parts.min_side,
                       model=FAMILY[member])


def test_an_engine_runs_a_family_member_with_its_own_schedule():
    from livediffusion.daemon.engines.base import StreamConfig
    from livediffusion.daemon.engines.video.noise import timesteps
    from livediffusion.shared.protocol import FrameSpec
    engine = _tiny_engine("self-forcing-1.3b")
    # Self-Forcing: 4 steps 1000/750/500/250 warped through shift 5, global attention over
    # 21 frames, no sinks, text-to-video only (so the noise scale starts at 1.0)
    assert [round(t, 1) for t in engine.step_table] == [1000.0, 937.5, 833.3, 625.0]
    assert engine.shift == 5.0
    d = engine.defaults
    assert (d.cache_frames, d.sinks, d.sink_refresh, d.noise_scale) == (21, 0, 0.0, 1.0)
    assert timesteps(3, 0.8, engine.step_table) == [700.0, 700.0, 700.0]
    assert timesteps(2, 1.0, engine.step_table) == [900.0, 900.0]
    caps = engine.capabilities()["model"]
    assert caps["family"] == "self-forcing-1.3b" and caps["trained_chunk_latent_frames"] == 3
    assert any("served one latent frame" in n for n in caps["differences"])
    spec = FrameSpec(64, 48)
    engine.open_stream(StreamConfig(1, spec, spec, 30.0, {"steps": 4}))
    engine.settle()
    out = feed_chunks(engine, 1, spec, 3)
    assert out and all(f.pixels.shape == (48, 64, 3) for f in out)


def test_a_member_with_fewer_steps_refuses_more_in_one_sentence():
    from livediffusion.daemon.engines.base import ParamError, StreamConfig
    from livediffusion.shared.protocol import FrameSpec
    engine = _tiny_engine("causal-forcing-1step-1.3b")
    assert engine.defaults.steps == 1
    spec = FrameSpec(64, 48)
    with pytest.raises(ParamError, match="runs at most 1 denoising step"):
        engine.open_stream(StreamConfig(1, spec, spec, 30.0, {"steps": 2}))


def test_every_member_but_streamdiffusionv2_is_an_engine_of_its_own():
    from livediffusion.daemon.engines import AVAILABLE, REGISTRY
    from livediffusion.daemon.models.family import FAMILY
    for member in FAMILY:
        if member.startswith("sdv2-"):
            continue
        name = "video-" + member.removesuffix("-1.3b")
        assert name in REGISTRY and FAMILY[member].display in REGISTRY[name][1]
        assert AVAILABLE[name]() is False   # no weights here: never loaded by default
