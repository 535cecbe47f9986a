"""LoRA fusion (LCM-LoRA) in the kohya and the diffusers/PEFT key layouts."""

from __future__ import annotations

import pytest
import torch

from livediffusion.daemon.models import sd
from livediffusion.daemon.models.lora import LoraError, fuse_lora, load_lora_file


def _targets(unet):
    """Linear and conv layers of the attention blocks, as LCM-LoRA adapts them."""
    out = {}
    for name, m in unet.named_modules():
        if ("attentions" in name and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                and name.split(".")[-1] in ("to_q", "to_k", "to_v", "0", "proj_in",
                                             "proj_out")):
            out[name] = m
    return out


def _lora_for(unet, rank: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, m in _targets(unet).items():
        w = m.weight
        fan_in = w[0].numel()
        lora[name] = (torch.randn(rank, fan_in, generator=g) * 0.1,
                      torch.randn(w.shape[0], rank, generator=g) * 0.1)
    return lora


def _expected(unet, lora, alpha, scale=1.0):
    want = {}
    for name, m in _targets(unet).items():
        down, up = lora[name]
        want[name] = m.weight + (scale * alpha / down.shape[0] * (up @ down)).reshape(
            m.weight.shape)
    return want


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_fusing_adds_scaled_up_times_down(layout, tmp_path):
    unet = sd.build("tiny").unet
    lora = _lora_for(unet)
    alpha = 8.0 if layout == "kohya" else 4.0
    want = _expected(unet, lora, alpha, scale=0.5)
    state = {}
    for name, (down, up) in lora.items():
        w = dict(unet.named_modules())[name].weight
        down_t = down.reshape(down.shape[0], *w.shape[1:])  # conv layers keep their kernel
        up_t = up.reshape(up.shape[0], up.shape[1], *([1] * (w.dim() - 2)))
        if layout == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = down_t
            state[f"{key}.lora_up.weight"] = up_t
            state[f"{key}.alpha"] = torch.tensor(alpha)
        else:
            state[f"unet.{name}.lora_A.weight"] = down_t
            state[f"unet.{name}.lora_B.weight"] = up_t
    from safetensors.torch import save_file
    save_file(state, str(tmp_path / "lora.safetensors"))
    n = fuse_lora(unet, load_lora_file(tmp_path / "lora.safetensors"), scale=0.5)
    assert n == len(lora) > 4
    modules = dict(unet.named_modules())
    for name, w in want.items():
        torch.testing.assert_close(modules[name].weight, w)


def test_a_lora_for_another_model_is_refused_with_a_sentence():
    unet = sd.build("tiny").unet
    bad = {"lora_unet_mid_block_attentions_7_proj_in.lora_down.weight": torch.zeros(4, 32),
           "lora_unet_mid_block_attentions_7_proj_in.lora_up.weight": torch.zeros(32, 4)}
    with pytest.raises(LoraError, match="made for another model"):
        fuse_lora(unet, bad)
    with pytest.raises(LoraError, match="no UNet LoRA"):
        fuse_lora(unet, {"text_encoder.x.lora_A.weight": torch.zeros(1, 1)})
