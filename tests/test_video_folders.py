"""Weights folders as people have them (daemon/models/wan_folders.py): Wan's original release
(config.json with Wan's keys, the DiT in Wan's key layout, Wan2.1_VAE.pth, the umT5 encoder in
Wan's own T5 layout, google/umt5-xxl/), the reference's wan_models/ + ckpts/ tree, and folders
that hold only some of it.  Every state dict is generated at the tiny size in the real key
layout; the loaded networks must equal the ones they were written from."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from livediffusion.daemon.models import wan
from livediffusion.daemon.models.loaders import WeightsError
from livediffusion.daemon.models.wan import PRESETS, build_text_encoder
from livediffusion.daemon.models.wan_folders import (load_weights_dir, resolve, wan_t5_to_umt5)

from helpers import feed_chunks
from test_video_loaders import (_assert_same_weights, original_dit_state_dict,  # noqa: F401
                                original_vae_names)

TINY = PRESETS["tiny"]


def umt5_to_wan_t5(encoder) -> dict[str, torch.Tensor]:
    """A transformers UMT5EncoderModel's weights in Wan's own T5 layout, written out by hand
    from wan/modules/t5.py (T5Encoder: token_embedding, blocks.N.{norm1, attn.{q,k,v,o},
    norm2, ffn.{gate.0, fc1, fc2}, pos_embedding.embedding}, norm)."""
    sd = encoder.state_dict()
    out = {"token_embedding.weight": sd["shared.weight"],
           "norm.weight": sd["encoder.final_layer_norm.weight"]}
    for i in range(encoder.config.num_layers):
        b = f"encoder.block.{i}.layer"
        out.update({
            f"blocks.{i}.norm1.weight": sd[f"{b}.0.layer_norm.weight"],
            f"blocks.{i}.attn.q.weight": sd[f"{b}.0.SelfAttention.q.weight"],
            f"blocks.{i}.attn.k.weight": sd[f"{b}.0.SelfAttention.k.weight"],
            f"blocks.{i}.attn.v.weight": sd[f"{b}.0.SelfAttention.v.weight"],
            f"blocks.{i}.attn.o.weight": sd[f"{b}.0.SelfAttention.o.weight"],
            f"blocks.{i}.pos_embedding.embedding.weight":
                sd[f"{b}.0.SelfAttention.relative_attention_bias.weight"],
            f"blocks.{i}.norm2.weight": sd[f"{b}.1.layer_norm.weight"],
            f"blocks.{i}.ffn.gate.0.weight": sd[f"{b}.1.DenseReluDense.wi_0.weight"],
            f"blocks.{i}.ffn.fc1.weight": sd[f"{b}.1.DenseReluDense.wi_1.weight"],
            f"blocks.{i}.ffn.fc2.weight": sd[f"{b}.1.DenseReluDense.wo.weight"]})
    return {k: v.clone() for k, v in out.items()}


def wan_config(preset=TINY) -> dict:
    t = preset.transformer
    cfg = {"_class_name": "WanModel", "_diffusers_version": "0.30.0",
           "dim": t["num_attention_heads"] * t["attention_head_dim"], "eps": 1e-06,
           "ffn_dim": t["ffn_dim"], "freq_dim": 256, "in_dim": 16, "model_type": "t2v",
           "num_heads": t["num_attention_heads"], "num_layers": t["num_layers"],
           "out_dim": 16, "text_len": 512}
    if preset.vae:
        cfg["vae"] = preset.vae   # the tiny folder's VAE is smaller than the release's
    return cfg


@pytest.fixture(scope="module")
def parts():
    from test_video_loaders import _randomize
    torch.manual_seed(0)
    dit = _randomize(wan.build_transformer(TINY), seed=1)
    vae = _randomize(wan.build_vae(TINY), seed=2)
    # Wan's T5 always buckets relative positions up to 128 (T5RelativeEmbedding max_dist)
    t5 = wan.WanPreset("tiny-t5", {}, text_encoder=dict(TINY.text_encoder,
                                                        relative_attention_max_distance=128))
    tokenizer, encoder = build_text_encoder(t5)
    return dit, vae, tokenizer, encoder


def write_original(root, parts, *, skip=()):
    """Wan's original release folder at the tiny size."""
    dit, vae, tokenizer, encoder = parts
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "config.json": lambda p: p.write_text(json.dumps(wan_config())),
        "diffusion_pytorch_model.safetensors":
            lambda p: save_file(original_dit_state_dict(dit), p),
        "Wan2.1_VAE.pth": lambda p: torch.save(
            {orig: v.clone() for key, v in vae.state_dict().items()
             for orig in [original_vae_names(vae.state_dict())[key]]}, p),
        "models_t5_umt5-xxl-enc-bf16.pth": lambda p: torch.save(umt5_to_wan_t5(encoder), p),
        "google/umt5-xxl": lambda p: tokenizer.save_pretrained(p),
    }
    for name, write in files.items():
        if name not in skip:
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path)
    return root


