"""Single-file SD checkpoints (original LDM layout): the UNet of a fine-tuned model, loaded
with its base model's diffusers-layout config.

The test writes the tiny UNet's weights in the original layout with the key rules of the
original repository (model.diffusion_model.input_blocks / middle_block / output_blocks /
time_embed / out), then loads the file through diffusers' converter: every weight must come
back to its place.
"""

from __future__ import annotations

import torch

from livediffusion.daemon.models import sd

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet(prefix: str, name: str) -> str:
    head, _, rest = name.partition(".")
    return f"{prefix}.{RESNET[head]}.{rest}"


def to_original(unet) -> dict[str, torch.Tensor]:
    cfg = unet.config
    layers = cfg.layers_per_block
    out = {}
    for name, tensor in unet.state_dict().items():
        parts = name.split(".")
        if parts[0] == "time_embedding":
            key = {"linear_1": "time_embed.0", "linear_2": "time_embed.2"}[parts[1]] + \
                "." + parts[2]
        elif parts[0] == "conv_in":
            key = f"input_blocks.0.0.{parts[1]}"
        elif parts[0] == "conv_norm_out":
            key = f"out.0.{parts[1]}"
        elif parts[0] == "conv_out":
            key = f"out.2.{parts[1]}"
        elif parts[0] == "down_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            block = 1 + i * (layers + 1) + j
            if kind == "resnets":
                key = _resnet(f"input_blocks.{block}.0", rest)
            elif kind == "attentions":
                key = f"input_blocks.{block}.1.{rest}"
            else:  # downsamplers.0.conv
                key = f"input_blocks.{1 + i * (layers + 1) + layers}.0.op." + \
                    ".".join(parts[5:])
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            key = _resnet(f"middle_block.{2 * j}", rest) if kind == "resnets" else \
                f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            block = i * (layers + 1) + j
            if kind == "resnets":
                key = _resnet(f"output_blocks.{block}.0", rest)
            elif kind == "attentions":
                key = f"output_blocks.{block}.1.{rest}"
            else:  # upsamplers.0.conv: after the block's last resnet (and attention)
                last = i * (layers + 1) + layers
                has_attn = any(k.startswith(f"up_blocks.{i}.attentions.")
                               for k in unet.state_dict())
                key = f"output_blocks.{last}.{2 if has_attn else 1}.conv." + \
                    ".".join(parts[5:])
        else:
            raise AssertionError(f"unmapped {name}")
        out["model.diffusion_model." + key] = tensor.clone()
    return out


def test_a_single_file_unet_loads_with_its_base_models_config(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    unet = sd.build("tiny").unet
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p))  # every weight distinct from its initial value
    unet.save_pretrained(tmp_path / "base" / "unet")   # the base model's config
    save_file(to_original(unet), str(tmp_path / "finetune.safetensors"))
    loaded = sd.load_unet_file(tmp_path / "finetune.safetensors", tmp_path / "base",
                               dtype=torch.float32)
    mine, theirs = unet.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        torch.testing.assert_close(theirs[key], mine[key], msg=key)


def test_a_single_file_without_its_base_model_is_refused_with_a_sentence(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="base model must be pulled"):
        sd.load_unet_file(tmp_path / "x.safetensors", tmp_path)


def test_the_image_engine_takes_a_single_file_unet_over_its_base(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from livediffusion.daemon.engines.image.factory import build_real_image_engine
    from livediffusion.daemon.models import registry

    base = sd.build("tiny", seed=1)
    base.unet.save_pretrained(tmp_path / "sd-turbo" / "unet")
    base.text[0][1].save_pretrained(tmp_path / "sd-turbo" / "text_encoder")
    base.text[0][0].save_pretrained(tmp_path / "sd-turbo" / "tokenizer")
    base.vae.save_pretrained(tmp_path / "taesd")
    tuned = sd.build("tiny", seed=2).unet
    save_file(to_original(tuned), str(tmp_path / "tuned.safetensors"))
    places = {"sd-turbo": tmp_path / "sd-turbo", "taesd": tmp_path / "taesd"}
    monkeypatch.setattr(registry, "require", lambda name: places[name])
    monkeypatch.setattr(registry, "local_path", lambda name: places.get(name))
    monkeypatch.setenv("LIVEDIFFUSION_IMAGE_UNET", str(tmp_path / "tuned.safetensors"))
    engine = build_real_image_engine("sd-turbo", device="cpu")
    assert "UNet from tuned.safetensors" in engine.models.source
    got, want = engine.unet.state_dict(), tuned.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
