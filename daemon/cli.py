"""The ``livediffusion`` command line: daemon, demo, bench, doctor, keys."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from livediffusion.shared.client import DaemonError
from livediffusion.shared.protocol import DEFAULT_PORT, HEARTBEAT_TIMEOUT_S


class CliError(Exception):
    """A user-facing failure: printed as one sentence, exit status 2."""


def _sizes(text: str) -> list[tuple[int, int]]:
    return [_size(part) for part in text.split(",") if part.strip()]


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, not {text!r}") from None


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_daemon(args: argparse.Namespace) -> int:
    from .server import Daemon

    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip()) if args.engines \
        else None
    if args.image_unet:
        if not os.path.isfile(args.image_unet):
            raise CliError(f"no such file: {args.image_unet}.")
        os.environ["LIVEDIFFUSION_IMAGE_UNET"] = os.path.abspath(args.image_unet)
    from .config import ServeConfig

    serve = ServeConfig.from_env(policy=args.policy,
                                 pacing=False if args.no_pacing else None)
    # read where the engines are built (and by pipeline ranks, which inherit them)
    if args.profile:
        os.environ["LIVEDIFFUSION_PROFILE"] = args.profile
    if args.fp8:
        os.environ["LIVEDIFFUSION_FP8"] = {"on": "1", "off": "0"}.get(args.fp8, "auto")
    for flag, value, name in (("--lora-slots", args.lora_slots, "LIVEDIFFUSION_LORA_SLOTS"),
                              ("--lora-rank", args.lora_rank, "LIVEDIFFUSION_LORA_RANK")):
        if value is not None:
            if value < (0 if flag == "--lora-slots" else 1):
                raise CliError(f"{flag} must be {'0' if flag == '--lora-slots' else '1'} or "
                               f"more, not {value}.")
            os.environ[name] = str(value)
    if args.loras:
        os.environ["LIVEDIFFUSION_LORAS"] = os.path.abspath(os.path.expanduser(args.loras))
    _leave_a_core_for_the_front(args.device)
    if args.weights:
        from .models.loaders import WeightsError
        from .models.wan_folders import folder_size
        try:
            size = folder_size(args.weights)
        except WeightsError as exc:
            raise CliError(str(exc)) from None
        os.environ["LIVEDIFFUSION_WEIGHTS"] = os.path.abspath(os.path.expanduser(args.weights))
        if size not in ("1.3b", "14b"):
            raise CliError(f"--weights {args.weights}: a Wan model of a size the video "
                           f"engines do not serve (they serve 1.3B and 14B).")
        logging.getLogger("livediffusion.daemon").info("weights from %s (Wan 2.1 %s)",
                                                       args.weights, size.upper())
    gpus: tuple[str, ...] = ()
    if args.gpus is not None:
        from .parallel.pipeline import parse_gpus, torchrun_rank
        try:
            gpus = tuple(parse_gpus(args.gpus))
        except ValueError as exc:
            raise CliError(str(exc)) from None
        if torchrun_rank(engines, gpus):  # a rank other than 0 started by torchrun: done
            return 0
    try:
        daemon = Daemon(args.host, args.port, engines=engines,
                        device=_resolve_device(args.device), ipc_path=args.ipc,
                        heartbeat_timeout=args.heartbeat_timeout, max_streams=args.max_streams,
                        keys_dir=args.keys, warm_up=tuple(args.warm_up or ()),
                        warm_up_params=_param_sets(args.warm_up_params), serve=serve,
                        gpus=gpus)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.osc is not None:
        _add_osc(daemon, args)
    if args.metrics is not None:
        _add_metrics(daemon, args)
    if args.ui is not None:
        def make(endpoint, keys):
            from .ui import ControlPage
            return ControlPage(endpoint, args.ui, keys=keys)
        _add_client_companion(daemon, args, "the control page", make)
    daemon.serve_forever()
    return 0


def _leave_a_core_for_the_front(device: str) -> None:
    """On a CPU with 4 or more cores, torch's intra-op threads leave one core for the
    daemon's front (sockets, heartbeats, rings, passthrough): one busy engine had raised an
    image stream's p99 from 24 to 220 ms.  Not on fewer cores: on this 2-core VM one thread
    cut two video-tiny streams from 18.5 to 12.5 distinct FPS each (bench stream, afeade9),
    a worse trade than the latency it saves.  OMP_NUM_THREADS, when set, wins."""
    if device not in ("cpu", "auto") or os.environ.get("OMP_NUM_THREADS"):
        return
    import torch
    if device == "auto" and torch.cuda.is_available():
        return
    cores = os.cpu_count() or 1
    if cores >= 4:
        torch.set_num_threads(cores - 1)


def _add_metrics(daemon, args: argparse.Namespace) -> None:
    """The Prometheus endpoint beside the daemon (daemon/metrics.py), on loopback."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise CliError("--metrics needs prometheus-client: pip install "
                       "'livediffusion[daemon]'.") from None

    def make(endpoint, keys):
        from .metrics import MetricsExporter
        return MetricsExporter(endpoint, args.metrics, keys=keys)
    _add_client_companion(daemon, args, "the metrics endpoint", make)


def _add_client_companion(daemon, args: argparse.Namespace, label: str, make) -> None:
    """A companion that is a client of the daemon: ``make(endpoint, keys)`` builds it
    (something with ``start()`` returning itself and ``stop()``) once the daemon listens,
    with the client keys where the daemon requires CURVE."""
    def start(d):
        from .auth import client_keys
        keys = client_keys(args.keys) if args.keys else None
        return make(d.endpoint.replace("//0.0.0.0:", "//127.0.0.1:"), keys).start()
    start.__name__ = label
    daemon.add_companion(start, lambda companion: companion.stop())


def _add_osc(daemon, args: argparse.Namespace) -> None:
    """The OSC bridge beside the daemon (daemon/osc.py), a client of it."""
    from .server import is_loopback
    if not is_loopback(args.osc_host) and not args.keys:
        raise CliError(f"OSC on {args.osc_host} would let anyone on the network drive the "
                       f"streams, and OSC has no authentication; it needs --keys (the daemon's "
                       f"own port then requires CURVE keys) as a deliberate choice.")
    feedback = None
    if args.osc_feedback:
        host, _, port = args.osc_feedback.rpartition(":")
        if not host or not port.isdigit():
            raise CliError(f"--osc-feedback takes HOST:PORT, not {args.osc_feedback!r}.")
        feedback = (host, int(port))
    try:
        import pythonosc  # noqa: F401
    except ImportError:
        raise CliError("--osc needs python-osc: pip install 'livediffusion[daemon]'.") from None

    def make(endpoint, keys):
        from .osc import OscBridge
        return OscBridge(endpoint, args.osc, host=args.osc_host, feedback=feedback, keys=keys)
    _add_client_companion(daemon, args, "the OSC bridge", make)


