"""LoRAs on the video DiT, switched live: unfused low-rank branches in fixed-capacity slots.

Each adapted linear layer of every DiT block (self-attention q/k/v/out, cross-attention
q/k/v/out, the FFN's two; bf16 or FP8 alike) is wrapped once, when the engine is built with
LoRA capacity (``--lora-slots S``, ``--lora-rank R``), so that

    y = base(x) + B_all (scale_rows * (A_all x)),   A_all (S*R, in), B_all (out, S*R)

where slot j holds one LoRA's A (rank r <= R rows, the rest zero) and B (alpha / r folded in,
columns past r zero): the zero padding is exact.  ``scale_rows`` (max_rows, S*R) is one
persistent buffer shared by every wrapped layer: row e is batch element e's scale of each
slot, repeated over the slot's R ranks.  The engine writes it (``copy_``) before each
forward, so two streams in one batched forward use their own LoRAs and scales, and a
captured CUDA graph or a compiled region reads new scales without being recorded again.
Loading a LoRA into a slot copies its weights into the slot's rows; removing it zeroes
them: neither changes a shape or an address, so nothing is recompiled or re-captured.

Files: ``.safetensors`` only (never pickle), in the layouts people publish, mapped to
diffusers' WanTransformer3DModel names (as diffusers' own converters in
``loaders/lora_conversion_utils.py`` do):

* diffusers / PEFT: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` / ``.lora_B.weight``
  (alpha from the file's ``lora_adapter_metadata`` when it has one, else alpha = rank);
* Wan's original module names (musubi-tuner's "other" format, ComfyUI, DiffSynth):
  ``diffusion_model.blocks.0.self_attn.q.lora_A.weight`` (or ``lora_down``/``lora_up``, an
  adapter name such as ``.lora_A.default.weight``, an optional ``.alpha``);
* kohya / musubi-tuner's default: ``lora_unet_blocks_0_self_attn_q.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha``.

Wan's names map as self_attn.{q,k,v,o} -> attn1.{to_q,to_k,to_v,to_out.0}, cross_attn.* ->
attn2.*, ffn.0 -> ffn.net.0.proj, ffn.2 -> ffn.net.2.  A file that adapts anything else
(embeddings, the head, norms' ``diff`` keys, DoRA scales, an I2V model's image
cross-attention) is refused with the keys named: the output would not be what its author
trained.  Everything a file can be refused for is found from its header (names, shapes and
the scalar alphas) before anything changes; the heavy part (reading and converting the
matrices, and on GPUs uploading them) runs beside the streams.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("livediffusion.video")

#: Wan's original module names -> diffusers' WanTransformer3DModel names (per block)
WAN_TO_DIFFUSERS = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
#: the adapted layers of a block, by their diffusers names
TARGETS = tuple(WAN_TO_DIFFUSERS.values())
_DOTTED = {**WAN_TO_DIFFUSERS, **{t: t for t in TARGETS}}
_FLAT = {name.replace(".", "_"): target for name, target in _DOTTED.items()}

_PREFIXES = ("transformer.", "diffusion_model.", "model.diffusion_model.")
_DOT_WEIGHT = re.compile(
    r"^blocks\.(\d+)\.(.+?)\.(lora_A|lora_B|lora_down|lora_up)(?:\.[A-Za-z0-9_-]+)?\.weight$")
_DOT_ALPHA = re.compile(r"^blocks\.(\d+)\.(.+)\.alpha$")
_KOHYA_WEIGHT = re.compile(r"^lora_unet_blocks_(\d+)_(.+?)\.(lora_down|lora_up)\.weight$")
_KOHYA_ALPHA = re.compile(r"^lora_unet_blocks_(\d+)_(.+)\.alpha$")

#: a batched forward's elements at most (4 streams x 4 steps, with room)
MAX_ROWS = 64
DEFAULT_RANK = 64


class LoraFileError(ValueError):
    """A LoRA file this engine cannot use (the message says why, in one line)."""


def default_folder() -> Path:
    """``--loras DIR`` (LIVEDIFFUSION_LORAS), else ``loras`` in platformdirs' user data
    directory."""
    override = os.environ.get("LIVEDIFFUSION_LORAS", "").strip()
    if override:
        return Path(override).expanduser()
    from platformdirs import user_data_dir
    return Path(user_data_dir("livediffusion")) / "loras"


def capacity_from_env() -> tuple[int, int]:
    """(slots, rank) from LIVEDIFFUSION_LORA_SLOTS (default 0: no LoRA branch) and
    LIVEDIFFUSION_LORA_RANK (default 64); ``--lora-slots``/``--lora-rank`` set them."""
    def read(name: str, default: int) -> int:
        raw = os.environ.get(name, "").strip()
        try:
            value = int(raw) if raw else default
        except ValueError:
            raise ValueError(f"{name} must be an integer, not {raw!r}.") from None
        if value < 0:
            raise ValueError(f"{name} must be 0 or more, not {value}.")
        return value
    return read("LIVEDIFFUSION_LORA_SLOTS", 0), read("LIVEDIFFUSION_LORA_RANK", DEFAULT_RANK)


# --- the branch -----------------------------------------------------------------------------

class _Scales:
    """The per-row scale buffer every wrapped layer reads (a plain object, not a module:
    ``.to()`` or ``state_dict`` never copy or save it, and all layers keep sharing it)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.rows = tensor


