"""Checkpoint loaders (daemon/models/loaders.py) and the weights registry (registry.py).

No real weights can be downloaded here: every test writes checkpoints with the real key
layouts (diffusers, original Wan release, StreamDiffusionV2 generator) at the tiny preset's
shapes, loads them back through the loaders and compares against the model they came from.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from livediffusion.daemon.models import loaders, registry
from livediffusion.daemon.models import wan
from livediffusion.daemon.models.wan import (PRESETS, build_text_encoder, build_transformer,
                                             build_vae)

TINY = PRESETS["tiny"]


# --------------------------------------------------------------------------- helpers

def _randomize(model, seed: int):
    """Perturb every parameter so that no two tensors are alike (norm weights start as all
    ones: a swapped q/k norm or norm2/norm3 would otherwise go unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return model


def _assert_same_weights(loaded, original):
    a, b = loaded.state_dict(), original.state_dict()
    assert a.keys() == b.keys()
    for k in b:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# Inverse of diffusers' Wan DiT conversion, written from the Wan 2.1 release's own module
# names (wan/modules/model.py), NOT derived from diffusers' converter.
_TOP = {
    "patch_embedding.": "patch_embedding.",
    "condition_embedder.text_embedder.linear_1.": "text_embedding.0.",
    "condition_embedder.text_embedder.linear_2.": "text_embedding.2.",
    "condition_embedder.time_embedder.linear_1.": "time_embedding.0.",
    "condition_embedder.time_embedder.linear_2.": "time_embedding.2.",
    "condition_embedder.time_proj.": "time_projection.1.",
    "proj_out.": "head.head.",
}
_ATTN = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o",
         "norm_q": "norm_q", "norm_k": "norm_k"}
_BLOCK = {
    "norm2.": "norm3.",  # diffusers' norm2 is the cross-attention norm: norm3 in Wan
    "ffn.net.0.proj.": "ffn.0.",
    "ffn.net.2.": "ffn.2.",
}