def _param_sets(text: str | None) -> tuple[dict, ...]:
    """'steps=1,decoder=tiny;steps=2' -> ({'steps': 1, 'decoder': 'tiny'}, {'steps': 2})."""
    from .demo import _params

    if not text:
        return ()
    try:
        return tuple(_params([kv for kv in group.split(",") if kv.strip()])
                     for group in text.split(";") if group.strip())
    except ValueError as exc:
        raise CliError(str(exc)) from None


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(args)


def _engine_params(args: argparse.Namespace) -> dict:
    """--param KEY=VALUE pairs (and --prompt where the command has it) as engine params."""
    from .demo import _params

    try:
        params = _params(args.param)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    prompt = getattr(args, "initial_prompt", None)  # commands with _add_stream_args
    if prompt is None:
        prompt = getattr(args, "prompt", "")
    if prompt:
        params["prompt"] = prompt
    return params


def _connect(endpoint: str, name: str):
    from livediffusion.shared import Client

    try:
        return Client(endpoint, name=name).connect(timeout=10)
    except ConnectionError as exc:
        raise CliError(str(exc)) from None


def _declared_schema(engine: str) -> list[dict]:
    """An engine's parameter declaration in this install (no daemon needed)."""
    from .engines import REGISTRY
    if engine not in REGISTRY:
        raise CliError(f"no engine {engine!r}; there are {', '.join(REGISTRY)}.")
    if engine == "passthrough":
        from .engines.passthrough import SCHEMA
    elif engine.startswith("video"):
        from .engines.video.params import SCHEMA
    else:
        from .engines.image.params import SCHEMA
    return SCHEMA.to_list()


def _list_params(args: argparse.Namespace) -> int:
    from livediffusion.shared import Client

    source = "declared in this install"
    schema = None
    try:
        with Client(args.endpoint, name="params").connect(timeout=1.0) as client:
            caps = client.capabilities.get("engines", {}).get(args.list_engine)
            if caps is not None and "schema" in caps:
                schema, source = caps["schema"], f"of the daemon at {args.endpoint}"
    except (ConnectionError, TimeoutError):
        pass
    if schema is None:
        schema = _declared_schema(args.list_engine)
    print(f"{args.list_engine} parameters ({source}); effect: live = from the next step, "
          f"rebuild = part of the stream's state is rebuilt, restart = its history restarts")
    rows = []
    for p in schema:
        if p.get("choices"):
            values = " | ".join(p["choices"])
        elif "lo" in p or "hi" in p:
            values = f"{p.get('lo', '')} .. {p.get('hi', '')}"
        elif p.get("max_length"):
            values = f"at most {p['max_length']}"
        else:
            values = ""
        rows.append((p["name"], p["kind"], repr(p["default"]), values + (
            f" {p['unit']}" if p.get("unit") else ""), p["effect"], p["description"]))
    head = ("name", "kind", "default", "values", "effect", "meaning")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(5)]
    for row in [head] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5])
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from .demo import _params

    if args.list_engine:
        return _list_params(args)
    if not args.stream or not args.changes:
        raise CliError("give a stream's name and KEY=VALUE changes (or --list ENGINE).")
    try:
        changes = _params(args.changes)
    except ValueError as exc:
        raise CliError(str(exc).replace("--param", "each change")) from None
    client = _connect(args.endpoint, "params")
    try:
        effective = client.control(args.stream, changes, timeout=args.timeout,
                                   transition=_transition(args))
    except (DaemonError, TimeoutError) as exc:
        raise CliError(str(exc)) from None
    finally:
        client.close()
    if args.over:
        print(f"moving over {args.over:g} s from:")
    for key in sorted(changes):
        print(f"{key} = {effective.get(key)!r}")
    return 0


def _transition(args: argparse.Namespace) -> dict[str, Any] | None:
    """--over/--curve/--blend as a message's transition (None: at once)."""
    if not args.over:
        return None
    return {"seconds": args.over, "curve": args.curve, "blend": args.blend}


def _add_daemon_args(p: argparse.ArgumentParser) -> None:
    """The running daemon a command talks to, and how long it waits for each answer."""
    p.add_argument("--endpoint", default=f"tcp://127.0.0.1:{DEFAULT_PORT}")
    p.add_argument("--timeout", type=float, default=5.0)


def _add_transition_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--over", type=float, default=0.0, metavar="SECONDS",
                   help="move there over this many seconds, chunk by chunk (numbers glide, "
                        "the prompt and seed blend; the rest changes at the end)")
    p.add_argument("--curve", choices=["linear", "smooth"], default="linear")
    p.add_argument("--blend", choices=["linear", "slerp"], default="linear",
                   help="how the prompt's embeddings blend on the way")


def cmd_cues(args: argparse.Namespace) -> int:
    """livediffusion cues STREAM play FILE.json [--loop] | pause | resume | next |
    jump N | stop | status."""
    from livediffusion.shared.client import DaemonError
    cues = index = None
    if args.op == "play":
        if not args.arg:
            raise CliError("cues STREAM play FILE.json (a list of cues: preset or params, "
                           "transition, hold, label)")
        try:
            with open(args.arg, encoding="utf-8") as fh:
                cues = json.load(fh)
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot read the cue list {args.arg}: {exc}") from None
    elif args.op == "jump":
        try:
            index = int(args.arg or "")
        except ValueError:
            raise CliError("cues STREAM jump N (the cue's index, from 0)") from None
    client = _connect(args.endpoint, "cues")
    try:
        reply = client.cues(args.stream, args.op, cues, loop=args.loop, index=index,
                            timeout=args.timeout)
    except (DaemonError, TimeoutError) as exc:
        raise CliError(str(exc)) from None
    finally:
        client.close()
    state = reply.get("cues")
    if state is None:
        print(f"{args.stream}: no cue list")
    else:
        print(f"{args.stream}: cue {state['index']} of {state['count']} "
              f"{state['label']!r} {state['state']}{' (loop)' if state['loop'] else ''}")
    moving = reply.get("transition")
    if moving:
        print(f"  transition {moving['progress'] * 100:.0f}% of {moving['seconds']:g} s: "
              f"{', '.join(moving['moving']) or '-'}")
    return 0


