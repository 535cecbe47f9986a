"""Wan 2.1 networks: the DiT, the causal 3D VAE and the umT5 text encoder, at real and tiny sizes.

Real sizes (REFERENCE.md section 1): 1.3B has 30 blocks of width 1536 (12 heads x 128, FFN
8960); 14B has 40 blocks of width 5120 (40 heads x 128, FFN 13824).  The tiny preset keeps the
same architectures (same classes, same RoPE split rule, same VAE topology) at sizes that run at
interactive speed on two CPU cores; its weights are random and its output is abstract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

TEXT_LEN = 512  # umT5 context length Wan was trained with (padding zeroed, not masked)


@dataclass(frozen=True)
class WanPreset:
    name: str
    transformer: dict[str, Any]
    vae: dict[str, Any] = field(default_factory=dict)
    #: UMT5Config kwargs for a randomly initialised encoder (tiny), None for pretrained
    text_encoder: dict[str, Any] | None = None


_COMMON = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, freq_dim=256,
               cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
               rope_max_seq_len=1024)

PRESETS: dict[str, WanPreset] = {
    "1.3b": WanPreset(
        "1.3b",
        transformer=dict(_COMMON, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960,
                         num_layers=30, text_dim=4096)),
    "14b": WanPreset(
        "14b",
        transformer=dict(_COMMON, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824,
                         num_layers=40, text_dim=4096)),
    "tiny": WanPreset(
        "tiny",
        transformer=dict(_COMMON, num_attention_heads=2, attention_head_dim=32, ffn_dim=128,
                         num_layers=2, text_dim=32),
        vae=dict(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                 temperal_downsample=[False, True, True]),
        text_encoder=dict(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                          num_heads=4, relative_attention_num_buckets=8,
                          relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
                          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)),
}
#: the tiny preset with six blocks, so that pipeline tests can split it over three ranks and
#: move blocks between them
PRESETS["tiny6"] = WanPreset("tiny6", dict(PRESETS["tiny"].transformer, num_layers=6),
                             PRESETS["tiny"].vae, PRESETS["tiny"].text_encoder)


#: umT5-XXL's architecture (google/umt5-xxl, the encoder Wan 2.1 uses): 24 layers of width
#: 4096, about 5.7B parameters; for random-weight benchmarks at the real size
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                num_heads=64, relative_attention_num_buckets=32,
                relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def cast(model, dtype: torch.dtype):
    """Cast a diffusers model, keeping the modules it wants in float32 (norms, time
    embedding, modulation tables) in float32, as from_pretrained(torch_dtype=...) does."""
    if dtype == torch.float32:
        return model
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        if not any(k in name.split(".") for k in keep):
            param.data = param.data.to(dtype)
    for name, buf in model.named_buffers():
        if buf.is_floating_point() and not any(k in name.split(".") for k in keep):
            buf.data = buf.data.to(dtype)
    return model


def build_transformer(preset: WanPreset, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu"):
    """A randomly initialised WanTransformer3DModel of the preset's size."""
    from diffusers import WanTransformer3DModel

    with torch.device(device):
        model = WanTransformer3DModel(**preset.transformer)
    return cast(model, dtype).eval().requires_grad_(False)


def build_vae(preset: WanPreset, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu"):
    """A randomly initialised AutoencoderKLWan (the real topology unless the preset shrinks it)."""
    from diffusers import AutoencoderKLWan

    with torch.device(device):
        vae = AutoencoderKLWan(**preset.vae)
    return cast(vae, dtype).eval().requires_grad_(False)


def build_text_encoder(preset: WanPreset, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu"):
    """Tiny preset: a random umT5 encoder and a byte-level tokenizer that needs no files."""
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    if preset.text_encoder is None:
        raise ValueError(f"preset {preset.name} uses the pretrained umT5-XXL; load it with "
                         f"loaders.load_text_encoder.")
    torch.manual_seed(0)
    with torch.device(device):
        config = UMT5Config(**preset.text_encoder)
        encoder = UMT5EncoderModel(config) if dtype == torch.float32 else \
            _in_dtype(lambda: UMT5EncoderModel(config), dtype)
    return ByT5Tokenizer(), encoder.to(dtype=dtype).eval().requires_grad_(False)


def _in_dtype(build, dtype: torch.dtype):
    """Build a module with its parameters created in ``dtype`` (a 5.7B-parameter encoder
    built in float32 first would need 22 GB on the way)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return build()
    finally:
        torch.set_default_dtype(old)


@torch.no_grad()
def encode_prompt(tokenizer, encoder, prompt: str, device: torch.device | str) -> torch.Tensor:
    """umT5 embeddings of one prompt, (1, 512, dim): real tokens then zeros, as Wan expects."""
    tokens = tokenizer([prompt], padding="max_length", max_length=TEXT_LEN, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ids = tokens.input_ids.to(device)
    mask = tokens.attention_mask.to(device)
    hidden = encoder(ids, mask).last_hidden_state
    length = int(mask.sum())
    out = torch.zeros_like(hidden)
    out[:, :length] = hidden[:, :length]
    return out
