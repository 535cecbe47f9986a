"""The pipeline's processes: rank 0 (the daemon, where the engine lives) and ranks 1..N-1.

Rank 0's process holds the front (sockets, sessions, rings) and the engine; the other ranks
are processes the daemon starts itself (``--gpus``) or that torchrun started.  Each rank
holds a contiguous range of DiT blocks (``Stage``).  Messages flow one way round the ring:
rank 0 -> 1 -> ... -> N-1 (activations of a tick), and N-1 -> 0 (decoded frames and
re-noised latents).  Rank 0 never blocks on a rank for longer than a receive's time-out, and
notices a rank that died (its process has exited, or a transfer fails) within a poll.

The ranks' processes rendezvous over TCP on 127.0.0.1 only, and gloo and NCCL are told to use
the loopback interface: nothing of the pipeline is reachable from the network.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .channel import Channel, RankFailed
from .partition import moves

log = logging.getLogger("livediffusion.pipeline")

#: environment for the ranks' transports: loopback only
LOOPBACK_ENV = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}


def parse_gpus(value: str | int | None) -> list[str]:
    """The devices of the pipeline's ranks, from ``--gpus``: ``all`` (every CUDA device),
    ``N`` (the first N CUDA devices; N CPU ranks where there is no GPU, as the tests run
    it), or a list of CUDA indices ``0,1,3`` (one index needs its comma: ``2,``)."""
    if value is None:
        return []
    text = str(value).strip().lower()
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if text == "all":
        return [f"cuda:{i}" for i in range(cuda)] or ["cpu"]
    if "," in text:
        ids = [int(p) for p in text.split(",") if p.strip()]
        bad = [i for i in ids if not 0 <= i < cuda]
        if bad:
            raise ValueError(f"--gpus {value}: no CUDA device {bad[0]} here "
                             f"({cuda} found).")
        if len(set(ids)) != len(ids):
            raise ValueError(f"--gpus {value}: a device appears twice.")
        return [f"cuda:{i}" for i in ids]
    count = int(text)
    if count < 1:
        raise ValueError("--gpus needs at least one rank.")
    if cuda == 0:
        return ["cpu"] * count
    if count > cuda:
        raise ValueError(f"--gpus {count}: only {cuda} CUDA device(s) here.")
    return [f"cuda:{i}" for i in range(count)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, device: str, init_method: str | None, timeout: float
          ) -> tuple[Any, dict[str, Any]]:
    """Join the process group; returns (meta group, data groups by direction)."""
    from datetime import timedelta
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(device))
    # a rank may wait for its next tick for as long as the daemon is idle; a rank that dies
    # is noticed at once (its connections close, its process exits), one that hangs by rank
    # 0's receive time-out
    kwargs: dict[str, Any] = {"timeout": timedelta(days=7)}
    if init_method is not None:
        kwargs["init_method"] = init_method
    if cuda:
        # NCCL for tensors, gloo for the headers (plain bytes on the CPU)
        dist.init_process_group("nccl", rank=rank, world_size=world,
                                device_id=torch.device(device), **kwargs)
        meta = dist.new_group(backend="gloo", timeout=kwargs["timeout"])
        back = dist.new_group(backend="nccl", timeout=kwargs["timeout"])
        move = dist.new_group(backend="nccl", timeout=kwargs["timeout"])
        return meta, {"fwd": dist.group.WORLD, "back": back, "move": move}
    dist.init_process_group("gloo", rank=rank, world_size=world, **kwargs)
    return dist.group.WORLD, {}   # gloo on CPUs: tensors travel with the headers


@dataclass
class Ranks:
    """Rank 0's handle on the pipeline: the channel, the ranks' processes, the split."""

    devices: list[str]
    ranges: list[range]
    channel: Channel | None = None
    processes: list[subprocess.Popen] = field(default_factory=list)
    failed: str | None = None
    #: per rank: the latest stage times reported (ms): {"blocks": .., "extra": ..}
    stage_ms: list[dict[str, float]] = field(default_factory=list)

    @property
    def world(self) -> int:
        return len(self.devices)

    @property
    def last(self) -> int:
        return self.world - 1

    @classmethod
    def start(cls, parts: str, devices: list[str], ranges: list[range], *,
              timeout: float = 600.0, launch: bool = True) -> Ranks:
        """Start ranks 1..N-1 (``launch``; else torchrun did) and join them as rank 0."""
        ranks = cls(devices, list(ranges))
        ranks.stage_ms = [{} for _ in devices]
        if ranks.world == 1:
            return ranks
        if dist.is_initialized():
            raise ValueError("one engine per daemon can be split over GPUs (torch.distributed "
                             "has one default process group per process); load the others "
                             "without --gpus or in a daemon of their own.")
        init = None
        if launch:
            port = _free_port()
            init = f"tcp://127.0.0.1:{port}"
            env = {**os.environ, **LOOPBACK_ENV}
            for rank in range(1, ranks.world):
                cmd = [sys.executable, "-m", "livediffusion.daemon.parallel.pipeline",
                       "--parts", parts, "--rank", str(rank), "--world", str(ranks.world),
                       "--device", devices[rank], "--init", init,
                       "--ranges", json.dumps([[r.start, r.stop] for r in ranges]),
                       "--timeout", str(timeout)]
                ranks.processes.append(subprocess.Popen(cmd, env=env))
        meta, data = _init(0, ranks.world, devices[0], init, timeout)
        ranks.channel = Channel(0, torch.device(devices[0]), meta, data, world=ranks.world,
                                alive=ranks.alive, timeout=timeout, watch=(ranks.world - 1,))
        return ranks

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Wait until every rank has built its stage (they build while rank 0 builds its
        own), so nothing is served before the whole pipeline can run."""
        for rank in range(1, self.world):
            header, _ = self.channel.recv(rank, timeout=timeout)
            if header.get("kind") != "ready" or header.get("rank") != rank:
                raise RankFailed(f"pipeline rank {rank} sent {header.get('kind')!r} instead "
                                 f"of 'ready'", rank)

    def alive(self) -> str | None:
        for rank, process in enumerate(self.processes, start=1):
            code = process.poll()
            if code is not None:
                return f"pipeline rank {rank} ({self.devices[rank]}) exited with code {code}"
        return None

    def stop(self, grace: float = 10.0) -> None:
        """Tell every rank to finish, then make sure their processes are gone."""
        if self.channel is not None and self.failed is None:
            try:
                self.channel.send(1, {"kind": "stop"})
                self.channel.flush()
                while self.channel.recv(self.last, timeout=grace)[0].get("kind") != "stop":
                    pass  # results nobody waits for any more
            except RankFailed:
                self.failed = "a rank did not stop"
        deadline = time.monotonic() + grace
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        if dist.is_initialized() and self.failed is None:
            dist.destroy_process_group()
        self.channel = None

    def kill(self) -> None:
        """After a failure: the process group cannot be trusted; end every rank."""
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            process.wait()
        self.processes.clear()
        self.channel = None
        if dist.is_initialized():  # nothing talks on it any more (its peers are gone)
            dist.destroy_process_group()


