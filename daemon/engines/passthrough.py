"""The passthrough engine: each frame comes back converted to the output spec.

A real feature, not a test double: it is the bypass an artist switches to mid-show, the
way to measure the transport's own latency, and (mode ``invert``) a visible transform
that proves in a host application that frames really went through the daemon.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch

from ..frames import as_tensor, convert, from_canonical, to_canonical
from .base import Engine, OutputFrame, StreamConfig, StreamInput, StreamOutput
from .schema import Schema, param

MODES = ("identity", "invert")


@dataclass(frozen=True)
class PassthroughParams:
    mode: str = param("identity", "identity: frames back as sent (converted to the output "
                      "format); invert: every colour channel c becomes 1 - c on the 0..1 "
                      "scale (255 - c for uint8), then the output format (alpha opaque)",
                      choices=MODES)
    gain: float = param(1.0, "every colour channel multiplied by this after the mode (0: "
                        "black, 1: as is; a fade to black and back over a transition)",
                        lo=0.0, hi=4.0)


SCHEMA = Schema(PassthroughParams, "passthrough")


class PassthroughEngine(Engine):
    name = "passthrough"
    borrows_input = True  # identity output is the input slot itself, copied once to the ring

    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self._streams: dict[int, tuple[StreamConfig, dict[str, Any]]] = {}

    def capabilities(self) -> dict[str, Any]:
        return {"frames_per_step": 1, "params": {"mode": list(MODES)},
                "schema": SCHEMA.to_list(), "device": str(self.device)}

    @staticmethod
    def _check(params: Mapping[str, Any]) -> dict[str, Any]:
        return asdict(SCHEMA.apply(PassthroughParams(), params)[0])

    def open_stream(self, config: StreamConfig) -> dict[str, Any]:
        params = self._check(config.params)
        self._streams[config.stream_id] = (config, params)
        return params

    def update_params(self, stream_id: int, params: Mapping[str, Any]) -> dict[str, Any]:
        config, current = self._streams[stream_id]
        merged = self._check({**current, **params})
        self._streams[stream_id] = (config, merged)
        return merged

    def check_params(self, stream_id: int, params: Mapping[str, Any]) -> dict[str, Any]:
        return self._check({**self._streams[stream_id][1], **params})

    def submit(self, batch: list[StreamInput]) -> list[StreamOutput]:
        outputs = []
        for item in batch:
            config, params = self._streams[item.stream_id]
            frame = item.frames[-1]
            if params["mode"] == "invert" or params["gain"] != 1.0:
                rgb = to_canonical(as_tensor(frame.pixels, self.device), frame.spec)
                if params["mode"] == "invert":
                    rgb = 1.0 - rgb
                if params["gain"] != 1.0:
                    rgb = (rgb * params["gain"]).clamp(0.0, 1.0)
                pixels = from_canonical(rgb, config.output)
            else:
                pixels = convert(frame.pixels, frame.spec, config.output, self.device)
            outputs.append(StreamOutput(item.stream_id,
                                        [OutputFrame(pixels, frame.seq, frame.ts)]))
        return outputs

    def close_stream(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)
