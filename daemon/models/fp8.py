"""FP8 linear layers for the video DiT (Hopper and Ada GPUs; CPUs too, slowly, for tests).

Each of a block's linear layers (self-attention q/k/v/out, cross-attention q/k/v/out, the
FFN's two) keeps its weight as float8 e4m3 with one float32 scale per output row, and
quantises its input per token at run time (one scale per row of activations, from that row's
largest magnitude).  The product is ``torch._scaled_mm`` with both row-wise scales, in the
layer's own dtype (bf16): half the weight bytes and, on an H100/H200, twice the dense matmul
rate of bf16.  Under ``torch.compile`` the activation quantisation fuses into the kernel that
produces the activations.

The cross-attention keys and values run once per prompt, never per frame: quantising them
gains no speed but halves their memory (2 GiB of the 14B model), so they are FP8 too unless
``prompt_layers=False``.  Left in bf16: the embeddings, the time and text projections and
the head (small, and the head writes the flow directly).

Why not torchao's float8 configs: they refuse any device but CUDA sm89+ / MI300 / XPU, so the
path the tests run would not be the path users run; ``torch._scaled_mm`` takes row-wise
scales on CPUs and GPUs alike.  Its signature (``scale_a``, ``scale_b``, ``bias``,
``out_dtype``, ``use_fast_accum``) has been the same from torch 2.5 to 2.13.
"""

from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)   # 448
#: block linears that run once per prompt, not per frame (FP8 for their memory only)
PROMPT_ONLY = ("attn2.to_k", "attn2.to_v", "attn2.add_k_proj", "attn2.add_v_proj")


def supported(device: torch.device | str) -> bool:
    """True where FP8 matmuls run: CUDA compute capability 8.9 and above (Ada, Hopper,
    Blackwell), or the CPU (slow; for tests)."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _row_scales(x: torch.Tensor) -> torch.Tensor:
    """One float32 scale per row (last dimension reduced), so that row / scale fits e4m3."""
    return (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (rows, k) as e4m3 values and their per-row float32 scales (rows, 1)."""
    scale = _row_scales(x)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class FP8Linear(nn.Module):
    """A linear layer with an e4m3 weight scaled per output row and inputs scaled per token.

    ``weight`` (out, in) is float8; ``weight_scale`` (1, out) float32; ``bias`` in the layer's
    dtype.  Forward: y = (x_q @ w_q^T) * s_x * s_w + b, accumulated in float32."""

    def __init__(self, linear: nn.Linear, fast_accum: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        q, scale = quantize_rows(weight)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = nn.Parameter(scale.t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else \
            nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.out_dtype = weight.dtype
        #: Hopper's faster accumulation (fewer float32 promotions); measured error in
        #: docs/benchmarks.md
        self.fast_accum = fast_accum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        q, scale = quantize_rows(rows)
        out = torch._scaled_mm(q, self.weight.t(), scale_a=scale, scale_b=self.weight_scale,
                               bias=self.bias, out_dtype=self.out_dtype,
                               use_fast_accum=self.fast_accum and q.is_cuda)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3"


def _eligible(name: str, module: nn.Module, prompt_layers: bool) -> bool:
    return isinstance(module, nn.Linear) and \
        (prompt_layers or not name.endswith(PROMPT_ONLY)) and \
        module.in_features % 16 == 0 and module.out_features % 16 == 0


def quantize_blocks(transformer: nn.Module, blocks=None, fast_accum: bool = True,
                    device: torch.device | str | None = None,
                    prompt_layers: bool = True) -> int:
    """Replace the linear layers of ``transformer.blocks`` (those in ``blocks``,
    default all; blocks on the meta device are skipped, another pipeline rank holds them)
    by FP8Linear, in place, one block at a time (``prompt_layers=False``: the cross-attention
    keys and values stay as they are).  With ``device``, a transformer loaded in
    host memory moves there block by block as it is quantised, then the rest of it: the GPU
    never holds more than one block in bf16 (how the 14B model loads on a 24 GB card).
    Returns how many layers were replaced."""
    count = 0
    for i, block in enumerate(transformer.blocks):
        if blocks is not None and i not in blocks:
            continue
        if device is not None and next(block.parameters()).device.type != "meta":
            block.to(device)
        for name, module in list(block.named_modules()):
            if not _eligible(name, module, prompt_layers) or \
                    module.weight.device.type == "meta":
                continue
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, child, FP8Linear(module, fast_accum=fast_accum))
            count += 1
    if device is not None:
        transformer.to(device)  # embeddings, head, blocks left in bf16 (none on the meta device)
    return count


def is_quantized(transformer: nn.Module) -> bool:
    return any(isinstance(m, FP8Linear) for m in transformer.modules())


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float32 (b is the reference)."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))