class LoraLinear(nn.Module):
    """``base`` (nn.Linear or FP8Linear) plus the slots' low-rank branch (module docstring).
    The branch runs in the model's dtype (bf16 beside an FP8 base).  Inputs are (rows,
    tokens, in): row e takes scale row e."""

    def __init__(self, base: nn.Module, scales: _Scales, width: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("lora_down", torch.zeros(width, self.in_features, dtype=dtype,
                                                      device=device), persistent=False)
        self.register_buffer("lora_up", torch.zeros(self.out_features, width, dtype=dtype,
                                                    device=device), persistent=False)
        self.scales = scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = F.linear(x.to(self.lora_down.dtype), self.lora_down)      # rows, tokens, S*R
        h.mul_(self.scales.rows[:x.shape[0]].unsqueeze(1))
        if y.dtype == h.dtype and y.is_contiguous():  # the add in the GEMM's epilogue
            y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), self.lora_up.t())
            return y
        return y + F.linear(h, self.lora_up).to(y.dtype)

    def extra_repr(self) -> str:
        return f"lora slots x rank = {self.lora_down.shape[0]}"


class LoraBank:
    """The wrapped layers of a transformer's blocks and their slots' weights and scales."""

    def __init__(self, transformer: nn.Module, slots: int, rank: int,
                 max_rows: int = MAX_ROWS) -> None:
        if slots < 1 or rank < 1:
            raise ValueError("a LoRA bank needs at least one slot of rank 1 or more.")
        ref = transformer.patch_embedding.weight
        self.dtype, self.device = ref.dtype, ref.device
        self.slots, self.rank, self.max_rows = slots, rank, max_rows
        self.scales = _Scales(torch.zeros(max_rows, slots * rank, dtype=self.dtype,
                                          device=self.device))
        self._written = [[0.0] * slots for _ in range(max_rows)]
        self.layers: dict[tuple[int, str], LoraLinear] = {}
        for i, block in enumerate(transformer.blocks):
            for target in TARGETS:
                parent_name, _, child = target.rpartition(".")
                parent = block.get_submodule(parent_name)
                base = getattr(parent, child) if not child.isdigit() else parent[int(child)]
                if isinstance(base, LoraLinear):
                    raise ValueError("this transformer's blocks already carry LoRA slots.")
                if base is None or not hasattr(base, "in_features"):
                    continue
                layer = LoraLinear(base, self.scales, slots * rank, self.dtype,
                                   base.weight.device if base.weight.device.type != "meta"
                                   else self.device)
                if child.isdigit():
                    parent[int(child)] = layer
                else:
                    setattr(parent, child, layer)
                self.layers[(i, target)] = layer

    def shapes(self) -> dict[tuple[int, str], tuple[int, int]]:
        """(block, target) -> (in_features, out_features) of every adapted layer."""
        return {key: (m.in_features, m.out_features) for key, m in self.layers.items()}

    def nbytes(self) -> int:
        return sum(m.lora_down.numel() * m.lora_down.element_size() +
                   m.lora_up.numel() * m.lora_up.element_size() for m in self.layers.values())

    @torch.no_grad()
    def fill(self, slot: int, weights: dict[tuple[int, str], tuple[torch.Tensor,
                                                                    torch.Tensor]]) -> None:
        """Slot ``slot`` := these (A (r, in), B (out, r) with alpha / r folded in) per layer,
        zeros in every other layer and past each rank.  In place: no shape or address
        changes."""
        lo, hi = slot * self.rank, (slot + 1) * self.rank
        current = torch.cuda.current_stream() if self.device.type == "cuda" else None
        for key, layer in self.layers.items():
            down, up = layer.lora_down[lo:hi], layer.lora_up[:, lo:hi]
            pair = weights.get(key)
            if pair is None:
                down.zero_()
                up.zero_()
                continue
            a, b = pair
            r = a.shape[0]
            down[:r].copy_(a)
            down[r:].zero_()
            up[:, :r].copy_(b)
            up[:, r:].zero_()
            if current is not None:  # made on the side stream: not reused before the copy
                for t in (a, b):
                    if t.is_cuda:
                        t.record_stream(current)

    def clear(self, slot: int) -> None:
        self.fill(slot, {})

    def write_rows(self, rows: Sequence[Sequence[float]]) -> None:
        """Row e of the scale buffer := element e's scale of each slot (only what changed
        goes to the device)."""
        if len(rows) > self.max_rows:
            raise ValueError(f"a forward of {len(rows)} elements; the LoRA scale buffer has "
                             f"{self.max_rows} rows.")
        changed = [e for e, row in enumerate(rows) if list(row) != self._written[e]]
        if not changed:
            return
        lo, hi = min(changed), max(changed) + 1
        block = torch.tensor([list(rows[e]) for e in range(lo, hi)], dtype=torch.float32)
        self.scales.rows[lo:hi].copy_(block.repeat_interleave(self.rank, dim=1)
                                      .to(self.dtype))
        for e in range(lo, hi):
            self._written[e] = list(rows[e])