def status_rows(streams: list[dict], previous: dict[str, tuple[float, int]], now: float
                ) -> list[tuple[str, ...]]:
    """One row per stream for ``livediffusion status``; frames out per second measured
    between two polls (``previous``: name -> (time, frames_out), updated)."""
    from .engines.base import clip
    rows = []
    for s in sorted(streams, key=lambda s: s["name"]):
        st, p = s.get("stats", {}), s.get("params", {})
        out = int(st.get("frames_out", 0))
        then = previous.get(s["name"])
        rate = (out - then[1]) / (now - then[0]) if then and now > then[0] else \
            float(st.get("fps_out", 0.0))
        previous[s["name"]] = (now, out)
        prompt = clip(str(p.get("prompt", p.get("mode", ""))), 40)
        rows.append((s["name"], s["engine"], f"{st.get('input_fps', 0):.1f}",
                     f"{st.get('serve_fps', 0):.1f}", f"{rate:.1f}",
                     str(st.get("dropped", 0)), str(st.get("decimated", 0)),
                     str(st.get("late", 0)), f"{st.get('delay_ms', 0):.0f}",
                     f"{st.get('latency_p50_ms', 0):.0f}/{st.get('latency_p99_ms', 0):.0f}",
                     f"{st.get('batch', 0):.1f}", f"{st.get('engine_ms', 0):.1f}",
                     str(p.get("steps", "")), _moving(st), prompt))
    return rows


def _moving(stats: dict) -> str:
    """A stream's transition and cue list in a few characters."""
    parts = []
    t, c = stats.get("transition"), stats.get("cues")
    if c:
        parts.append(f"cue {c['index'] + 1}/{c['count']}" + (" ||" if c["state"] == "paused"
                                                             else ""))
    if t:
        parts.append("waiting" if t["waiting"] else f"{t['progress'] * 100:.0f}%")
    return " ".join(parts) or "-"


def device_lines(overview: dict) -> list[str]:
    """Under the table: each engine worker's busy share and each GPU's memory."""
    lines = [f"worker {','.join(w['engines'])} on {w['device']}: busy {w['busy'] * 100:.0f}%"
             for w in overview.get("workers", [])]
    for g in overview.get("gpus", []):
        util = f", {g['utilization']}% utilised" if g.get("utilization") is not None else ""
        lines.append(f"GPU {g['index']} {g['name']}: {g['memory_used_gib']:.1f} of "
                     f"{g['memory_total_gib']:.1f} GiB{util}")
    return lines


STATUS_COLUMNS = ("stream", "engine", "in FPS", "serve FPS", "out FPS", "dropped",
                  "decimated", "late", "delay ms", "latency p50/p99 ms", "batch",
                  "engine ms", "steps", "moving", "prompt / mode")


def cmd_status(args: argparse.Namespace) -> int:
    """A live table of every stream of a running daemon (rich), or one snapshot."""
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from livediffusion.shared.client import DaemonError
    client = _connect(args.endpoint, "status")
    previous: dict[str, tuple[float, int]] = {}

    def table() -> Table:
        overview = client.overview(timeout=args.timeout)
        streams = overview.get("streams", [])
        out = Table(title=f"livediffusion at {args.endpoint}: {len(streams)} stream(s)",
                    title_justify="left", caption="\n".join(device_lines(overview)) or None,
                    caption_justify="left")
        for column in STATUS_COLUMNS:
            out.add_column(column, justify="left" if column in (
                "stream", "engine", "prompt / mode") else "right")
        for row in status_rows(streams, previous, time.monotonic()):
            out.add_row(*row)
        return out

    console = Console()
    try:
        if args.once:
            console.print(table())
            return 0
        with Live(table(), console=console, refresh_per_second=4) as live:
            while True:
                time.sleep(args.interval)
                live.update(table())
    except KeyboardInterrupt:
        return 0
    except (DaemonError, TimeoutError) as exc:
        raise CliError(str(exc)) from None
    finally:
        client.close()


def cmd_preset(args: argparse.Namespace) -> int:
    """livediffusion preset list | save NAME [--from STREAM] [KEY=VALUE ...] |
    recall NAME STREAM | delete NAME."""
    from livediffusion.shared.client import DaemonError

    from .demo import _params
    rest = list(args.rest)
    client = _connect(args.endpoint, "preset")
    try:
        if args.action == "list":
            presets = client.presets("list", timeout=args.timeout)
        elif args.action == "save":
            if not rest:
                raise CliError("preset save NAME [--from STREAM] [--keys A,B] [KEY=VALUE ...]")
            name, changes = rest[0], _params(rest[1:]) if rest[1:] else None
            if args.keys and args.source:
                # only these of the stream's parameters
                current = next((s["params"] for s in client.streams(timeout=args.timeout)
                                if s["name"] == args.source), None)
                if current is None:
                    raise CliError(f"no open stream is named {args.source!r}.")
                keys = [k.strip() for k in args.keys.split(",") if k.strip()]
                missing = [k for k in keys if k not in current]
                if missing:
                    raise CliError(f"stream {args.source!r} has no {', '.join(missing)}.")
                changes = {**{k: current[k] for k in keys}, **(changes or {})}
                presets = client.presets("save", name, params=changes, timeout=args.timeout)
            else:
                presets = client.presets("save", name, params=changes, source=args.source,
                                         timeout=args.timeout)
        elif args.action == "recall":
            if len(rest) != 2:
                raise CliError("preset recall NAME STREAM")
            effective = client.control(rest[1], preset=rest[0], timeout=args.timeout,
                                       transition=_transition(args))
            print(f"{rest[1]}: preset {rest[0]!r} recalled")
            for key in sorted(effective):
                print(f"  {key} = {effective[key]!r}")
            return 0
        else:
            if len(rest) != 1:
                raise CliError("preset delete NAME")
            presets = client.presets("delete", rest[0], timeout=args.timeout)
    except (DaemonError, TimeoutError, ValueError) as exc:
        raise CliError(str(exc)) from None
    finally:
        client.close()
    if not presets:
        print("no presets")
    for name, entry in presets.items():
        params = ", ".join(f"{k}={v!r}" for k, v in sorted(entry["params"].items()))
        print(f"{name}: {params[:200]}{'...' if len(params) > 200 else ''}")
    return 0


