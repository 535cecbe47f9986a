"""Work an engine does beside its streams: encoding a new prompt.

One thread, and on CUDA a stream of its own, so the work overlaps the engine's steps instead
of running inside one (measured on an H200: a synchronous umT5-XXL encode froze the video
stream 0.38-0.44 s per prompt change; beside it, the stream's longest gap was 67-71 ms).
Results are complete when their future is: on CUDA the side stream is synchronised before
the future resolves, so any stream may use them at once.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable

import torch

from .base import EngineError


class Beside:
    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._pool: ThreadPoolExecutor | None = None
        self._stream = None
        self._preparing: dict[Any, Future] = {}

    def ready(self, owner: Any, texts: Iterable[str], cached: Callable[[str], bool],
              encode: Callable[[str], Any], inline: bool = False) -> bool:
        """True once every text is cached; until then the missing ones are encoded here
        (``inline``: no text thread, so now) or beside the streams, one job per ``owner``
        at a time (a stream preparing a timed transition asks at every step).  A failed
        encode raises EngineError once."""
        missing = [t for t in dict.fromkeys(texts) if not cached(t)]
        if not missing:
            self._preparing.pop(owner, None)
            return True
        if inline:
            for text in missing:
                encode(text)
            return True
        job = self._preparing.get(owner)
        if job is not None and job.done():
            del self._preparing[owner]
            if job.exception() is not None:
                raise EngineError(f"could not encode the prompts: {job.exception()}")
            job = None
        if job is None:
            self._preparing[owner] = self.submit(lambda: [encode(t) for t in missing])
        return False

    def forget(self, owner: Any) -> None:
        self._preparing.pop(owner, None)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="livediffusion-text")
        return self._pool.submit(self._run, fn, args)

    def _run(self, fn: Callable[..., Any], args: tuple) -> Any:
        if self.device.type != "cuda":
            return fn(*args)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._stream):
            out = fn(*args)
        self._stream.synchronize()
        return out

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