def diffusers_to_original_dit_key(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    for src, dst in _TOP.items():
        if key.startswith(src):
            return dst + key[len(src):]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m is None:
        raise KeyError(f"no original name for {key}")
    n, rest = m.groups()
    if rest == "scale_shift_table":
        return f"blocks.{n}.modulation"
    m2 = re.fullmatch(r"(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0|norm_q|norm_k)\.(weight|bias)",
                      rest)
    if m2:
        attn, sub, leaf = m2.groups()
        attn = "self_attn" if attn == "attn1" else "cross_attn"
        return f"blocks.{n}.{attn}.{_ATTN[sub]}.{leaf}"
    for src, dst in _BLOCK.items():
        if rest.startswith(src):
            return f"blocks.{n}.{dst}{rest[len(src):]}"
    raise KeyError(f"no original name for {key}")


def original_dit_state_dict(model) -> dict[str, torch.Tensor]:
    out = {diffusers_to_original_dit_key(k): v.clone() for k, v in model.state_dict().items()}
    assert len(out) == len(model.state_dict())
    return out


# Candidate original Wan VAE names, from the naming grammar of the release's wan/modules/vae.py.
_RES = [f"residual.{i}.{leaf}" for i in (0, 3) for leaf in ("gamma",)] + \
       [f"residual.{i}.{leaf}" for i in (2, 6) for leaf in ("weight", "bias")]
_WB = ("weight", "bias")


def _vae_candidates(max_blocks: int = 20) -> list[str]:
    names = [f"{p}.{leaf}" for p in ("conv1", "conv2", "encoder.conv1", "decoder.conv1")
             for leaf in _WB]
    for side in ("encoder", "decoder"):
        names += [f"{side}.head.0.gamma"] + [f"{side}.head.2.{leaf}" for leaf in _WB]
        names += [f"{side}.middle.{i}.{r}" for i in (0, 2) for r in _RES]
        names += [f"{side}.middle.1.norm.gamma"] + \
                 [f"{side}.middle.1.{m}.{leaf}" for m in ("to_qkv", "proj") for leaf in _WB]
        group = "downsamples" if side == "encoder" else "upsamples"
        for i in range(max_blocks):
            names += [f"{side}.{group}.{i}.{r}" for r in _RES]
            names += [f"{side}.{group}.{i}.{m}.{leaf}"
                      for m in ("shortcut", "resample.1", "time_conv") for leaf in _WB]
    return names


def original_vae_names(diffusers_keys) -> dict[str, str]:
    """diffusers key -> original Wan VAE key, found by running every candidate through
    diffusers' converter (used as an oracle) and keeping those that land on a real key."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    wanted = set(diffusers_keys)
    inverse: dict[str, str] = {}
    for cand in _vae_candidates():
        (converted,) = convert_wan_vae_to_diffusers({cand: None}).keys()
        if converted in wanted:
            assert converted not in inverse, (converted, inverse.get(converted), cand)
            inverse[converted] = cand
    missing = wanted - inverse.keys()
    assert not missing, f"VAE name grammar misses {sorted(missing)}"
    return inverse


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    return _randomize(build_transformer(TINY), seed=1)


@pytest.fixture(scope="module")
def original_dit(dit):
    return original_dit_state_dict(dit)


@pytest.fixture(scope="module")
def dit_pth(original_dit, tmp_path_factory):
    path = tmp_path_factory.mktemp("dit") / "wan_tiny.pth"
    torch.save(original_dit, path)
    return path


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return _randomize(build_vae(TINY), seed=2)


def _dit_inputs():
    g = torch.Generator().manual_seed(3)
    return dict(hidden_states=torch.randn(1, 16, 1, 4, 4, generator=g),
                timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 512, 32, generator=g))


# --------------------------------------------------------------------------- 1. diffusers dir

def _save_diffusers_dir(root, dit, vae):
    tokenizer, encoder = build_text_encoder(TINY)
    dit.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    encoder.save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    return tokenizer, encoder


def _assert_same_embeddings(text, tokenizer, encoder):
    tok2, enc2 = text
    _assert_same_weights(enc2, encoder)
    prompt = "a red fox running through snow"
    want = wan.encode_prompt(tokenizer, encoder, prompt, "cpu")
    got = wan.encode_prompt(tok2, enc2, prompt, "cpu")
    assert got.shape == (1, wan.TEXT_LEN, TINY.text_encoder["d_model"])
    assert got.abs().sum() > 0
    assert torch.equal(got, want)


def test_diffusers_directory_round_trip(dit, vae, tmp_path):
    tokenizer, encoder = _save_diffusers_dir(tmp_path, dit, vae)

    w = loaders.load_diffusers_dir(tmp_path, dtype=torch.float32, preset="tiny")

    _assert_same_weights(w.transformer, dit)
    _assert_same_weights(w.vae, vae)
    _assert_same_embeddings(w.text, tokenizer, encoder)


def test_diffusers_directory_with_generator_swaps_the_dit(dit, vae, original_dit, tmp_path):
    # the StreamDiffusionV2 path: DiT from model.pt, VAE and umT5 from the diffusers directory
    tokenizer, encoder = _save_diffusers_dir(tmp_path / "wan", dit, vae)
    torch.save({"generator": {"model." + k: v for k, v in original_dit.items()}},
               tmp_path / "model.pt")

    w = loaders.load_diffusers_dir(tmp_path / "wan", dtype=torch.float32, preset="tiny",
                                   generator=tmp_path / "model.pt")

    _assert_same_weights(w.transformer, dit)
    _assert_same_weights(w.vae, vae)
    _assert_same_embeddings(w.text, tokenizer, encoder)
    assert w.source == "model.pt + wan"


def test_text_encoder_needs_tokenizer_folder(tmp_path):
    _, encoder = build_text_encoder(TINY)
    encoder.save_pretrained(tmp_path / "text_encoder")
    with pytest.raises(loaders.WeightsError, match="livediffusion models pull wan-1.3b"):
        loaders.load_text_encoder(tmp_path, dtype=torch.float32)


def test_diffusers_directory_without_vae_is_refused(dit, tmp_path):
    dit.save_pretrained(tmp_path / "transformer")
    with pytest.raises(loaders.WeightsError, match="diffusers-layout"):
        loaders.load_diffusers_dir(tmp_path, dtype=torch.float32, preset="tiny")


# --------------------------------------------------------------------------- 2. original DiT

def test_inverse_dit_mapping_uses_wan_names(original_dit):
    # spot checks of the hand-written mapping against names in the Wan 2.1 release
    for name in ("head.modulation", "head.head.weight", "time_projection.1.weight",
                 "text_embedding.0.weight", "time_embedding.2.bias", "patch_embedding.weight",
                 "blocks.1.modulation", "blocks.0.self_attn.q.weight",
                 "blocks.0.self_attn.o.bias", "blocks.0.self_attn.norm_k.weight",
                 "blocks.0.cross_attn.v.weight", "blocks.0.cross_attn.norm_q.weight",
                 "blocks.0.norm3.weight", "blocks.0.ffn.0.weight", "blocks.0.ffn.2.bias"):
        assert name in original_dit, name
    assert not any(".norm2." in k for k in original_dit)  # Wan's norm2 has no weights


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_original_layout_dit_file_loads(dit, original_dit, tmp_path, fmt):
    path = tmp_path / f"diffusion_pytorch_model.{fmt}"
    if fmt == "safetensors":
        save_file(original_dit, path)
    else:
        torch.save(original_dit, path)

    model = loaders.load_transformer_file(path, "tiny", dtype=torch.float32)

    _assert_same_weights(model, dit)
    x = _dit_inputs()
    with torch.no_grad():
        want = dit(**x, return_dict=False)[0]
        got = model(**x, return_dict=False)[0]
    assert got.shape == (1, 16, 1, 4, 4)
    assert torch.equal(got, want)


def test_sharded_safetensors_with_index_loads(dit, original_dit, tmp_path):
    keys = sorted(original_dit)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for shard, names in shards.items():
        save_file({k: original_dit[k] for k in names}, tmp_path / shard)
        weight_map.update({k: shard for k in names})
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))

    model = loaders.load_transformer_file(index, "tiny", dtype=torch.float32)

    _assert_same_weights(model, dit)


def test_bfloat16_load_keeps_fp32_modules(dit_pth):
    model = loaders.load_transformer_file(dit_pth, "tiny", dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    assert params["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16
    assert params["scale_shift_table"].dtype == torch.float32  # _keep_in_fp32_modules
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())


# --------------------------------------------------------------------------- 3. generator

@pytest.mark.parametrize("prefix", ["model.", ""])
@pytest.mark.parametrize("container", ["generator", "generator_ema", "state_dict"])
def test_streamdiffusionv2_generator_checkpoint(dit, original_dit, tmp_path, container, prefix):
    path = tmp_path / "model.pt"
    torch.save({container: {prefix + k: v for k, v in original_dit.items()}, "step": 1000}, path)

    model = loaders.load_generator(path, "tiny", dtype=torch.float32)

    _assert_same_weights(model, dit)


def test_generator_prefers_generator_unless_key_given(dit, original_dit, tmp_path):
    ema = {k: v + 1 for k, v in original_dit.items()}
    path = tmp_path / "model.pt"
    torch.save({"generator": {"model." + k: v for k, v in original_dit.items()},
                "generator_ema": {"model." + k: v for k, v in ema.items()}}, path)

    _assert_same_weights(loaders.load_generator(path, "tiny", dtype=torch.float32), dit)
    chosen = loaders.load_generator(path, "tiny", key="generator_ema", dtype=torch.float32)
    assert torch.equal(chosen.state_dict()["proj_out.weight"], ema["head.head.weight"])


def test_generator_checkpoint_without_known_key_is_refused(original_dit, tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"model": dict(original_dit), "step": 5}, path)
    with pytest.raises(loaders.WeightsError) as err:
        loaders.load_generator(path, "tiny", dtype=torch.float32)
    for key in loaders.GENERATOR_KEYS:
        assert key in str(err.value)
    assert "generator, generator_ema, state_dict" in str(err.value)


# --------------------------------------------------------------------------- 4. security

class Payload:
    """Unpickling this would create the marker file (builtins.open in mode 'w')."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class Opaque:
    """An arbitrary class from this module: not allowed by weights_only loading."""

    def __init__(self):
        self.x = 1


def test_pickled_code_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"generator": {"w": torch.zeros(2)}, "extra": Payload(marker)}, path)

    with pytest.raises(loaders.WeightsError, match="weights-only"):
        loaders.read_state_dict(path)
    with pytest.raises(loaders.WeightsError):
        loaders.load_generator(path, "tiny", dtype=torch.float32)
    assert not marker.exists()

    # sanity: the payload is live under a plain unpickling
    torch.load(path, weights_only=False)["extra"].close()
    assert marker.exists()