def cmd_webcam(args: argparse.Namespace) -> int:
    import threading

    from livediffusion.plugins.virtualcam.bridge import (WebcamBridge, WebcamSettings,
                                                         open_source)

    settings = WebcamSettings(args.size[0], args.size[1], args.fps, args.engine,
                              args.process_size, _engine_params(args), args.backend,
                              args.camera_device,
                              stream_name=getattr(args, "stream_name", "webcam"))
    try:
        source = open_source(args.source)
    except RuntimeError as exc:
        raise CliError(str(exc)) from None
    client = _connect(args.endpoint, "webcam")
    factory = None
    if args.rawvideo is not None:
        from livediffusion.plugins.virtualcam.rawvideo import RawVideoSink

        def factory(**kw):
            made = getattr(args, "rawvideo_sink", None)  # obs setup listens before OBS reads
            if made is not None and (made.width, made.height) == (kw["width"], kw["height"]):
                return made
            sink = RawVideoSink(kw["width"], kw["height"], kw["fps"], port=args.rawvideo)
            obs = sink.obs_media_source_settings()
            if settings.stream_name == "webcam":  # not when obs setup made the Media Source
                print(f"raw video on {obs['input']}: in OBS add a Media Source, untick Local "
                      f"File, Input {obs['input']}, Input Format rawvideo, FFmpeg options "
                      f"'{obs['ffmpeg_options']}'")
            return sink
    bridge = WebcamBridge(client, source, settings, camera_factory=factory)
    try:
        try:
            bridge.start()
        except (RuntimeError, DaemonError) as exc:
            raise CliError(str(exc)) from None
        output = "virtual camera" if args.rawvideo is None else "raw video"
        print(f"{output} {settings.width}x{settings.height} at {settings.fps:g} FPS from "
              f"{args.source}, engine {bridge.engine} at {bridge.process[0]}x"
              f"{bridge.process[1]}; type a new prompt and press Enter, Ctrl-C to stop")

        def read_prompts() -> None:
            for line in sys.stdin:
                if line.strip():
                    bridge.prompts.put(line.strip())

        threading.Thread(target=read_prompts, daemon=True).start()
        try:
            bridge.run(args.seconds)
        except KeyboardInterrupt:
            pass
    finally:
        bridge.close()
        client.close()
        source.release()
    return 0


def cmd_obs(args: argparse.Namespace) -> int:
    from livediffusion.plugins.obs import build as obs_build
    from livediffusion.plugins.obs import websocket as ows

    try:
        if args.action == "install":
            build_dir = Path(args.build_dir).expanduser()
            obs_build.build(build_dir, tests=False, cmake_args=tuple(args.cmake_arg))
            dest = obs_build.install(build_dir, args.dest)
            print(f"installed the livediffusion filter into {dest}; restart OBS, then add it "
                  f"with right click on a source > Filters > + > livediffusion (or "
                  f"livediffusion obs setup --source NAME).")
            return 0
        password = args.obs_password or os.environ.get("OBS_WEBSOCKET_PASSWORD", "")
        if args.action == "prompt":
            if not args.prompt:
                raise CliError('obs prompt needs the prompt: livediffusion obs prompt "a forest".')
            return _obs_prompt(args, ows, password)
        if args.action == "setup" and (args.source is None) == (args.media_source is None):
            raise CliError("obs setup needs either --source NAME (add the filter to that OBS "
                           "source) or --media-source webcam:N|FILE (plugin-free path).")
        cl = ows.connect(args.obs_host, args.obs_port, password)
        if args.action == "sync":
            if not args.audio_source:
                raise CliError("obs sync needs --audio-source NAME (the microphone or camera "
                               "audio to delay).")
            filters = [f for f in ows.list_filters(cl, args.source)
                       if args.filter_name is None or f.filter == args.filter_name]
            if len(filters) != 1:
                where = ", ".join(f"{f.source} / {f.filter}" for f in filters) or "none"
                raise CliError(f"obs sync needs exactly one livediffusion filter (found: "
                               f"{where}); pick one with --source / --filter-name.")
            offset, latency, frame_ms = ows.sync_audio(cl, args.audio_source, filters[0])
            print(f"audio of {args.audio_source!r} delayed by {offset} ms (filter latency "
                  f"{latency} ms + one frame {frame_ms:.0f} ms); run it again after changing "
                  f"engine, steps or size.")
            return 0
        if args.action == "status":
            filters = ows.list_filters(cl, args.source)
            for f in filters:
                state = "on" if f.enabled else "off"
                print(f"{f.source} / {f.filter} ({state}, stream {f.stream_name}): "
                      f"{f.status or 'no status yet'}")
            if not filters:
                print("no livediffusion filter in OBS.")
            return 0
        params = _engine_params(args)
        if args.source is not None:
            name = args.filter_name or ows.DEFAULT_FILTER_NAME
            keys_dir = str(Path(args.keys).expanduser().resolve()) if args.keys else ""
            settings = ows.filter_settings(endpoint=args.endpoint, engine=args.engine,
                                           prompt=None, params=params, keys_dir=keys_dir)
            done = ows.add_filter(cl, args.source, settings, name)
            print(f"{done} filter {name!r} on {args.source!r} (engine {args.engine}, daemon "
                  f"{args.endpoint}); its daemon stream is "
                  f"{ows.FilterInfo(args.source, name, True, {}).stream_name!r}.")
            return 0
        from livediffusion.plugins.virtualcam.rawvideo import RawVideoSink, media_source_settings
        width, height = args.size
        sink = None
        if not args.no_run:
            # listen first: OBS's first connection attempt then finds the port open
            sink = RawVideoSink(width, height, args.fps, port=args.rawvideo_port)
        try:
            done = ows.add_media_source(cl, media_source_settings(args.rawvideo_port, width,
                                                                  height, args.fps),
                                        args.media_name, args.scene)
        except ows.ObsError:
            if sink is not None:
                sink.close()
            raise
        print(f"{done} Media Source {args.media_name!r} reading "
              f"tcp://127.0.0.1:{args.rawvideo_port} ({width}x{height} at {args.fps:g} FPS).")
        if args.no_run:
            print(f"start the stream with: livediffusion webcam {args.media_source} --rawvideo "
                  f"{args.rawvideo_port} --size {width}x{height} --fps {args.fps:g}")
            return 0
        args.source, args.rawvideo = args.media_source, args.rawvideo_port
        args.backend = args.camera_device = None
        args.stream_name, args.rawvideo_sink = "obs-media", sink
        try:
            return cmd_webcam(args)
        finally:
            sink.close()
    except (ows.ObsError, obs_build.BuildError) as exc:
        raise CliError(str(exc)) from None