# --- files ----------------------------------------------------------------------------------

@dataclass
class LoraFile:
    """What a file's header says: per adapted layer its keys, rank and alpha."""

    path: Path
    layout: str                       # "diffusers", "wan" or "kohya"
    entries: dict[tuple[int, str], tuple[str, str, int, float]]  # key A, key B, rank, alpha
    rank: int = 0
    stamp: tuple = ()                 # (mtime_ns, size) when inspected


def _strip_prefix(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _peft_alphas(metadata: dict[str, str] | None) -> tuple[float | None, dict[str, float]]:
    """The global lora_alpha and alpha_pattern diffusers writes in ``lora_adapter_metadata``
    (PEFT's LoraConfig), if the file has them."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return None, {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return None, {}
    alpha = meta.get("transformer.lora_alpha", meta.get("lora_alpha"))
    pattern = meta.get("transformer.alpha_pattern", meta.get("alpha_pattern")) or {}
    return (float(alpha) if isinstance(alpha, (int, float)) else None,
            {k: float(v) for k, v in pattern.items() if isinstance(v, (int, float))})


def inspect_file(path: str | Path, shapes: dict[tuple[int, str], tuple[int, int]],
                 max_rank: int) -> LoraFile:
    """Read a LoRA file's header (and its scalar alphas) and check it against the model's
    layers: LoraFileError naming the first problem, else what to load."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoraFileError(f"{path.name}: LoRAs are read from .safetensors files only.")
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            metadata = f.metadata()
            dims = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
            alpha_values = {k: f.get_tensor(k) for k in keys if k.endswith(".alpha")}
    except LoraFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise LoraFileError(f"{path.name} is not a readable safetensors file "
                            f"({type(exc).__name__}: {exc}).") from None
    parts: dict[tuple[int, str], dict[str, Any]] = {}
    layouts: set[str] = set()
    unknown: list[str] = []
    for key in keys:
        body = _strip_prefix(key)
        m = _KOHYA_WEIGHT.match(body) or _KOHYA_ALPHA.match(body)
        flat = m is not None
        if not flat:
            m = _DOT_WEIGHT.match(body) or _DOT_ALPHA.match(body)
        if m is None:
            unknown.append(key)
            continue
        module = m.group(2)
        target = (_FLAT if flat else _DOTTED).get(module)
        if target is None:
            unknown.append(key)
            continue
        layouts.add("kohya" if flat else "diffusers" if module in TARGETS else "wan")
        entry = parts.setdefault((int(m.group(1)), target), {})
        if body.endswith(".alpha"):
            kind = "alpha"
        else:
            kind = "down" if m.group(3) in ("lora_A", "lora_down") else "up"
        if kind in entry:
            raise LoraFileError(f"{path.name} has two {kind} entries for block {m.group(1)} "
                                f"{target} (one is {key!r}).")
        entry[kind] = key
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:3])
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise LoraFileError(
            f"{path.name} adapts what the video engine's LoRA slots do not cover ({shown}"
            f"{more}); they adapt the DiT blocks' attention and FFN linear layers only.")
    if not parts:
        raise LoraFileError(f"{path.name} holds no LoRA weights.")
    if len(layouts) > 1:
        raise LoraFileError(f"{path.name} mixes key layouts ({', '.join(sorted(layouts))}).")
    global_alpha, alpha_pattern = _peft_alphas(metadata)
    entries: dict[tuple[int, str], tuple[str, str, int, float]] = {}
    top = 0
    for (block, target), entry in sorted(parts.items()):
        where = f"block {block} {target}"
        if "down" not in entry or "up" not in entry:
            raise LoraFileError(f"{path.name}: {where} lacks its "
                                f"{'down (A)' if 'down' not in entry else 'up (B)'} matrix.")
        if (block, target) not in shapes:
            raise LoraFileError(f"{path.name} adapts {where}, which this model does not have "
                                f"(it has {1 + max(b for b, _ in shapes)} blocks): it was made "
                                f"for another model.")
        down, up = dims[entry["down"]], dims[entry["up"]]
        in_f, out_f = shapes[(block, target)]
        if len(down) != 2 or len(up) != 2 or down[1] != in_f or up[0] != out_f or \
                up[1] != down[0]:
            raise LoraFileError(
                f"{path.name}: {where} has A {list(down)} and B {list(up)}; this model's layer "
                f"takes A [rank, {in_f}] and B [{out_f}, rank]: it was made for another model "
                f"size.")
        rank = down[0]
        if rank > max_rank:
            raise LoraFileError(f"{path.name} has rank {rank} ({where}); the engine's LoRA "
                                f"slots hold rank {max_rank} at most (--lora-rank).")
        if "alpha" in entry:
            value = alpha_values[entry["alpha"]]
            if value.numel() != 1:
                raise LoraFileError(f"{path.name}: the alpha of {where} is not one number.")
            alpha = float(value.float().item())
        else:
            alpha = float(rank) if global_alpha is None else global_alpha
            name = f"blocks.{block}.{target}"
            for pattern, value in alpha_pattern.items():
                if re.match(rf"(.*\.)?({pattern})$", name):
                    alpha = value
                    break
        if not (alpha == alpha and abs(alpha) != float("inf")):
            raise LoraFileError(f"{path.name}: the alpha of {where} is not finite.")
        entries[(block, target)] = (entry["down"], entry["up"], rank, alpha)
        top = max(top, rank)
    stat = path.stat()
    return LoraFile(path, layouts.pop(), entries, top, (stat.st_mtime_ns, stat.st_size))