def test_arbitrary_class_in_checkpoint_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"generator": Opaque()}, path)
    with pytest.raises(loaders.WeightsError, match="never loaded"):
        loaders.read_state_dict(path)


def test_read_state_dict_rejects_missing_and_non_dict(tmp_path):
    with pytest.raises(loaders.WeightsError, match="does not exist"):
        loaders.read_state_dict(tmp_path / "nope.pth")
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(loaders.WeightsError, match="does not hold a state dict"):
        loaders.read_state_dict(path)


# --------------------------------------------------------------------------- 5. original VAE

def test_original_layout_vae_file_loads(vae, tmp_path):
    # Unlike the DiT test, the original VAE names here are derived with diffusers' own
    # converter used as an oracle (candidates from Wan's naming grammar, kept when they
    # convert onto a key of the tiny VAE).  Note the converter hard-codes the decoder's
    # upsample indices for num_res_blocks=2 (the real Wan VAE), so for the tiny VAE
    # (num_res_blocks=1) the decoder names are those the converter expects, with gaps.
    sd = vae.state_dict()
    names = original_vae_names(sd.keys())
    original = {names[k]: v.clone() for k, v in sd.items()}
    assert "encoder.downsamples.2.shortcut.weight" in original
    assert "decoder.upsamples.3.time_conv.weight" in original
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(original, path)

    loaded = loaders.load_vae_file(path, config=TINY.vae, dtype=torch.float32)

    _assert_same_weights(loaded, vae)
    z = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = vae.decode(z).sample
        got = loaded.decode(z).sample
    assert got.shape == want.shape == (1, 3, 5, 32, 32)
    assert torch.equal(got, want)


