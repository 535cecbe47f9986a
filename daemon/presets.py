"""Named presets: any subset of a stream's parameters, saved in the user's config directory.

A preset is a name and a map of parameters (``{"prompt": "...", "seed": 7, "steps": 2}``).
The daemon keeps them in ``presets.json`` under platformdirs' user config directory for
"livediffusion" (``LIVEDIFFUSION_PRESETS`` names another file), so every host recalls the
same ones: the protocol (``control``/``params`` with ``preset``, the ``presets`` message),
OSC (``/livediffusion/<stream>/preset NAME``) and ``livediffusion preset``.

Recalling a preset onto a stream applies the parameters its engine declares (a preset saved
from a video stream recalled on an image stream sets what both have, the prompt say), with
the stream's own validation; explicit parameters beside the preset win over it.

The file is versioned.  A file that cannot be read (corrupt, or from a version this daemon
does not know) is kept aside as ``presets.json.bad-<time>``, logged in one line, and the
daemon starts with no presets: nothing is lost and nothing stops.  Writes go to a temporary
file renamed over the old one, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from .config import env

log = logging.getLogger("livediffusion.presets")

VERSION = 1
MAX_PRESETS = 256
MAX_NAME = 64
MAX_BYTES = 64 * 1024   # one preset's parameters, as JSON


class PresetError(ValueError):
    pass


def default_path() -> Path:
    override = env("LIVEDIFFUSION_PRESETS").strip()
    if override:
        return Path(override)
    from platformdirs import user_config_dir
    return Path(user_config_dir("livediffusion")) / "presets.json"


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME or \
            any(ord(c) < 32 for c in name) or "/" in name:
        raise PresetError(f"a preset name is 1 to {MAX_NAME} printable characters without "
                          f"'/', not {name!r:.70}.")
    return name


class PresetStore:
    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()
        self._lock = threading.Lock()
        self.presets: dict[str, dict[str, Any]] = self._load()

    def _load(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("version") != VERSION or \
                    not isinstance(data.get("presets"), dict):
                raise ValueError(f"not a version-{VERSION} preset file")
            out = {}
            for name, entry in data["presets"].items():
                check_name(name)
                if not isinstance(entry, dict) or not isinstance(entry.get("params"), dict):
                    raise ValueError(f"preset {name!r} has no parameters")
                out[name] = entry
            return out
        except (OSError, ValueError) as exc:
            aside = self.path.with_name(f"{self.path.name}.bad-{int(time.time())}")
            try:
                self.path.replace(aside)
            except OSError:
                aside = self.path
            log.error("presets: %s cannot be read (%s); kept as %s, starting with none",
                      self.path, str(exc)[:200], aside)
            return {}

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"version": VERSION, "presets": self.presets}, indent=1,
                                  sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.path)

    def list(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {name: dict(entry) for name, entry in sorted(self.presets.items())}

    def get(self, name: Any) -> dict[str, Any]:
        with self._lock:
            entry = self.presets.get(name) if isinstance(name, str) else None
        if entry is None:
            raise PresetError(f"no preset is named {name!r:.70}.")
        return dict(entry["params"])

    def save(self, name: Any, params: Any, *, engine: str = "") -> dict[str, Any]:
        name = check_name(name)
        if not isinstance(params, dict) or not params or \
                not all(isinstance(k, str) for k in params):
            raise PresetError("a preset needs a map of one or more parameters.")
        size = len(json.dumps(params, default=str))
        if size > MAX_BYTES:
            raise PresetError(f"a preset's parameters may take {MAX_BYTES} bytes, not {size}.")
        with self._lock:
            if name not in self.presets and len(self.presets) >= MAX_PRESETS:
                raise PresetError(f"there are {MAX_PRESETS} presets already; delete one.")
            self.presets[name] = {"params": params, "engine": engine,
                                  "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}
            self._save()
            return dict(self.presets[name])

    def delete(self, name: Any) -> None:
        with self._lock:
            if not isinstance(name, str) or self.presets.pop(name, None) is None:
                raise PresetError(f"no preset is named {name!r:.70}.")
            self._save()


def for_engine(params: dict[str, Any], declared: list[dict[str, Any]] | None
               ) -> tuple[dict[str, Any], list[str]]:
    """The part of a preset an engine declares (its capabilities' ``schema``), and the
    names left out."""
    if declared is None:
        return dict(params), []
    names = {p["name"] for p in declared} | {a for p in declared for a in p.get("aliases", ())}
    kept = {k: v for k, v in params.items() if k in names}
    return kept, sorted(set(params) - set(kept))