def test_wans_original_release_folder_loads_whole(parts, tmp_path):
    dit, vae, tokenizer, encoder = parts
    root = write_original(tmp_path / "Wan2.1-T2V-1.3B", parts)
    weights, size = load_weights_dir(root, dtype=torch.float32)
    assert size == "custom"   # the tiny test size; the release's 1.3B config says "1.3b"
    _assert_same_weights(weights.transformer, dit)
    _assert_same_weights(weights.vae, vae)
    tok, enc = weights.text
    prompt = "a red fox running through snow"
    want = wan.encode_prompt(tokenizer, encoder, prompt, "cpu")
    got = wan.encode_prompt(tok, enc, prompt, "cpu")
    assert got.abs().sum() > 0 and torch.equal(got, want)


def test_the_release_config_keys_map_to_the_real_sizes():
    from livediffusion.daemon.models.wan_folders import original_dit_config, size_of
    release = {"dim": 1536, "ffn_dim": 8960, "freq_dim": 256, "in_dim": 16, "num_heads": 12,
               "num_layers": 30, "out_dim": 16, "eps": 1e-6, "model_type": "t2v"}
    assert size_of(release) == "1.3b"
    cfg = original_dit_config(release, 4096)
    assert {k: cfg[k] for k in PRESETS["1.3b"].transformer} == PRESETS["1.3b"].transformer
    assert size_of({**release, "dim": 5120, "num_heads": 40, "num_layers": 40,
                    "ffn_dim": 13824}) == "14b"


def test_wans_t5_layout_maps_onto_umt5(parts):
    _, _, _, encoder = parts
    sd, config = wan_t5_to_umt5(umt5_to_wan_t5(encoder))
    assert config["num_layers"] == 2 and config["num_heads"] == 4 and config["d_kv"] == 8
    theirs = encoder.state_dict()
    assert all(torch.equal(sd[k], theirs[k]) for k in sd)
    assert set(sd) | {"encoder.embed_tokens.weight"} == set(theirs)


def test_the_reference_tree_takes_its_generator(parts, tmp_path):
    dit, *_ = parts
    from test_video_loaders import _randomize
    other = _randomize(wan.build_transformer(TINY), seed=9)   # the causal generator
    write_original(tmp_path / "wan_models" / "Wan2.1-T2V-1.3B", parts)
    gen = tmp_path / "ckpts" / "wan_causal_dmd_v2v" / "model.pt"
    gen.parent.mkdir(parents=True)
    torch.save({"generator_ema": {"model." + k: v for k, v in
                                  original_dit_state_dict(other).items()}}, gen)
    kind, wan_dir, found = resolve(tmp_path)
    assert (kind, wan_dir.name, found) == ("original", "Wan2.1-T2V-1.3B", gen)
    weights, _ = load_weights_dir(tmp_path, dtype=torch.float32)
    _assert_same_weights(weights.transformer, other)
    assert "model.pt" in weights.source


