"""The causal Wan 2.1 family: few-step autoregressive generators distilled from Wan 2.1 T2V
(StreamDiffusionV2, Self-Forcing, CausVid, LongLive, Reward Forcing, Causal Forcing).

Every member is a Wan 2.1 DiT (1.3B or 14B architecture, original Wan key names) shipped as a
torch training checkpoint; they differ in where the state dict sits in the file, in the key
prefixes their training wrappers added, and in how their authors run them (the ``Schedule``).
The VAE, the umT5 encoder and the tokenizer always come from the base Wan release
(``entry.base``: the ``wan-1.3b`` / ``wan-14b`` registry entries).

API for the engine (docs/video-engine.md, "The causal Wan family", cites every value):

    from livediffusion.daemon.models.family import FAMILY, load_family_generator
    entry = FAMILY["self-forcing-1.3b"]
    entry.schedule.timesteps          # as the authors' config lists them
    entry.schedule.sampling_timesteps()  # what the DiT is called with (warped if .warp)
    entry.schedule.chunk_frames, .first_chunk_frames, .window, .sinks, .sink_mode
    entry.schedule.prompt_switch      # "none" | "recache" (+ .recache_frames)
    dit = load_family_generator(entry, path, "1.3b")  # diffusers WanTransformer3DModel

``path`` is the checkpoint file (``entry.files[0]`` under the model's snapshot); members with an
adapter (LongLive's LoRA, ``entry.lora_file``) find it next to the snapshot's other files, or
take it as ``lora_path``.  Nothing here imports torch until a loader runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

GB = 1_000_000_000
#: one 1.3B Wan DiT state dict in float32 (1,419,385,896 parameters x 4 bytes)
_F32_13B = 5_677_543_584


@dataclass(frozen=True)
class Schedule:
    """How the authors run the generator: the engine reads these as its defaults."""

    #: denoising timesteps as the authors' config lists them (terminal 0 dropped)
    timesteps: tuple[int, ...]
    #: the flow-matching shift of the scheduler the model was distilled with
    shift: float
    #: whether ``timesteps`` are mapped through the shifted scheduler before use
    #: (``warp_denoising_step``): t -> 1000 * s*u / (1 + (s-1)*u), u = t/1000
    warp: bool
    #: latent frames per autoregressive chunk (``num_frame_per_block``)
    chunk_frames: int
    #: latent frames of the first chunk (the same as chunk_frames for every member)
    first_chunk_frames: int
    #: latent frames of history the self-attention sees (KV cache length, sinks included);
    #: the members trained with global attention over 21 frames use 21 (32760 tokens / 1560)
    window: int
    #: of those, the first frames kept as attention sinks (0: plain sliding window)
    sinks: int = 0
    #: "none" | "fixed" (first frames kept) | "adaptive" (StreamDiffusionV2: replaced when
    #: dissimilar, threshold sink_param) | "ema" (Reward Forcing: evicted frames blended into
    #: the sink, weight sink_param on the old sink)
    sink_mode: Literal["none", "fixed", "adaptive", "ema"] = "none"
    sink_param: float = 0.0
    #: steps used for the first chunk when it differs (Causal Forcing++ 1/2-step models)
    first_chunk_timesteps: tuple[int, ...] | None = None
    #: video-to-video: "noise_scale" (input latents mixed with noise, StreamDiffusionV2) or
    #: "none" (the authors release text-to-video only)
    v2v: Literal["noise_scale", "none"] = "none"
    noise_scale: float | None = None
    #: what happens on a prompt change: "none" (new cross-attention K/V only) or "recache"
    #: (LongLive: self-attention KV rebuilt from the last recache_frames generated frames
    #: under the new prompt)
    prompt_switch: Literal["none", "recache"] = "none"
    recache_frames: int = 0
    #: timestep at which generated frames are re-run to fill the cache (context_noise)
    context_timestep: int = 0

    def sampling_timesteps(self, timesteps: tuple[int, ...] | None = None
                           ) -> tuple[float, ...]:
        """The timesteps the DiT is called with: ``timesteps`` (default the listed ones)
        warped through the shifted scheduler when ``warp`` is set, else as listed."""
        ts = self.timesteps if timesteps is None else timesteps
        if not self.warp:
            return tuple(float(t) for t in ts)
        s = self.shift
        return tuple(1000.0 * s * (t / 1000) / (1 + (s - 1) * (t / 1000)) for t in ts)


@dataclass(frozen=True)
class Licence:
    spdx: str   # SPDX identifier ("Apache-2.0", "CC-BY-NC-SA-4.0")
    note: str   # one line shown before a download

    def __str__(self) -> str:
        return f"{self.spdx} ({self.note})" if self.note else self.spdx


@dataclass(frozen=True)
class FamilyEntry:
    name: str                      # registry name, e.g. "self-forcing-1.3b"
    display: str                   # human name
    repo: str                      # Hugging Face model repository
    files: tuple[str, ...]         # files to fetch; files[0] is the generator checkpoint
    licence: Licence
    #: approximate download size in bytes (docs/video-engine.md says where each comes from)
    size_bytes: int
    base: Literal["1.3b", "14b"]   # Wan 2.1 architecture (and the base registry entry)
    #: top-level keys that may hold the generator state dict, tried in order; () means the
    #: file is the state dict itself
    keys: tuple[str, ...]
    #: key prefixes added by training wrappers, stripped (repeatedly) from every key
    prefixes: tuple[str, ...] = ("model.", "_fsdp_wrapped_module.")
    #: also accept a bare state dict when none of ``keys`` is present
    bare_ok: bool = False
    schedule: Schedule = field(default=None)  # type: ignore[assignment]
    #: an adapter merged at load: (file in the repo, rank, alpha); None for most members
    lora_file: str | None = None
    lora_rank: int = 0
    lora_alpha: float = 0.0
    github: str = ""               # the authors' code
    what: str = ""                 # one line for `models list`

    @property
    def base_entry(self) -> str:
        return f"wan-{self.base}"


def _warped4(**kw) -> Schedule:
    """Self-Forcing's schedule, shared by its descendants: 4 warped steps, shift 5."""
    return Schedule(timesteps=(1000, 750, 500, 250), shift=5.0, warp=True, **kw)