def torchrun_rank(engines: tuple[str, ...] | None, gpus: tuple[str, ...]) -> bool:
    """Under torchrun (RANK and WORLD_SIZE set): on ranks other than 0, serve as a pipeline
    rank of the one pipelined engine named and return True once told to stop; on rank 0 (or
    without torchrun) return False at once and let the daemon start."""
    if not under_torchrun():
        return False
    from ..engines import PIPELINE_PARTS
    named = [e for e in (engines or ()) if e in PIPELINE_PARTS]
    if len(named) != 1:
        raise ValueError("under torchrun, --engines must name exactly one video engine.")
    rank = int(os.environ["RANK"])
    if rank == 0:
        return False
    world = int(os.environ["WORLD_SIZE"])
    if len(gpus) != world:
        raise ValueError(f"torchrun started {world} processes but --gpus names {len(gpus)}.")
    main(["--parts", PIPELINE_PARTS[named[0]], "--rank", str(rank), "--world", str(world),
          "--device", gpus[rank], "--ranges", json.dumps(
              [[r.start, r.stop] for r in first_split(PIPELINE_PARTS[named[0]], world)])])
    return True


def first_split(parts: str, world: int) -> list[range]:
    """The blocks of each rank before anything is measured: an even split (the block
    scheduler moves blocks from the stage times measured while serving)."""
    from ..models import wan as W
    from .partition import partition
    _, _, preset = parts.partition("@")[0].partition(":")
    return partition([1.0] * W.PRESETS[preset].transformer["num_layers"], world)


def under_torchrun() -> bool:
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


# --- ranks 1..N-1 -------------------------------------------------------------------------------


def build_stage(parts_spec: str, device: str, rank: int, world: int, blocks: range,
                *, text: bool = False):
    """The Stage a rank runs (rank 0's engine builds its own with the same parts)."""
    from ..engines.video.factory import build_parts
    from ..engines.video.vae_stream import StreamingVAE
    from ..models.causal_wan import CausalWan
    from .stage import Stage

    parts = build_parts(parts_spec, device, text=text)
    wan = CausalWan(parts.transformer)
    last = rank == world - 1
    vae = StreamingVAE(parts.vae) if last else None
    if vae is not None and world > 1:
        vae.keep_only("decoder")  # rank 0 encodes
    if device.startswith("cuda"):
        from ..config import env_flag
        if env_flag("LIVEDIFFUSION_COMPILE"):
            wan.compile()
            if vae is not None:
                vae.compile()
            torch.backends.cudnn.benchmark = True
    stage = Stage(wan, blocks, rank, world, vae=vae,
                  tiny_decoder=parts.tiny_decoder if last else None)
    stage.drop_foreign_blocks()
    if not last:
        parts.vae.to("meta")
    return stage, parts


