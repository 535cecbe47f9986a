"""obs-websocket set-up (obsws-python): put the livediffusion filter on a source, create the
plugin-free Media Source, change a running filter's prompt, read the filters' status, delay
an audio source to match the filter's video delay.

OBS's websocket server listens on every interface; we only ever connect to it on loopback
unless told otherwise. obsws-python logs the password at INFO level and refusals as
tracebacks, so its logger is silenced here: failures come back as one ObsError sentence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

FILTER_KIND = "livediffusion_filter"
DEFAULT_FILTER_NAME = "livediffusion"
DEFAULT_MEDIA_SOURCE = "livediffusion"
DEFAULT_OBS_PORT = 4455


class ObsError(RuntimeError):
    """OBS cannot be reached or refused a request; the message is one sentence."""


@dataclass
class FilterInfo:
    source: str
    filter: str
    enabled: bool
    settings: dict[str, Any]

    @property
    def status(self) -> str:
        return str(self.settings.get("status", "")).rstrip()  # padded: see ld_filter.c

    @property
    def stream_name(self) -> str:
        """The daemon stream the filter opens (see ld_filter.c: stream_name_for)."""
        if self.filter == DEFAULT_FILTER_NAME:
            return f"obs:{self.source}"
        return f"obs:{self.source}:{self.filter}"


def connect(host: str = "127.0.0.1", port: int = DEFAULT_OBS_PORT, password: str = "",
            timeout: float = 5.0):
    """An obsws_python.ReqClient, or ObsError saying how to make OBS listen."""
    try:
        import obsws_python
    except ImportError:
        raise ObsError("obsws-python is not installed: pip install 'livediffusion[obs]'.") from None
    # it logs the password at INFO and a refused connection as a traceback: we say it once
    logging.getLogger("obsws_python").setLevel(logging.CRITICAL)
    try:
        return obsws_python.ReqClient(host=host, port=port, password=password or "",
                                      timeout=timeout)
    except (ConnectionRefusedError, TimeoutError, OSError) as exc:
        raise ObsError(f"OBS is not answering on {host}:{port} ({exc.__class__.__name__}): "
                       f"start OBS and enable Tools > WebSocket Server Settings.") from None
    except Exception as exc:  # obsws-python raises bare Exceptions for auth failures
        raise ObsError(f"OBS refused the websocket connection on {host}:{port}: {exc} "
                       f"(wrong --obs-password?).") from None


def _request_error(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    return f"{exc}" if code is None else f"{exc} (code {code})"


def list_filters(cl, source: str | None = None) -> list[FilterInfo]:
    """Every livediffusion filter (of one source, or of every input and scene)."""
    if source is not None:
        names = [source]
    else:
        names = [i["inputName"] for i in cl.get_input_list().inputs]
        names += [s["sceneName"] for s in cl.get_scene_list().scenes]
    found = []
    for name in names:
        try:
            filters = cl.get_source_filter_list(name).filters
        except Exception as exc:
            if source is not None:
                raise ObsError(f"OBS has no source called {name!r}: {_request_error(exc)}.") \
                    from None
            continue
        for f in filters:
            if f.get("filterKind") == FILTER_KIND:
                found.append(FilterInfo(name, f["filterName"], bool(f.get("filterEnabled")),
                                        dict(f.get("filterSettings") or {})))
    return found


def add_filter(cl, source: str, settings: dict[str, Any],
               name: str = DEFAULT_FILTER_NAME) -> str:
    """Add the filter to `source` (or update its settings if it is there). Returns "added" or
    "updated"."""
    existing = {f.filter for f in list_filters(cl, source)}
    if name in existing:
        cl.set_source_filter_settings(source, name, settings, True)
        return "updated"
    try:
        cl.create_source_filter(source, name, FILTER_KIND, settings)
    except Exception as exc:
        kinds_missing = "kind" in str(exc).lower() or getattr(exc, "code", None) in (604, 605)
        if kinds_missing:
            raise ObsError("OBS does not know the livediffusion filter: install the plugin "
                           "(livediffusion obs install) and restart OBS, or use the "
                           "plugin-free path (livediffusion obs setup --media-source "
                           "webcam:0).") from None
        raise ObsError(f"OBS refused to add the filter to {source!r}: "
                       f"{_request_error(exc)}.") from None
    return "added"


def add_media_source(cl, settings: dict[str, Any], name: str = DEFAULT_MEDIA_SOURCE,
                     scene: str | None = None) -> str:
    """Create (or update) an ffmpeg Media Source called `name` in `scene` (default: the
    current program scene). Returns "added" or "updated"."""
    inputs = {i["inputName"]: i for i in cl.get_input_list().inputs}
    if name in inputs:
        if inputs[name].get("inputKind") != "ffmpeg_source":
            raise ObsError(f"OBS already has a source called {name!r} that is not a Media "
                           f"Source; pick another name with --media-name.")
        cl.set_input_settings(name, settings, True)
        return "updated"
    if scene is None:
        scene = cl.get_current_program_scene().current_program_scene_name
    try:
        cl.create_input(scene, name, "ffmpeg_source", settings, True)
    except Exception as exc:
        raise ObsError(f"OBS refused to create the Media Source: {_request_error(exc)}.") from None
    return "added"


def set_filter_settings(cl, changes: dict[str, Any], source: str | None = None,
                        filter_name: str | None = None) -> list[FilterInfo]:
    """Apply `changes` (e.g. {"prompt": ...}) to the livediffusion filters found (all, or
    those of one source / one name). Returns the filters changed."""
    changed = []
    for f in list_filters(cl, source):
        if filter_name is not None and f.filter != filter_name:
            continue
        cl.set_source_filter_settings(f.source, f.filter, changes, True)
        changed.append(f)
    return changed


def sync_audio(cl, audio_source: str, f: FilterInfo) -> tuple[int, int, float]:
    """Delay `audio_source`'s audio by the filter's video delay, so that speech stays on the
    lips: the measured latency (frame sent to output received) plus the one frame the
    staging copy holds back. Returns (offset ms, latency ms, frame ms)."""
    latency = int(f.settings.get("latency_ms") or 0)
    if latency <= 0:
        raise ObsError(f"the filter on {f.source!r} is not streaming yet (status: "
                       f"{f.status or 'none'}); start the daemon and try again.")
    video = cl.get_video_settings()
    frame_ms = 1000.0 * video.fps_denominator / video.fps_numerator
    offset = min(20000, round(latency + frame_ms))
    try:
        cl.set_input_audio_sync_offset(audio_source, offset)
    except Exception as exc:
        raise ObsError(f"OBS refused the sync offset of {audio_source!r}: "
                       f"{_request_error(exc)}.") from None
    return offset, latency, frame_ms


def filter_settings(*, endpoint: str, engine: str, prompt: str | None,
                    params: dict[str, Any], keys_dir: str = "") -> dict[str, Any]:
    """The filter's settings (ld_filter.c's property names) for `obs setup` options: known
    parameters map onto their fields, the rest go into the extra key=value text."""
    settings: dict[str, Any] = {"endpoint": endpoint, "engine": engine, "keys_dir": keys_dir}
    if prompt:
        settings["prompt"] = prompt
    extra = []
    for key, value in params.items():
        if key in ("prompt", "negative_prompt") and isinstance(value, str):
            settings[key] = value
        elif key == "seed" and isinstance(value, int):
            settings["seed"] = value
        elif key in ("strength", "noise_scale") and isinstance(value, (int, float)):
            settings["strength"] = float(value)
        elif key == "steps" and isinstance(value, int):
            settings["steps"] = value
        else:
            text = str(value).lower() if isinstance(value, bool) else str(value)
            extra.append(f"{key}={text}")
    settings["extra"] = "\n".join(extra)
    return settings