@pytest.mark.parametrize("skip, says", [
    (("Wan2.1_VAE.pth",), "lacks Wan2.1_VAE.pth"),
    (("models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl"),
     "lacks models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/"),
    (("diffusion_pytorch_model.safetensors",), "lacks diffusion_pytorch_model.safetensors"),
])
def test_a_folder_with_only_some_files_says_what_is_missing(parts, tmp_path, skip, says):
    root = write_original(tmp_path / "partial", parts, skip=skip)
    with pytest.raises(WeightsError, match=says):
        load_weights_dir(root, dtype=torch.float32)


def test_folders_that_are_not_wan_weights_are_refused_in_one_sentence(tmp_path):
    with pytest.raises(WeightsError, match="no such folder"):
        resolve(tmp_path / "nowhere")
    with pytest.raises(WeightsError, match="holds no Wan weights: expected a diffusers"):
        resolve(tmp_path)
    (tmp_path / "ckpts" / "wan_causal_dmd_v2v").mkdir(parents=True)
    (tmp_path / "ckpts" / "wan_causal_dmd_v2v" / "model.pt").write_bytes(b"")
    with pytest.raises(WeightsError, match="no wan_models/Wan2.1-T2V-1.3B/"):
        resolve(tmp_path)
    i2v = tmp_path / "i2v"
    i2v.mkdir()
    (i2v / "config.json").write_text(json.dumps({**wan_config(), "model_type": "i2v"}))
    with pytest.raises(WeightsError, match="serves the text-to-video DiT"):
        load_weights_dir(i2v)


def test_the_engine_runs_from_a_weights_folder(parts, tmp_path, monkeypatch):
    """``--weights DIR`` (LIVEDIFFUSION_WEIGHTS) end to end at the tiny size: the reference's
    tree is found, its generator replaces the DiT, and the engine makes frames."""
    from livediffusion.daemon.engines.base import StreamConfig
    from livediffusion.daemon.engines.video.engine import VideoEngine
    from livediffusion.daemon.engines.video.factory import load_real_video_parts
    from livediffusion.daemon.models import wan_folders
    from livediffusion.shared.protocol import FrameSpec
    from test_video_loaders import _randomize

    other = _randomize(wan.build_transformer(TINY), seed=9)
    write_original(tmp_path / "wan_models" / "Wan2.1-T2V-1.3B", parts)
    gen = tmp_path / "ckpts" / "wan_causal_dmd_v2v" / "model.pt"
    gen.parent.mkdir(parents=True)
    torch.save({"generator": original_dit_state_dict(other)}, gen)
    monkeypatch.setitem(wan_folders.REFERENCE_WAN, "tiny", "wan_models/Wan2.1-T2V-1.3B")
    monkeypatch.setitem(wan_folders.REFERENCE_GENERATORS, "tiny",
                        "ckpts/wan_causal_dmd_v2v/model.pt")
    monkeypatch.setenv("LIVEDIFFUSION_WEIGHTS", str(tmp_path))
    p = load_real_video_parts("tiny", device="cpu")
    _assert_same_weights(p.transformer, other)
    engine = VideoEngine("video", p.transformer, p.vae, p.text, device="cpu",
                         min_side=p.min_side, description=p.description)
    spec = FrameSpec(64, 48)
    engine.open_stream(StreamConfig(1, spec, spec, 30.0, {"prompt": "a fox"}))
    engine.settle()
    frames = feed_chunks(engine, 1, spec, 2)
    assert frames and frames[0].pixels.shape == (48, 64, 3)
    assert "model.pt" in p.description


def test_the_daemon_refuses_an_unusable_weights_folder_in_one_sentence(parts, tmp_path):
    import subprocess
    import sys
    write_original(tmp_path / "w", parts, skip=("Wan2.1_VAE.pth",))
    for folder, says in ((tmp_path / "none", "no such folder"),
                         (tmp_path / "w", "a Wan model of a size the video engines do not "
                                          "serve")):
        out = subprocess.run([sys.executable, "-m", "livediffusion.daemon", "daemon",
                              "--weights", str(folder), "--port", "0"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and says in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