_SDV2 = Schedule(timesteps=(700, 500, 400, 200), shift=8.0, warp=False, chunk_frames=1,
                 first_chunk_frames=1, window=6, sinks=3, sink_mode="adaptive",
                 sink_param=0.2, v2v="noise_scale", noise_scale=0.8)

_APACHE_CODE = "code Apache-2.0; the Hub model card's licence was not checked here"

FAMILY: dict[str, FamilyEntry] = {e.name: e for e in [
    FamilyEntry(
        "sdv2-1.3b", "StreamDiffusionV2 1.3B", "jerryfeng/StreamDiffusionV2",
        ("wan_causal_dmd_v2v/model.pt",), Licence("Apache-2.0", _APACHE_CODE),
        _F32_13B, "1.3b", keys=("generator", "generator_ema", "state_dict"), bare_ok=True,
        schedule=_SDV2, github="chenfengxu714/StreamDiffusionV2",
        what="StreamDiffusionV2 causal few-step generator for Wan 1.3B (video-to-video)"),
    FamilyEntry(
        "sdv2-14b", "StreamDiffusionV2 14B", "jerryfeng/StreamDiffusionV2",
        ("wan_causal_dmd_v2v_14b/model.pt",), Licence("Apache-2.0", _APACHE_CODE),
        int(28.6 * GB), "14b", keys=("generator", "generator_ema", "state_dict"),
        bare_ok=True, schedule=_SDV2, github="chenfengxu714/StreamDiffusionV2",
        what="StreamDiffusionV2 causal few-step generator for Wan 14B (video-to-video)"),
    FamilyEntry(
        "self-forcing-1.3b", "Self-Forcing (DMD) 1.3B", "gdhe17/Self-Forcing",
        ("checkpoints/self_forcing_dmd.pt",), Licence("Apache-2.0", _APACHE_CODE),
        int(5.7 * GB), "1.3b", keys=("generator_ema", "generator"),
        schedule=_warped4(chunk_frames=3, first_chunk_frames=3, window=21),
        github="guandeh17/Self-Forcing",
        what="Self-Forcing DMD: 4-step chunk-wise text-to-video on Wan 1.3B"),
    FamilyEntry(
        "causvid-1.3b", "CausVid (autoregressive, DMD) 1.3B", "tianweiy/CausVid",
        ("autoregressive_checkpoint/model.pt",),
        Licence("CC-BY-NC-SA-4.0", "non-commercial, share-alike: the repository's "
                                   "LICENSE.md"),
        11_352_649_716, "1.3b", keys=("generator",),
        schedule=Schedule(timesteps=(1000, 757, 522), shift=8.0, warp=False, chunk_frames=3,
                          first_chunk_frames=3, window=21),
        github="tianweiy/CausVid",
        what="CausVid: 3-step chunk-wise text-to-video on Wan 1.3B (non-commercial)"),
    FamilyEntry(
        "longlive-1.3b", "LongLive 1.3B", "Efficient-Large-Model/LongLive-1.3B",
        ("models/longlive_base.pt", "models/lora.pt"),
        Licence("Apache-2.0", "since 2025-11-01 (was CC-BY-NC-SA-4.0); the Hub model card "
                              "was not checked here"),
        5_676_334_208 + 2_800_056_690, "1.3b", keys=("generator", "generator_ema", "model"),
        schedule=_warped4(chunk_frames=3, first_chunk_frames=3, window=12, sinks=3,
                          sink_mode="fixed", prompt_switch="recache", recache_frames=12),
        lora_file="models/lora.pt", lora_rank=256, lora_alpha=256.0,
        github="NVlabs/LongLive",
        what="LongLive: interactive long text-to-video, KV re-cache on a prompt switch"),
    FamilyEntry(
        "reward-forcing-1.3b", "Reward Forcing 1.3B", "JaydenLu666/Reward-Forcing-T2V-1.3B",
        ("rewardforcing.pt",), Licence("Apache-2.0", _APACHE_CODE),
        _F32_13B, "1.3b", keys=(), bare_ok=True,
        schedule=_warped4(chunk_frames=3, first_chunk_frames=3, window=9, sinks=3,
                          sink_mode="ema", sink_param=0.999),
        github="JaydenLyh/Reward-Forcing",
        what="Reward Forcing (Re-DMD): 4-step streaming text-to-video, EMA sink"),
    FamilyEntry(
        "causal-forcing-1.3b", "Causal Forcing (chunk-wise, 4 steps) 1.3B",
        "zhuhz22/Causal-Forcing", ("chunkwise/causal_forcing.pt",),
        Licence("Apache-2.0", _APACHE_CODE), _F32_13B, "1.3b", keys=("generator",),
        schedule=_warped4(chunk_frames=3, first_chunk_frames=3, window=21),
        github="thu-ml/Causal-Forcing",
        what="Causal Forcing: 4-step chunk-wise text-to-video on Wan 1.3B"),
    FamilyEntry(
        "causal-forcing-framewise-1.3b", "Causal Forcing (frame-wise, 4 steps) 1.3B",
        "zhuhz22/Causal-Forcing", ("framewise/causal_forcing.pt",),
        Licence("Apache-2.0", _APACHE_CODE), _F32_13B, "1.3b", keys=("generator_ema",),
        schedule=_warped4(chunk_frames=1, first_chunk_frames=1, window=21),
        github="thu-ml/Causal-Forcing",
        what="Causal Forcing: 4-step frame-wise text-to-video on Wan 1.3B"),
    FamilyEntry(
        "causal-forcing-2step-1.3b", "Causal Forcing++ (frame-wise, 2 steps) 1.3B",
        "zhuhz22/Causal-Forcing", ("causal-forcing++/framewise-2step.pt",),
        Licence("Apache-2.0", _APACHE_CODE), _F32_13B, "1.3b", keys=("generator_ema",),
        schedule=Schedule(timesteps=(1000, 500), shift=5.0, warp=True, chunk_frames=1,
                          first_chunk_frames=1, window=21,
                          first_chunk_timesteps=(1000, 750, 500, 250)),
        github="thu-ml/Causal-Forcing",
        what="Causal Forcing++: 2-step frame-wise (first frame 4 steps) on Wan 1.3B"),
    FamilyEntry(
        "causal-forcing-1step-1.3b", "Causal Forcing++ (frame-wise, 1 step) 1.3B",
        "zhuhz22/Causal-Forcing", ("causal-forcing++/framewise-1step.pt",),
        Licence("Apache-2.0", _APACHE_CODE), _F32_13B, "1.3b", keys=("generator_ema",),
        schedule=Schedule(timesteps=(1000,), shift=5.0, warp=True, chunk_frames=1,
                          first_chunk_frames=1, window=21,
                          first_chunk_timesteps=(1000, 750, 500, 250)),
        github="thu-ml/Causal-Forcing",
        what="Causal Forcing++: 1-step frame-wise (first frame 4 steps) on Wan 1.3B"),
]}