def _obs_prompt(args: argparse.Namespace, ows, password: str) -> int:
    """The prompt of the filters in OBS (through obs-websocket); when OBS is not reachable
    or has no filter, of the daemon streams named by --stream (the Media Source path)."""
    changes = {"prompt": args.prompt}
    changed = []
    try:
        cl = ows.connect(args.obs_host, args.obs_port, password)
        changed = ows.set_filter_settings(cl, changes, args.source, args.filter_name)
    except ows.ObsError as exc:
        if not args.stream:
            raise
        print(f"({exc})")
    for f in changed:
        print(f"prompt of {f.source} / {f.filter} set")
    if changed and not args.stream:
        return 0
    streams = args.stream or ["obs-media"]
    client = _connect(args.endpoint, "obs-prompt")
    try:
        for name in streams:
            try:
                client.control(name, changes)
                print(f"prompt of daemon stream {name!r} set")
            except DaemonError as exc:
                if args.stream:
                    raise CliError(f"stream {name!r}: {exc}") from None
                raise CliError("no livediffusion filter in OBS and no 'obs-media' stream in "
                               "the daemon: run livediffusion obs setup first.") from None
    finally:
        client.close()
    return 0


def cmd_spout(args: argparse.Namespace) -> int:
    from livediffusion.plugins.spout.bridge import (SpoutBridge, SpoutSettings, SyphonBridge,
                                                    spout_unavailable_reason,
                                                    syphon_unavailable_reason)

    syphon = args.command == "syphon"
    reason = (syphon_unavailable_reason if syphon else spout_unavailable_reason)()
    if reason:
        raise CliError(reason)
    params = _engine_params(args)
    client = _connect(args.endpoint, args.command)
    settings = SpoutSettings(args.receive_from, args.send_as, args.engine, params, args.invert,
                             stream_name=args.command)
    bridge = (SyphonBridge if syphon else SpoutBridge)(client, settings)
    print(f"reading {args.command} source {args.receive_from!r}, publishing "
          f"{args.send_as!r} (engine {args.engine}); Ctrl-C to stop")
    try:
        bridge.run(args.seconds)
    except KeyboardInterrupt:
        pass
    finally:
        bridge.close()
        client.close()
    return 0


def cmd_touchdesigner(args: argparse.Namespace) -> int:
    from livediffusion.plugins.touchdesigner.install import install

    try:
        target = install(args.target, args.platform, pip=not args.no_pip)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise CliError(f"could not fill {args.target}: {exc}") from None
    print(f"filled {target}; in TouchDesigner: Edit > Preferences > Python 64-bit Module Path "
          f"= {target}, restart TD, then run build_component.py from "
          f"{target / 'livediffusion' / 'plugins' / 'touchdesigner'} once (see its README).")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.suite == "transport":
        from .bench.transport import run_transport_bench
        return run_transport_bench(args)
    if args.suite == "video" and args.gpus is not None:
        from .bench.pipeline import run_pipeline_bench
        if args.model not in (None, "1.3b", "14b", "tiny", "tiny6"):
            raise CliError(f"video models: 1.3b, 14b, tiny, tiny6; not {args.model!r}.")
        try:
            return run_pipeline_bench(args)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    if args.suite == "video":
        from .bench.video import run_video_bench
        args.model = args.model or "1.3b"
        if args.model not in ("1.3b", "14b", "tiny"):
            raise CliError(f"video models: 1.3b, 14b, tiny; not {args.model!r}.")
        args.steps = args.steps or "1,2,3,4"
        return run_video_bench(args)
    if args.suite == "image":
        from .bench.image import run_image_bench
        return run_image_bench(args)
    if args.suite == "stream":
        from .bench.stream import run_stream_bench
        return run_stream_bench(args)
    raise CliError(f"unknown benchmark {args.suite!r}.")


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import run_doctor
    return run_doctor(args)


