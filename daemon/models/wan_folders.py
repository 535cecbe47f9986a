"""Weights folders as people already have them (``livediffusion daemon --weights DIR``).

Three layouts are recognised, whichever the user points at:

* **diffusers** (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``): ``transformer/``, ``vae/``,
  ``text_encoder/``, ``tokenizer/``;
* **Wan's original release** (``Wan-AI/Wan2.1-T2V-1.3B``, what StreamDiffusionV2's README
  downloads): ``config.json`` with Wan's own keys (``dim``, ``ffn_dim``, ``num_heads``,
  ``num_layers``, ...), the DiT as ``diffusion_pytorch_model.safetensors`` (or sharded with an
  index) in Wan's key layout, ``Wan2.1_VAE.pth``, the umT5-XXL encoder as
  ``models_t5_umt5-xxl-enc-bf16.pth`` in Wan's own T5 layout (``wan/modules/t5.py``:
  ``token_embedding``, ``blocks.N.attn.q`` ..., ``blocks.N.ffn.gate.0`` / ``fc1`` / ``fc2``,
  ``blocks.N.pos_embedding.embedding``, ``norm``) and the tokenizer in ``google/umt5-xxl/``;
* **the reference's tree** (StreamDiffusionV2's checkout): ``wan_models/Wan2.1-T2V-1.3B/`` (the
  original layout above) and ``ckpts/wan_causal_dmd_v2v/model.pt`` (the causal generator; the
  14B one in ``ckpts/wan_causal_dmd_v2v_14b/``).

A folder missing some files is refused with one sentence naming them and where they come
from.  Everything is read with safetensors or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .loaders import (WanWeights, WeightsError, _empty, _finish, _load_into, _restore_buffers,
                      generator_state_dict, load_diffusers_dir, load_vae_file,
                      original_to_diffusers_transformer, read_state_dict)
from .wan import PRESETS, WanPreset

WAN_VAE = "Wan2.1_VAE.pth"
WAN_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_TOKENIZER = "google/umt5-xxl"
DIT_FILES = ("diffusion_pytorch_model.safetensors.index.json",
             "diffusion_pytorch_model.safetensors")
#: the reference's generator checkpoints, by model size
REFERENCE_GENERATORS = {"1.3b": "ckpts/wan_causal_dmd_v2v/model.pt",
                        "14b": "ckpts/wan_causal_dmd_v2v_14b/model.pt"}
#: Wan's original folders, by model size, as the reference's README names them
REFERENCE_WAN = {"1.3b": "wan_models/Wan2.1-T2V-1.3B", "14b": "wan_models/Wan2.1-T2V-14B"}


def layout_of(root: Path) -> str:
    """"diffusers", "original", "reference", or "" when ``root`` is none of them."""
    if (root / "transformer").is_dir() or (root / "vae" / "config.json").exists():
        return "diffusers"
    if (root / "wan_models").is_dir() or (root / "ckpts").is_dir():
        return "reference"
    if (root / "config.json").exists() or (root / WAN_VAE).exists() or \
            (root / WAN_T5).exists() or any((root / f).exists() for f in DIT_FILES):
        return "original"
    return ""


def _wan_config(root: Path) -> dict[str, Any]:
    path = root / "config.json"
    if not path.exists():
        raise WeightsError(f"{root} has no config.json; Wan's original release has one "
                           f"(download Wan-AI/Wan2.1-T2V-1.3B into it).")
    cfg = json.loads(path.read_text())
    if "dim" not in cfg:
        raise WeightsError(f"{path} is not Wan's original config (no 'dim'); a diffusers "
                           f"folder has transformer/ and vae/ instead.")
    if cfg.get("model_type", "t2v") != "t2v":
        raise WeightsError(f"{path} is a Wan {cfg['model_type']} model; the video engine "
                           f"serves the text-to-video DiT (model_type t2v).")
    return cfg


def original_dit_config(cfg: dict[str, Any], text_dim: int) -> dict[str, Any]:
    """Wan's ``config.json`` (dim, ffn_dim, freq_dim, num_heads, num_layers, in_dim,
    out_dim, eps) as diffusers' WanTransformer3DModel config."""
    heads, dim = int(cfg["num_heads"]), int(cfg["dim"])
    return dict(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=dim // heads,
                in_channels=int(cfg.get("in_dim", 16)), out_channels=int(cfg.get("out_dim", 16)),
                text_dim=text_dim, freq_dim=int(cfg.get("freq_dim", 256)),
                ffn_dim=int(cfg["ffn_dim"]), num_layers=int(cfg["num_layers"]),
                cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                eps=float(cfg.get("eps", 1e-6)), rope_max_seq_len=1024)