def test_vae_name_grammar_covers_real_wan_vae():
    # the real (default-config) Wan 2.1 VAE, on the meta device: every key has an original name
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        real = AutoencoderKLWan()
    names = original_vae_names(real.state_dict().keys())
    assert names["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"] == \
        "decoder.upsamples.4.shortcut.weight"
    assert names["decoder.up_blocks.0.upsamplers.0.time_conv.weight"] == \
        "decoder.upsamples.3.time_conv.weight"


# --------------------------------------------------------------------------- 6. wrong size

def test_tiny_dit_loaded_as_1_3b_is_refused(dit_pth):
    with pytest.raises(loaders.WeightsError, match="size mismatch.*wrong model size"):
        loaders.load_transformer_file(dit_pth, "1.3b", dtype=torch.float32)


def test_dit_with_missing_blocks_is_refused(original_dit, tmp_path):
    path = tmp_path / "partial.pth"
    torch.save({k: v for k, v in original_dit.items() if not k.startswith("blocks.1.")}, path)
    with pytest.raises(loaders.WeightsError, match="missing keys"):
        loaders.load_transformer_file(path, "tiny", dtype=torch.float32)


def test_dit_with_unexpected_keys_is_refused(original_dit, tmp_path):
    path = tmp_path / "extra.pth"
    torch.save(dict(original_dit, **{"blocks.2.self_attn.q.weight": torch.zeros(64, 64)}), path)
    with pytest.raises(loaders.WeightsError, match="1 unexpected"):
        loaders.load_transformer_file(path, "tiny", dtype=torch.float32)


# --------------------------------------------------------------------------- 7. real sizes

@pytest.mark.parametrize("name, low, high, blocks, width", [
    ("1.3b", 1.2e9, 1.5e9, 30, 1536),
    ("14b", 13e9, 15e9, 40, 5120),
])
def test_real_preset_sizes(name, low, high, blocks, width):
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**PRESETS[name].transformer)
    n = sum(p.numel() for p in model.parameters())
    assert low < n < high, n
    assert len(model.blocks) == blocks
    assert model.patch_embedding.out_channels == width
    assert model.blocks[0].attn1.to_q.weight.shape == (width, width)
    assert model.condition_embedder.text_embedder.linear_1.in_features == 4096  # umT5-XXL


# --------------------------------------------------------------------------- 8. registry

HASH = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache under tmp_path, offline.  huggingface_hub's
    snapshot_download reads ``constants.HF_HUB_CACHE`` when cache_dir is None (the constant
    is computed from the environment at import time), so both are patched."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _fake_snapshot(cache, repo: str, files: list[str]):
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(HASH)  # no newline, as huggingface_hub writes it
    snap = root / "snapshots" / HASH
    snap.mkdir(parents=True)
    for f in files:
        (snap / f).parent.mkdir(parents=True, exist_ok=True)
        (snap / f).write_bytes(b"x")
    return snap


def test_registry_missing_model(hf_cache):
    assert registry.local_path("wan-1.3b") is None
    with pytest.raises(registry.MissingWeights, match="livediffusion models pull wan-1.3b"):
        registry.require("wan-1.3b")
    with pytest.raises(FileNotFoundError, match="livediffusion models pull sdv2-1.3b"):
        registry.require("sdv2-1.3b")


def test_registry_finds_cached_snapshot(hf_cache):
    snap = _fake_snapshot(hf_cache, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                          ["transformer/config.json"])
    assert registry.local_path("wan-1.3b").resolve() == snap.resolve()
    assert registry.require("wan-1.3b").resolve() == snap.resolve()
    assert registry.local_path("wan-14b") is None


def test_registry_generator_needs_its_file(hf_cache):
    snap = _fake_snapshot(hf_cache, "jerryfeng/StreamDiffusionV2", ["README.md"])
    assert registry.local_path("sdv2-1.3b") is None
    (snap / "wan_causal_dmd_v2v").mkdir()
    (snap / "wan_causal_dmd_v2v" / "model.pt").write_bytes(b"x")
    assert registry.local_path("sdv2-1.3b").resolve() == snap.resolve()
    assert registry.local_path("sdv2-14b") is None  # its model.pt is not there