def cmd_models(args: argparse.Namespace) -> int:
    from .models import registry

    if args.action == "list":
        print(f"{'name':<30} {'state':<8} {'size':>8}  {'licence':<16} repository")
        for entry in registry.MODELS.values():
            path = registry.local_path(entry.name)
            print(f"{entry.name:<30} {'present' if path else 'absent':<8} "
                  f"{registry.human_size(entry.size_bytes):>8}  "
                  f"{entry.licence or 'see model card':<16} {entry.repo}")
            print(f"{'':<4}{entry.what}" + (f"\n{'':<4}{path}" if path else ""))
        return 0
    if args.name not in registry.MODELS:
        raise CliError(f"unknown model {args.name!r}; known: {', '.join(registry.MODELS)}.")
    entry = registry.MODELS[args.name]
    if args.action == "verify":
        report = registry.verify(args.name)
        for f in report.files:
            print(f"{'ok ' if f.ok else 'BAD'} {f.path}: "
                  + (f"{registry.human_size(f.size or 0)}, {f.note}" if f.present else
                     f"missing (livediffusion models pull {args.name})"))
        for note in report.notes:
            print(f"note: {note}")
        print(f"{args.name}: " + ("verified" if report.ok else "NOT verified"))
        return 0 if report.ok else 1
    print(f"{args.name}: {entry.repo}, about {registry.human_size(entry.size_bytes)}; "
          f"licence: {entry.licence or 'see the model card'}"
          + (f" ({entry.licence_note})" if entry.licence_note else ""), flush=True)
    try:
        path = registry.pull(args.name)
    except registry.NotEnoughSpace as exc:
        raise CliError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - network/hub errors come in many types
        raise CliError(f"could not download {args.name} ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:200]}); check the network and that "
                       f"huggingface.co is reachable.") from None
    print(f"{args.name} is in {path}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from .auth import init_keys
    paths = init_keys(args.directory)
    print(f"daemon keys in {args.directory}; authorised client key pair in "
          f"{paths['client_secret'].parent}. Start the daemon with --keys {args.directory} and "
          f"copy {args.directory} (without server.key_secret) to the client machine.")
    return 0


def _add_stream_args(p: argparse.ArgumentParser, output: str) -> None:
    """Options shared by the commands that stream a camera or file through the daemon."""
    p.add_argument("--endpoint", default=f"tcp://127.0.0.1:{DEFAULT_PORT}")
    p.add_argument("--engine", default="auto", help="engine (default: the best the daemon has)")
    p.add_argument("--size", type=_size, default=(1280, 720),
                   help=f"{output} WxH (default 1280x720)")
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--process-size", type=_size, default=None,
                   help="WxH the engine works at (default: the largest it takes, same aspect)")
    p.add_argument("--prompt", dest="initial_prompt", default="", help="initial prompt")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="engine parameter, repeatable")
    p.add_argument("--seconds", type=float, default=None, help="stop after this long")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="livediffusion",
        description="Real-time diffusion for live video: a local GPU daemon and its tools.")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("daemon", help="serve streams (the engine process)",
                       description="Run the streaming daemon in the foreground. Stop it with "
                                   "Ctrl-C or SIGTERM; every shared-memory segment is removed.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default loopback; anything else needs --keys)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default "
                   f"{DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--engines", default="",
                   help="comma-separated engines to load (default: all available)")
    p.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--ipc", metavar="PATH", help="also listen on ipc://PATH (POSIX only)")
    p.add_argument("--keys", metavar="DIR",
                   help="require CURVE authentication with the keys in DIR")
    p.add_argument("--heartbeat-timeout", type=float, default=HEARTBEAT_TIMEOUT_S,
                   help="drop clients silent this many seconds (default 3)")
    p.add_argument("--max-streams", type=int, default=32)
    p.add_argument("--image-unet", metavar="FILE",
                   help="single-file checkpoint (original SD layout) of a model fine-tuned from "
                        "the image engine's base model: its UNet replaces the base one")
    p.add_argument("--warm-up", type=_sizes, metavar="WxH[,WxH]",
                   help="run each engine at these frame sizes before serving, so the first "
                        "stream does not wait for GPU kernel compilation (tens of seconds "
                        "per new size)")
    p.add_argument("--warm-up-params", metavar="K=V[,K=V][;...]", default=None,
                   help="video engines: warm up with these parameter sets too, each a batch "
                        "shape of its own (e.g. 'steps=1,decoder=tiny;steps=2'); the "
                        "passthrough engine skips them")
    p.add_argument("--policy", choices=["edf", "rr"], default=None,
                   help="scheduler: edf (deadline-aware, fair rates, admission; default) or "
                        "rr (the previous round robin, for comparisons)")
    p.add_argument("--no-pacing", action="store_true",
                   help="publish output frames as soon as they are ready instead of at the "
                        "input's cadence (for comparisons)")
    p.add_argument("--gpus", metavar="all|N|I,J,..", default=None,
                   help="split the video engine's DiT over several GPUs (pipeline parallel, "
                        "one process per GPU, started by the daemon or by torchrun): 'all', "
                        "a count, or device indices such as 0,1 (one index: '2,'); on a "
                        "machine without GPUs a count starts that many CPU ranks")
    p.add_argument("--osc", type=int, default=None, metavar="PORT",
                   help="OSC control on this UDP port: /livediffusion/<stream>/<param> "
                        "(docs/osc.md)")
    p.add_argument("--osc-host", default="127.0.0.1",
                   help="address the OSC port binds (default loopback; anything wider needs "
                        "--keys)")
    p.add_argument("--osc-feedback", default=None, metavar="HOST:PORT",
                   help="send changes and telemetry there (TouchOSC, TouchDesigner's OSC In)")
    p.add_argument("--metrics", type=int, default=None, metavar="PORT",
                   help="a Prometheus text endpoint at http://127.0.0.1:PORT/metrics "
                        "(per-stream FPS, drops, delay, engine time)")
    p.add_argument("--ui", type=int, default=None, metavar="PORT",
                   help="a control page at http://127.0.0.1:PORT/ (loopback only): thumbnails, "
                        "controls from each engine's schema, presets, transitions, cue lists "
                        "and telemetry")
    p.add_argument("--weights", default=None, metavar="DIR",
                   help="video: Wan weights in a folder you already have: the diffusers "
                        "layout, Wan's original release (Wan-AI/Wan2.1-T2V-1.3B as "
                        "downloaded) or StreamDiffusionV2's wan_models/ + ckpts/ tree")
    p.add_argument("--profile", default=None, metavar="auto|NAME",
                   help="video engines' memory profile (default auto: chosen from the GPU's "
                        "free memory; 'livediffusion doctor' lists the choice, "
                        "docs/video-engine.md the profiles)")
    p.add_argument("--lora-slots", type=int, default=None, metavar="N",
                   help="video: N LoRA slots on the DiT (default 0: no LoRA branch); streams "
                        "then set loras [[name, scale], ...] live (docs/video-engine.md, LoRA)")
    p.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="video: the highest LoRA rank a slot holds (default 64; each slot "
                        "costs R x (in + out) weights per adapted layer)")
    p.add_argument("--loras", default=None, metavar="DIR",
                   help="video: the folder of LoRA .safetensors files (default: loras in the "
                        "user data directory, platformdirs)")
    p.add_argument("--fp8", choices=["auto", "on", "off"], default=None,
                   help="the video DiT's linear layers in FP8 (default auto: as the profile "
                        "says; on needs an Ada or Hopper GPU)")
    p.set_defaults(func=cmd_daemon)

    p = sub.add_parser("demo", help="play a clip through a real daemon and write a video",
                       description="Start a daemon, play a procedurally generated clip (or "
                                   "a video file or webcam) through a real client over the real "
                                   "transport, write input|output side by side to a video, and "
                                   "print FPS and latency.")
    p.add_argument("source", nargs="?", default="",
                   help="video file, or webcam as 'webcam:0' (default: generated test clip)")
    p.add_argument("--engine", default="auto", help="engine to use (default: best available)")
    p.add_argument("--size", type=_size, default=(256, 256), help="WxH (default 256x256)")
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--frames", type=int, default=150, help="input frames to play (default 150)")
    p.add_argument("--output", default="livediffusion-demo.mp4", help="output video path")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="engine parameter, repeatable (e.g. mode=invert)")
    p.add_argument("--no-realtime", action="store_true",
                   help="send frames as fast as the engine takes them instead of at --fps")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("params", help="change a running stream's parameters by its name",
                       description="Change the parameters of an open stream, whichever tool "
                                   "opened it (e.g. the 'webcam' stream of livediffusion "
                                   "webcam): livediffusion params webcam prompt='a forest'.")
    p.add_argument("stream", nargs="?", help="the stream's name")
    p.add_argument("changes", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--list", metavar="ENGINE", dest="list_engine",
                   help="print ENGINE's parameters (kind, default, range, effect, meaning): a "
                        "running daemon's, else the declaration in this install")
    _add_transition_args(p)
    _add_daemon_args(p)
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("cues", help="play a cue list (presets with transition and hold times)",
                       description="A stream's cue list: play FILE.json (a JSON list of cues, "
                                   "each {\"preset\": NAME and/or \"params\": {...}, "
                                   "\"transition\": seconds, \"hold\": seconds, \"label\": "
                                   "text}), pause, resume, next, jump N, stop, status.")
    p.add_argument("stream", help="the stream's name")
    p.add_argument("op", choices=["play", "pause", "resume", "next", "jump", "stop", "status"])
    p.add_argument("arg", nargs="?", help="play: the cue file; jump: the index")
    p.add_argument("--loop", action="store_true", help="play: start over after the last cue")
    _add_daemon_args(p)
    p.set_defaults(func=cmd_cues)

    from .soak import add_parser as add_soak
    add_soak(sub)

    p = sub.add_parser("status", help="a live table of a running daemon's streams",
                       description="Every stream of a running daemon, whoever opened it: "
                                   "input, served and delivered FPS, drops, lateness, playout "
                                   "delay, engine time per step, steps and prompt. Ctrl-C "
                                   "ends it.")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="print one table and exit")
    _add_daemon_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("preset", help="named parameter presets, kept by the daemon",
                       description="list | save NAME [--from STREAM [--keys A,B]] [KEY=VALUE "
                                   "...] | recall NAME STREAM | delete NAME. Presets live in "
                                   "the daemon's presets.json (platformdirs' user config "
                                   "directory) and are recalled by any host, OSC included.")
    p.add_argument("action", choices=["list", "save", "recall", "delete"])
    p.add_argument("rest", nargs="*", metavar="ARG")
    p.add_argument("--from", dest="source", default=None, metavar="STREAM",
                   help="save: the current parameters of this stream")
    p.add_argument("--keys", default=None, metavar="A,B",
                   help="save --from: only these parameters")
    _add_transition_args(p)
    _add_daemon_args(p)
    p.set_defaults(func=cmd_preset)

    p = sub.add_parser("webcam", help="restyle a camera or video file into a virtual camera",
                       description="Read a camera (webcam:N) or a video file, stream it "
                                   "through a running daemon, and publish the result as a "
                                   "virtual camera (pyvirtualcam) that Zoom, Meet and OBS can "
                                   "pick. Type a new prompt in the terminal to change it live.")
    p.add_argument("source", nargs="?", default="webcam:0",
                   help="webcam:N or a video file (default webcam:0)")
    _add_stream_args(p, "virtual camera")
    p.add_argument("--backend", default=None,
                   help="pyvirtualcam backend (obs, unitycapture, v4l2loopback)")
    p.add_argument("--camera-device", default=None, help="virtual camera device name/path")
    p.add_argument("--rawvideo", type=int, default=None, metavar="PORT",
                   help="instead of a virtual camera, serve rgb24 raw video on "
                        "tcp://127.0.0.1:PORT (OBS Media Source, ffmpeg; no driver needed)")
    p.set_defaults(func=cmd_webcam)

    p = sub.add_parser("obs", help="OBS Studio: install the filter plugin, set it up, prompt",
                       description="install: build the livediffusion filter (CMake) into OBS's "
                                   "plugin folder. setup: through obs-websocket, add the "
                                   "filter to a source (--source), or create a Media Source "
                                   "fed with raw video by this command (--media-source, no "
                                   "plugin needed). prompt: change the prompt of running "
                                   "filters. status: each filter's state, FPS, latency. "
                                   "sync: delay an audio source by the filter's video delay.")
    p.add_argument("action", choices=["install", "setup", "prompt", "status", "sync"])
    p.add_argument("prompt", nargs="?", default=None, help="the new prompt (obs prompt)")
    p.add_argument("--obs-host", default="127.0.0.1")
    p.add_argument("--obs-port", type=int, default=4455)
    p.add_argument("--obs-password", default=None,
                   help="obs-websocket password (default: $OBS_WEBSOCKET_PASSWORD)")
    p.add_argument("--source", default=None, help="OBS source to put the filter on")
    p.add_argument("--filter-name", default=None,
                   help="filter name (setup default: livediffusion; prompt default: all)")
    p.add_argument("--media-source", default=None, metavar="webcam:N|FILE",
                   help="plugin-free path: create a Media Source and feed it from this "
                        "camera or video file through the daemon")
    p.add_argument("--media-name", default="livediffusion", help="Media Source name")
    p.add_argument("--audio-source", default=None, metavar="NAME",
                   help="sync: the OBS audio source (microphone) to delay")
    p.add_argument("--scene", default=None, help="scene for the Media Source (default: "
                                                 "the current one)")
    p.add_argument("--rawvideo-port", type=int, default=5581,
                   help="loopback port of the raw video (default 5581)")
    p.add_argument("--no-run", action="store_true",
                   help="only create the Media Source; feed it later with livediffusion webcam")
    p.add_argument("--stream", action="append", default=[], metavar="NAME",
                   help="obs prompt: also (or, without OBS, only) set the prompt of this "
                        "daemon stream (the Media Source path's is obs-media)")
    p.add_argument("--build-dir", default=os.path.join("~", ".cache", "livediffusion",
                                                       "obs-build"))
    p.add_argument("--dest", default=None, help="install: plugin folder (default: OBS's "
                                                "per-user plugin folder)")
    p.add_argument("--keys", default=None, metavar="DIR",
                   help="setup: CURVE keys folder for a daemon on another machine (from "
                        "livediffusion keys init, without server.key_secret)")
    p.add_argument("--cmake-arg", action="append", default=[], metavar="ARG",
                   help="install: extra CMake argument, repeatable (e.g. "
                        "-DCMAKE_PREFIX_PATH=C:/obs-studio/build for libobs on Windows)")
    _add_stream_args(p, "Media Source")
    p.set_defaults(func=cmd_obs, engine="auto")

    for command, what in (("spout", "a Spout sender in, daemon, a Spout sender out (Windows)"),
                          ("syphon", "a Syphon server in, daemon, a Syphon server out (macOS)")):
        p = sub.add_parser(command, help=what,
                           description=f"{what[0].upper()}{what[1:]}: Resolume, Unity, "
                                       f"TouchDesigner, MadMapper, OBS can use the daemon.")
        p.add_argument("--from", dest="receive_from", required=True, metavar="SOURCE",
                       help="name of the sender / server to read")
        p.add_argument("--as", dest="send_as", default="livediffusion", metavar="NAME",
                       help="name to publish under (default livediffusion)")
        p.add_argument("--endpoint", default=f"tcp://127.0.0.1:{DEFAULT_PORT}")
        p.add_argument("--engine", default="passthrough")
        p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("--invert", action="store_true", help="flip frames vertically")
        p.add_argument("--seconds", type=float, default=None, help="stop after this long")
        p.set_defaults(func=cmd_spout, command=command)

    p = sub.add_parser("touchdesigner", help="prepare the TouchDesigner component",
                       description="install: fill a folder TouchDesigner's Python reads with "
                                   "pyzmq and msgpack (for TD's platform and Python 3.11) and "
                                   "the component's code.")
    p.add_argument("action", choices=["install"])
    p.add_argument("target", nargs="?", default=os.path.join("~", "livediffusion-td"),
                   help="folder to fill (default ~/livediffusion-td)")
    p.add_argument("--platform", choices=["windows", "mac"], default=None,
                   help="TouchDesigner's platform (default: this machine's, Windows off macOS)")
    p.add_argument("--no-pip", action="store_true",
                   help="copy the component's code only (pyzmq and msgpack already there)")
    p.set_defaults(func=cmd_touchdesigner)

    p = sub.add_parser("bench", help="benchmarks that print a table (and JSON on request)",
                       description="transport: client-daemon round trips; video / image: "
                                   "the engines at real sizes with random weights.")
    p.add_argument("suite", choices=["transport", "video", "image", "stream"],
                   help="which benchmark (stream: what hosts see through a real daemon)")
    p.add_argument("--c-client", action="store_true",
                   help="transport: also time the OBS plugin's C client (needs CMake, libzmq)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--iterations", type=int, default=200,
                   help="round trips per case (transport) or chunks per case (video)")
    p.add_argument("--model", default=None,
                   help="video: 1.3b (default), 14b or tiny; image: sd-turbo (default), "
                        "sd15-lcm, sdxl-turbo or tiny (random weights)")
    p.add_argument("--height", type=int, action="append",
                   help="video: frame height, repeatable with --width (default 480 and 512)")
    p.add_argument("--width", type=int, action="append",
                   help="video: frame width (default 832 and 512)")
    p.add_argument("--steps", default=None,
                   help="denoising steps, comma-separated (video default 1,2,3,4; image 1)")
    p.add_argument("--cfg", default=None,
                   help="image: guidance modes, comma-separated (none, self, full, initialize; "
                        "default self)")
    p.add_argument("--vae", default="tiny", choices=["tiny", "full"],
                   help="image: TAESD-layout tiny VAE (default) or the full VAE")
    p.add_argument("--streams", default="1",
                   help="image: streams batched into each UNet call, comma-separated "
                        "(default 1)")
    p.add_argument("--vae-graphs", default="on",
                   help="image: the VAE's encode and decode as CUDA graphs, comma-separated "
                        "on,off (for A/B measurements in one run; default on)")
    p.add_argument("--device", default="auto", help="video: torch device")
    p.add_argument("--no-channels-last", action="store_true",
                   help="video: keep the VAE in NCDHW layout on GPUs (for A/B measurements)")
    p.add_argument("--no-compile", action="store_true",
                   help="video: run eagerly, without torch.compile (for A/B measurements)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="video: no CUDA graph of the DiT forward (for A/B measurements)")
    p.add_argument("--attention", default="auto", choices=["auto", "cudnn", "default"],
                   help="video: attention kernels: cuDNN first (auto on GPUs) or PyTorch's "
                        "default order (for A/B measurements)")
    p.add_argument("--decoders", default=None,
                   help="video: decoders to measure, comma-separated (vae, tiny; default "
                        "both; stream: vae)")
    p.add_argument("--clients", default="1,2,4",
                   help="stream: numbers of streams to run at once (default 1,2,4)")
    p.add_argument("--fps", type=float, default=30.0,
                   help="stream: frames per second each client sends (default 30)")
    p.add_argument("--size", type=_size, default=None,
                   help="stream: WxH (default 832x480 on a GPU, 64x64 for tiny)")
    p.add_argument("--seconds", type=float, default=None,
                   help="stream: steady-state seconds measured per case (default 10 GPU, "
                        "6 CPU)")
    p.add_argument("--policies", default="edf,rr",
                   help="stream: scheduler policies to compare, each in a daemon of its own "
                        "(edf = this one, rr = the previous round robin without pacing)")
    p.add_argument("--cases", default=None,
                   help="stream: decoder:steps pairs, comma-separated (e.g. vae:2,tiny:1; "
                        "default: --decoders x --steps, vae and 2)")
    p.add_argument("--no-events", action="store_true",
                   help="stream: skip opening, closing and re-prompting streams mid-run")
    p.add_argument("--no-engine-bench", action="store_true",
                   help="stream: skip the engine's own throughput beside the daemon's")
    p.add_argument("--gpus", metavar="all|N|I,J,..", default=None,
                   help="video, stream: split the video engine over pipeline ranks (as the "
                        "daemon's --gpus; a count gives CPU ranks where there is no GPU); "
                        "video with one device also runs the plain engine beside it")
    p.add_argument("--poll-hz", type=float, default=None,
                   help="stream: how often each host reads latest() (default 250, CPU 120)")
    p.add_argument("--encoders", default="vae",
                   help="video: encoders to measure, comma-separated (vae, tiny; default vae)")
    p.add_argument("--precision", default="bf16",
                   help="video: DiT linear layers, comma-separated bf16,fp8 (fp8: each case "
                        "again in FP8, with its error against bf16 per chunk)")
    p.add_argument("--text", default="stand-in", choices=["stand-in", "umt5"],
                   help="video: the text encoder: a one-layer stand-in (default) or a "
                        "real-size umT5-XXL with random weights (peak memory with a prompt "
                        "change included)")
    p.add_argument("--text-placement", default="streamed",
                   choices=["resident", "offloaded", "streamed"],
                   help="video --text umt5: where umT5 lives (default streamed: host memory, "
                        "visiting the GPU layer by layer)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("doctor", help="print versions, devices, extras, ports and weights",
                       description="One screen to paste into a bug report.")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("models", help="list, download or verify model weights",
                       description="list: the known weights with state, size, licence and "
                                   "repository; pull NAME: show the licence, check free disk "
                                   "space, download into the Hugging Face cache (huggingface_"
                                   "hub's progress bars; completed files are kept, so a re-run "
                                   "fetches only what is missing; with huggingface_hub 2.x a "
                                   "file cut off mid-way starts again from its beginning); "
                                   "verify NAME: compare the cached files' sizes and sha256 "
                                   "with the Hub's listing (offline: with the cache's own "
                                   "record, saying what could not be checked).")
    p.add_argument("action", choices=["list", "pull", "verify"])
    p.add_argument("name", nargs="?", default="", help="model to pull or verify (see list)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("keys", help="create CURVE keys for a daemon reachable from the LAN")
    p.add_argument("action", choices=["init"])
    p.add_argument("directory")
    p.set_defaults(func=cmd_keys)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except (CliError, OSError, ValueError, ConnectionError, TimeoutError, ImportError,
            DaemonError) as exc:
        if args.debug:
            raise
        text = str(exc).strip() or type(exc).__name__
        if isinstance(exc, ImportError):
            text = (f"{text}. Install the daemon's dependencies with "
                    f"pip install 'livediffusion[daemon]'.")
        print(f"livediffusion {args.command}: {text}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one sentence, traceback only with --debug
        if args.debug:
            raise
        print(f"livediffusion {args.command}: unexpected {type(exc).__name__}: {exc} "
              f"(run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