# --------------------------------------------------------------------------- loading

def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def family_state_dict(entry: FamilyEntry, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The generator's DiT weights (original Wan keys, prefixes stripped) from a checkpoint
    in ``entry``'s layout; a checkpoint in another layout is one WeightsError sentence."""
    from .loaders import WeightsError, generator_state_dict

    import torch

    top = list(checkpoint)[:6]
    sd = None
    for key in entry.keys:
        if isinstance(checkpoint.get(key), dict):
            sd = generator_state_dict(checkpoint, key)
            break
    if sd is None:
        bare = bool(checkpoint) and all(isinstance(v, torch.Tensor)
                                        for v in checkpoint.values())
        if not (bare and (entry.bare_ok or not entry.keys)):
            want = (f"a state dict under {' or '.join(repr(k) for k in entry.keys)}"
                    if entry.keys else "a bare state dict")
            raise WeightsError(f"{entry.display} checkpoints hold {want}, but this file's "
                               f"top-level keys are {', '.join(map(repr, top)) or 'none'}: "
                               f"wrong file for {entry.name}?")
        sd = generator_state_dict(checkpoint)  # bare: 'model.' prefixes stripped
    sd = {_strip(k, entry.prefixes): v for k, v in sd.items()}
    return sd


def _check_layout(entry: FamilyEntry, sd: dict[str, Any], preset: Any) -> None:
    from .loaders import WeightsError

    if "blocks.0.self_attn.q.weight" not in sd:
        sample = ", ".join(list(sd)[:3])
        hint = (" (diffusers key names: this loader reads the original Wan layout)"
                if "blocks.0.attn1.to_q.weight" in sd else "")
        raise WeightsError(f"{entry.display}: the state dict has no original Wan 2.1 DiT keys "
                           f"(blocks.0.self_attn.q.weight; found e.g. {sample}){hint}.")
    blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    num_layers = preset.transformer["num_layers"]
    if blocks != num_layers:
        raise WeightsError(f"{entry.display}: the checkpoint has {blocks} transformer blocks "
                           f"but the {preset.name} preset has {num_layers}: wrong model "
                           f"size?")


def merge_peft_lora(sd: dict[str, Any], lora: dict[str, Any], rank: int, alpha: float,
                    what: str = "LoRA") -> dict[str, Any]:
    """Merge a PEFT LoRA (keys ``base_model.model.<module>.lora_A.weight`` / ``lora_B``, or
    under ``generator_lora``) into original-layout weights: W += alpha/rank * B @ A."""
    from .loaders import WeightsError

    import torch

    if isinstance(lora.get("generator_lora"), dict):
        lora = lora["generator_lora"]
    pairs: dict[str, dict[str, Any]] = {}
    for k, v in lora.items():
        for side in ("lora_A", "lora_B"):
            marker = f".{side}."
            if marker in k:
                module = _strip(k.split(marker)[0], ("base_model.", "model."))
                pairs.setdefault(module, {})[side] = v
    if not pairs:
        raise WeightsError(f"{what}: no lora_A/lora_B weights found (keys e.g. "
                           f"{', '.join(list(lora)[:3])}).")
    scale = alpha / rank if rank else 1.0
    out = dict(sd)
    for module, ab in pairs.items():
        target = f"{module}.weight"
        if target not in out or "lora_A" not in ab or "lora_B" not in ab:
            raise WeightsError(f"{what}: adapter for {module} has no matching base weight "
                               f"or lacks lora_A/lora_B.")
        w = out[target]
        delta = ab["lora_B"].float() @ ab["lora_A"].float()
        out[target] = (w.float() + scale * delta).to(w.dtype)
    return out


def load_family_generator(entry: FamilyEntry | str, path: str | Path, preset: Any = None, *,
                          lora_path: str | Path | None = None, dtype=None,
                          device: str = "cpu"):
    """A family member's generator as a diffusers ``WanTransformer3DModel``.

    ``preset``: a ``wan.WanPreset`` or its name (default ``entry.base``; tests pass "tiny").
    ``lora_path``: the adapter for members that have one (default: ``entry.lora_file`` found
    by walking up from ``path`` to the snapshot root)."""
    import torch
    from diffusers import WanTransformer3DModel

    from .loaders import (WeightsError, _empty, _finish, _load_into, _restore_buffers,
                          original_to_diffusers_transformer, read_state_dict)
    from .wan import PRESETS

    entry = FAMILY[entry] if isinstance(entry, str) else entry
    preset = preset or entry.base
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    sd = family_state_dict(entry, read_state_dict(path))
    _check_layout(entry, sd, preset)
    if entry.lora_file:
        if lora_path is None:
            lora_path = _find_beside(Path(path), entry.files[0], entry.lora_file)
        if lora_path is None or not Path(lora_path).exists():
            raise WeightsError(f"{entry.display} needs its adapter {entry.lora_file} next to "
                               f"the checkpoint (livediffusion models pull {entry.name}).")
        sd = merge_peft_lora(sd, read_state_dict(lora_path), entry.lora_rank,
                             entry.lora_alpha, f"{entry.display} {entry.lora_file}")
    sd = original_to_diffusers_transformer(sd)
    model = _load_into(_empty(WanTransformer3DModel, preset.transformer), sd, str(path))
    _restore_buffers(model, preset)
    return _finish(model, torch.bfloat16 if dtype is None else dtype, device)


def _find_beside(path: Path, checkpoint_rel: str, wanted_rel: str) -> Path | None:
    """``wanted_rel`` in the snapshot that holds ``path`` (= <root>/<checkpoint_rel>)."""
    root = path
    for _ in Path(checkpoint_rel).parts:
        root = root.parent
    for cand in (root / wanted_rel, path.parent / Path(wanted_rel).name):
        if cand.exists():
            return cand
    return None