def serve_rank(stage, channel: Channel) -> None:
    """A rank's loop: apply ops, run its stage of each tick, pass it on; move blocks when
    told; stop when told.  A failed tick is reported to rank 0 (one message) and the rank
    goes on: the engine resets the streams of that step."""
    rank, world = stage.rank, stage.world
    prev, nxt = rank - 1, (rank + 1) % world
    while True:
        header, tensors = channel.recv(prev)
        kind = header["kind"]
        if kind == "stop":  # passed on, and back to rank 0 (its receiver thread ends)
            channel.send(nxt, header)
            channel.flush()
            return
        if kind == "ops":
            n = header["n_tensors"]
            stage.apply(header["ops"], tensors[:n])
            if nxt != 0:
                channel.send(nxt, header, tensors)
            continue
        if kind == "move":
            if nxt != 0:
                channel.send(nxt, header)
            move_blocks(stage, channel, [range(a, b) for a, b in header["old"]],
                        [range(a, b) for a, b in header["new"]])
            continue
        if kind == "error":  # an earlier rank failed this tick: pass the word on
            channel.send(nxt, header)
            continue
        try:
            out_header, out = stage.run(header, tensors)
        except Exception as exc:  # noqa: BLE001 - reported to rank 0, the rank goes on
            log.error("pipeline rank %d failed tick %s: %s: %s", rank, header.get("tick"),
                      type(exc).__name__, exc)
            channel.send(nxt, {"kind": "error", "tick": header.get("tick"), "rank": rank,
                               "message": f"{type(exc).__name__}: {exc}",
                               "oom": isinstance(exc, torch.OutOfMemoryError)})
            continue
        channel.send(nxt, out_header, out)


def move_blocks(stage, channel: Channel, old: list[range], new: list[range]) -> None:
    """This rank's part of a rebalance (every rank runs it, the pipeline drained): send the
    blocks that leave, take those that come, then drop what left.  Sends never wait for
    the receiver, so ranks swapping blocks cannot deadlock."""
    mine = [(b, to) for b, frm, to in moves(old, new) if frm == stage.rank]
    incoming = [(b, frm) for b, frm, to in moves(old, new) if to == stage.rank]
    for block, to in mine:
        header, tensors = stage.give(block)
        channel.send(to, {"kind": "block", **header}, tensors)
    for block, frm in sorted(incoming):
        header, tensors = channel.recv(frm)
        if header.get("block") != block:
            raise RankFailed(f"rank {stage.rank} expected block {block} from rank {frm}, got "
                             f"{header.get('block')}")
        stage.take(header, tensors)
    channel.flush()
    for block, _ in mine:
        stage.release(block)
    stage.set_blocks(new[stage.rank])


def _watch_parent() -> None:
    """End this rank once the daemon that started it is gone, however it went (a rank
    blocked in a receive from a killed peer does not always hear of it)."""
    import threading
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        log.error("pipeline rank: the daemon (pid %d) is gone; exiting", parent)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one rank of a livediffusion pipeline")
    parser.add_argument("--parts", required=True)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--world", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--init", default=None, help="tcp://127.0.0.1:PORT (else env://)")
    parser.add_argument("--ranges", required=True)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints where a rank is
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{args.rank} %(message)s")
    rank = args.rank if args.rank is not None else int(os.environ["RANK"])
    world = args.world if args.world is not None else int(os.environ["WORLD_SIZE"])
    device = args.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
                             if torch.cuda.is_available() else "cpu")
    ranges = [range(a, b) for a, b in json.loads(args.ranges)]
    if args.init is not None:  # started by the daemon: it ends with the daemon
        _watch_parent()
    meta, data = _init(rank, world, device, args.init, args.timeout)
    stage, _ = build_stage(args.parts, device, rank, world, ranges[rank])
    # its receives block: a rank waits for its next tick as long as the daemon is idle, and
    # learns that rank 0 is gone when the connection closes
    channel = Channel(rank, torch.device(device), meta, data, world=world,
                      timeout=args.timeout)
    channel.send(0, {"kind": "ready", "rank": rank})
    try:
        serve_rank(stage, channel)
    except RankFailed as exc:
        log.error("pipeline rank %d stops: %s", rank, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