def size_of(cfg: dict[str, Any]) -> str:
    """"1.3b", "14b", or "custom" from Wan's config."""
    for name in ("1.3b", "14b"):
        t = PRESETS[name].transformer
        if int(cfg["dim"]) == t["num_attention_heads"] * t["attention_head_dim"] and \
                int(cfg["num_layers"]) == t["num_layers"]:
            return name
    return "custom"


def wan_t5_to_umt5(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Wan's T5 encoder state dict (``wan/modules/t5.py``) as transformers' UMT5EncoderModel
    state dict, and the UMT5Config kwargs its shapes imply."""
    layers = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")})
    if "token_embedding.weight" not in sd or not layers:
        raise WeightsError("this is not Wan's T5 encoder checkpoint (no token_embedding and "
                           "blocks.N).")
    out: dict[str, torch.Tensor] = {"shared.weight": sd["token_embedding.weight"],
                                    "encoder.final_layer_norm.weight": sd["norm.weight"]}
    names = {"norm1.weight": "layer.0.layer_norm.weight",
             "attn.q.weight": "layer.0.SelfAttention.q.weight",
             "attn.k.weight": "layer.0.SelfAttention.k.weight",
             "attn.v.weight": "layer.0.SelfAttention.v.weight",
             "attn.o.weight": "layer.0.SelfAttention.o.weight",
             "pos_embedding.embedding.weight":
                 "layer.0.SelfAttention.relative_attention_bias.weight",
             "norm2.weight": "layer.1.layer_norm.weight",
             "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",   # the GELU branch
             "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
             "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight"}
    for i in layers:
        for ours, theirs in names.items():
            key = f"blocks.{i}.{ours}"
            if key not in sd:
                raise WeightsError(f"Wan's T5 checkpoint lacks {key}.")
            out[f"encoder.block.{i}.{theirs}"] = sd[key]
    vocab, d_model = sd["token_embedding.weight"].shape
    buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    config = dict(vocab_size=int(vocab), d_model=int(d_model),
                  d_kv=int(sd["blocks.0.attn.q.weight"].shape[0]) // int(heads),
                  d_ff=int(sd["blocks.0.ffn.fc1.weight"].shape[0]), num_layers=len(layers),
                  num_heads=int(heads), relative_attention_num_buckets=int(buckets),
                  relative_attention_max_distance=128,   # Wan's T5RelativeEmbedding max_dist
                  feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
                  pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return out, config


def load_wan_t5(path: Path, tokenizer_dir: Path, *, dtype: torch.dtype = torch.bfloat16,
                device: str = "cpu"):
    """umT5 (tokenizer, encoder) from Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` and its
    ``google/umt5-xxl`` tokenizer folder."""
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    sd, config = wan_t5_to_umt5(read_state_dict(path))
    with torch.device("meta"):
        encoder = UMT5EncoderModel(UMT5Config(**config))
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    _load_into(encoder, sd, str(path))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tokenizer, encoder.to(dtype=dtype).to(device).eval().requires_grad_(False)


def _missing(root: Path, text: bool) -> list[str]:
    need = ["config.json", WAN_VAE] + ([WAN_T5, WAN_TOKENIZER + "/"] if text else [])
    out = [n for n in need if not (root / n.rstrip("/")).exists()]
    if not any((root / f).exists() for f in DIT_FILES):
        out.insert(1, DIT_FILES[1])
    return out


def load_original_dir(root: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                      device: str = "cpu", generator: str | Path | None = None,
                      text_device: str | None = None, text: bool = True,
                      dit_device: str | None = None) -> WanWeights:
    """Everything from Wan's original release folder; ``generator`` swaps in the causal DiT
    (then the folder's own DiT file is not needed)."""
    from diffusers import WanTransformer3DModel

    root = Path(root)
    missing = [m for m in _missing(root, text)
               if not (generator is not None and m == DIT_FILES[1])]
    if missing:
        raise WeightsError(f"{root} is Wan's original layout but lacks {', '.join(missing)} "
                           f"(they come with Wan-AI/Wan2.1-T2V-1.3B, or -14B).")
    cfg = _wan_config(root)
    if generator is not None:
        dit_sd = generator_state_dict(read_state_dict(generator))
        source = f"{Path(generator).name} + {root.name}"
    else:
        dit_file = next(root / f for f in DIT_FILES if (root / f).exists())
        dit_sd = read_state_dict(dit_file)
        source = root.name
    text_dim = int(dit_sd["text_embedding.0.weight"].shape[1]) \
        if "text_embedding.0.weight" in dit_sd else 4096
    config = original_dit_config(cfg, text_dim)
    sd = original_to_diffusers_transformer(dit_sd)
    transformer = _load_into(_empty(WanTransformer3DModel, config), sd, source)
    _restore_buffers(transformer, WanPreset("from-wan-config", config))
    transformer = _finish(transformer, dtype, dit_device or device)
    vae_config = _vae_config_for(cfg)
    vae = load_vae_file(root / WAN_VAE, dtype=torch.float32, device=device, config=vae_config)
    from .wan import cast
    vae = cast(vae, dtype).eval().requires_grad_(False)
    text_parts = load_wan_t5(root / WAN_T5, root / WAN_TOKENIZER, dtype=dtype,
                             device=text_device or device) if text else None
    return WanWeights(transformer, vae, text_parts, source)


def _vae_config_for(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The VAE's diffusers config: the release's (None: diffusers' defaults) unless the
    folder's config.json names a smaller one (``vae`` key: the tiny test folders)."""
    return cfg.get("vae")


def resolve(root: str | Path, size: str | None = None) -> tuple[str, Path, Path | None]:
    """(layout, the Wan folder, the causal generator file or None) for a ``--weights``
    folder; raises WeightsError with one sentence when it is not usable."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise WeightsError(f"--weights {root}: no such folder.")
    kind = layout_of(root)
    if kind == "reference":
        sizes = [size] if size else ["1.3b", "14b"]
        for s in sizes:
            wan, gen = root / REFERENCE_WAN[s], root / REFERENCE_GENERATORS[s]
            if wan.is_dir() or gen.exists():
                if not wan.is_dir():
                    raise WeightsError(f"{root} has {REFERENCE_GENERATORS[s]} but no "
                                       f"{REFERENCE_WAN[s]}/ (download Wan-AI/Wan2.1-T2V-"
                                       f"{s.upper()} there).")
                return "original", wan, gen if gen.exists() else None
        raise WeightsError(f"{root} has neither {REFERENCE_WAN['1.3b']}/ nor "
                           f"{REFERENCE_GENERATORS['1.3b']}: not the reference's tree.")
    if kind == "":
        raise WeightsError(f"{root} holds no Wan weights: expected a diffusers folder "
                           f"(transformer/, vae/, text_encoder/, tokenizer/), Wan's original "
                           f"release (config.json, {DIT_FILES[1]}, {WAN_VAE}, {WAN_T5}, "
                           f"{WAN_TOKENIZER}/) or the reference's tree (wan_models/, ckpts/).")
    return kind, root, None


def folder_size(root: str | Path) -> str:
    """The Wan model size a weights folder holds ("1.3b", "14b" or "custom"), from its
    config alone (nothing is loaded)."""
    kind, wan_dir, _ = resolve(root)
    if kind == "diffusers":
        cfg = json.loads((Path(wan_dir) / "transformer" / "config.json").read_text())
        layers = int(cfg["num_layers"])
        return "14b" if layers == 40 else "1.3b" if layers == 30 else "custom"
    return size_of(_wan_config(wan_dir))


def load_weights_dir(root: str | Path, *, size: str | None = None, dtype=torch.bfloat16,
                     device: str = "cpu", generator: str | Path | None = None,
                     text_device: str | None = None, text: bool = True,
                     dit_device: str | None = None) -> tuple[WanWeights, str]:
    """The weights of any recognised folder and the model size they are ("1.3b", "14b"):
    the generator is ``generator``, else the reference tree's, else the folder's own DiT
    (which is Wan's bidirectional model: the caller decides whether that is acceptable)."""
    kind, wan_dir, found = resolve(root, size)
    generator = generator or found
    if kind == "diffusers":
        size = folder_size(wan_dir)
        weights = load_diffusers_dir(wan_dir, dtype=dtype, device=device, generator=generator,
                                     preset=size if size != "custom" else "1.3b",
                                     text_device=text_device, text=text, dit_device=dit_device)
        return weights, size
    cfg = _wan_config(wan_dir)
    weights = load_original_dir(wan_dir, dtype=dtype, device=device, generator=generator,
                                text_device=text_device, text=text, dit_device=dit_device)
    return weights, size_of(cfg)