def load_weights(info: LoraFile, dtype: torch.dtype, device: torch.device | str
                 ) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """The file's matrices as the slots take them: A (r, in) and B * alpha / r (out, r), in
    ``dtype`` on ``device`` (the conversion is done in float32)."""
    from safetensors import safe_open
    out = {}
    with safe_open(str(info.path), framework="pt") as f:
        for key, (key_a, key_b, rank, alpha) in info.entries.items():
            a = f.get_tensor(key_a).float()
            b = f.get_tensor(key_b).float() * (alpha / rank)
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise LoraFileError(f"{info.path.name}: block {key[0]} {key[1]} has values "
                                    f"that are not finite.")
            out[key] = (a.to(device, dtype), b.to(device, dtype))
    return out


# --- the engine's slots: names, reference counts, loads beside the streams --------------------

@dataclass(eq=False)
class _Held:
    name: str
    slot: int
    info: LoraFile
    refs: int = 0
    job: Any = None            # the load's future until it is taken
    filled: bool = False
    failed: str | None = None


@dataclass
class SlotEvents:
    """What ``LoraSlots.take_ready`` changed (for logs and tests)."""

    filled: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class LoraSlots:
    """Which LoRA is in which slot, shared by name between streams (reference counted).

    ``check`` validates a stream's list without changing anything (ParamError-worthy
    problems come back as LoraFileError); ``acquire``/``release`` then move the references;
    a new name's file is read and converted by ``submit`` (the engine's thread beside the
    streams) and put in its slot by ``take_ready`` at the start of a step."""

    def __init__(self, bank: LoraBank, folder: str | Path,
                 submit: Callable[..., Any] | None = None) -> None:
        self.bank = bank
        self.folder = Path(folder)
        self.submit = submit   # None: load inline (no thread beside the streams)
        self.held: dict[str, _Held] = {}
        self._inspected: dict[Path, LoraFile] = {}

    @property
    def slots(self) -> int:
        return self.bank.slots

    def resolve(self, name: str) -> Path:
        """``name`` (with or without ``.safetensors``, subfolders allowed) inside the LoRA
        folder; LoraFileError if there is no such file."""
        if not isinstance(name, str) or not name.strip() or "\\" in name or \
                any(ord(c) < 32 for c in name):
            raise LoraFileError(f"{name!r:.80} is not a LoRA name.")
        if name.endswith(".pt") or name.endswith(".pth") or name.endswith(".ckpt") or \
                name.endswith(".bin"):
            raise LoraFileError(f"{name}: LoRAs are read from .safetensors files only (never "
                                f"pickle).")
        rel = Path(name if name.endswith(".safetensors") else name + ".safetensors")
        if rel.is_absolute() or ".." in rel.parts:
            raise LoraFileError(f"{name!r:.80}: a LoRA is named by its file inside the LoRA "
                                f"folder.")
        path = self.folder / rel
        if not path.is_file():
            raise LoraFileError(f"no LoRA {name!r} in {self.folder} (looked for {rel}; "
                                f"--loras DIR names the folder).")
        return path

    def inspect(self, name: str) -> LoraFile:
        path = self.resolve(name)
        stat = path.stat()
        cached = self._inspected.get(path)
        if cached is not None and cached.stamp == (stat.st_mtime_ns, stat.st_size):
            return cached
        info = inspect_file(path, self.bank.shapes(), self.bank.rank)
        self._inspected[path] = info
        while len(self._inspected) > 64:
            self._inspected.pop(next(iter(self._inspected)))
        return info

    def check(self, new: Sequence[str], old: Sequence[str] = ()) -> None:
        """Can a stream holding ``old`` switch to ``new``?  LoraFileError if not; changes
        nothing."""
        if len(new) > self.slots:
            raise LoraFileError(f"{len(new)} LoRAs asked for; the engine has "
                                f"{self.slots} slot{'s' * (self.slots != 1)} (--lora-slots).")
        added = [n for n in dict.fromkeys(new) if n not in self.held]
        for name in added:
            self.inspect(name)
        freed = [n for n in set(old) - set(new) if n in self.held and self.held[n].refs <= 1]
        in_use = len(self.held) - len(freed) + len(added)
        if in_use > self.slots:
            busy = ", ".join(sorted(set(self.held) - set(freed)))
            raise LoraFileError(f"every LoRA slot is in use ({self.slots}: {busy}); "
                                f"--lora-slots gives more.")

    def acquire(self, name: str) -> None:
        held = self.held.get(name)
        if held is None:
            free = sorted(set(range(self.slots)) - {h.slot for h in self.held.values()})
            if not free:
                raise LoraFileError("every LoRA slot is in use.")
            held = self.held[name] = _Held(name, free[0], self.inspect(name))
            if self.submit is None:
                self._fill(held, load_weights(held.info, self.bank.dtype, self.bank.device))
            else:
                held.job = self.submit(load_weights, held.info, self.bank.dtype,
                                       self.bank.device)
        held.refs += 1

    def release(self, name: str) -> None:
        held = self.held.get(name)
        if held is None:
            return
        held.refs -= 1
        if held.refs <= 0:
            del self.held[name]
            if held.filled:
                self.bank.clear(held.slot)   # a pending load's result is dropped unused

    def swap(self, old: Sequence[str], new: Sequence[str]) -> None:
        """A stream's names change from ``old`` to ``new`` (``check`` passed)."""
        for name in old:   # first: a slot one stream gives up may be the one it takes
            if name not in new:
                self.release(name)
        for name in new:
            if name not in old:
                self.acquire(name)

    def _fill(self, held: _Held, weights) -> None:
        self.bank.fill(held.slot, weights)
        held.filled = True

    def take_ready(self) -> SlotEvents:
        """Fill the slots whose loads are done (at the start of a step, on the engine's
        thread)."""
        events = SlotEvents()
        for held in list(self.held.values()):
            job = held.job
            if job is None or not job.done():
                continue
            held.job = None
            try:
                weights = job.result()
            except Exception as exc:  # noqa: BLE001 - the slot stays empty (scale 0)
                held.failed = f"{type(exc).__name__}: {exc}"
                log.error("could not load LoRA %s: %s", held.name, held.failed)
                events.failed.append(held.name)
                continue
            self._fill(held, weights)
            events.filled.append(held.name)
        return events

    def settle(self, timeout: float | None = 30.0) -> None:
        """Wait for every load in progress (tests, warm-up)."""
        for held in list(self.held.values()):
            if held.job is not None:
                held.job.exception(timeout)

    def slot_scales(self, pairs: Sequence[tuple[str, float]]) -> tuple[float, ...]:
        """A stream's scale of each slot: its LoRAs' scales where they are loaded, else 0."""
        out = [0.0] * self.slots
        for name, scale in pairs:
            held = self.held.get(name)
            if held is not None and held.filled:
                out[held.slot] = float(scale)
        return tuple(out)

    def touches_prompt(self, slots: set[int]) -> bool:
        """Whether a change of these slots' scales changes the cross-attention keys or
        values (computed once per prompt): a slot now empty counts as touching them."""
        prompt = ("attn2.to_k", "attn2.to_v")
        for slot in slots:
            held = next((h for h in self.held.values() if h.slot == slot), None)
            if held is None or any(t in prompt for _, t in held.info.entries):
                return True
        return False

    def describe(self) -> dict[str, Any]:
        return {"slots": self.slots, "rank": self.bank.rank, "folder": str(self.folder),
                "loaded": {h.name: {"slot": h.slot, "streams": h.refs, "ready": h.filled,
                                    "rank": h.info.rank, "layout": h.info.layout}
                           for h in self.held.values()}}

    def available(self) -> list[str]:
        """The LoRA names in the folder (for ``capabilities``)."""
        if not self.folder.is_dir():
            return []
        return sorted(str(p.relative_to(self.folder).with_suffix(""))
                      for p in self.folder.rglob("*.safetensors"))[:256]
