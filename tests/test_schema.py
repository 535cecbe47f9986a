"""Parameters declared once (engines/schema.py): the declaration validates, travels in the
welcome, and lists on the command line."""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys

import pytest

from livediffusion.daemon.engines import passthrough
from livediffusion.daemon.engines.base import ParamError
from livediffusion.daemon.engines.image import params as IP
from livediffusion.daemon.engines.schema import KINDS, Schema, param
from livediffusion.daemon.engines.video import params as VP

SCHEMAS = [(VP.SCHEMA, VP.VideoParams), (IP.SCHEMA, IP.ImageParams),
           (passthrough.SCHEMA, passthrough.PassthroughParams)]


@pytest.mark.parametrize("schema,cls", SCHEMAS)
def test_every_field_is_declared_and_its_default_is_valid(schema, cls):
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    listed = schema.to_list()
    assert [p["name"] for p in listed] == list(fields)
    for p in listed:
        assert p["kind"] in KINDS and p["description"] and p["effect"] in (
            "live", "rebuild", "restart")
        spec = schema.params[p["name"]]
        # the default passes its own validation, and the list says the same as the class
        assert spec.check(fields[p["name"]]) == fields[p["name"]]
        if "lo" in p and p["kind"] in ("int", "float"):
            assert p["lo"] <= p["default"] <= p["hi"]
        if p["kind"] == "choice":
            assert p["default"] in p["choices"]


def test_a_new_declared_parameter_is_validated_and_listed_with_no_other_code():
    @dataclasses.dataclass(frozen=True)
    class Toy:
        gain: float = param(0.5, "how much", lo=0.0, hi=2.0, unit="x")
        style: str = param("a", "which", choices=("a", "b"), effect="restart")

    schema = Schema(Toy, "toy")
    assert schema.to_list() == [
        {"name": "gain", "kind": "float", "default": 0.5, "description": "how much",
         "effect": "live", "lo": 0.0, "hi": 2.0, "unit": "x"},
        {"name": "style", "kind": "choice", "default": "a", "description": "which",
         "effect": "restart", "choices": ["a", "b"]}]
    new, reset = schema.apply(Toy(), {"gain": 2})
    assert new.gain == 2.0 and not reset
    assert schema.apply(Toy(), {"style": "b"})[1]      # a restart-effect change resets
    assert not schema.apply(Toy(), {"style": "a"})[1]  # ... only when it changes
    with pytest.raises(ValueError, match="not declared"):
        @dataclasses.dataclass(frozen=True)
        class Undeclared:
            x: int = 1
        Schema(Undeclared, "bad")


@pytest.mark.parametrize("changes,message", [
    ({"steps": 2.5}, "steps must be an integer from 1 to 4, not 2.5"),
    ({"steps": True}, "steps must be an integer"),
    ({"noise_scale": math.nan}, "noise_scale must be a number from 0.11 to 1, not nan"),
    ({"strength": 2}, "noise_scale must be a number from 0.11 to 1, not 2"),
    ({"decoder": "big"}, "decoder must be one of 'vae', 'tiny'"),
    ({"prompt": "x" * 2001}, "at most 2000 characters"),
    ({"prompts": [["a", math.nan]]}, "weight >= 0"),
    ({"stream_batch": 1}, "stream_batch must be true or false"),
    ({"no_such": 1}, "has no parameter 'no_such'; it knows cache_frames"),
    ({"x" * 500: 1}, "has no parameter 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...; it"),
    ({"reset": "yes"}, "reset must be true or false"),
    ({"sinks": 6}, "sinks (6) must be fewer than cache_frames (6)"),
])
def test_bad_values_are_refused_with_a_sentence(changes, message):
    with pytest.raises(ParamError, match=re.escape(message)):
        VP.apply(VP.VideoParams(), changes)


def test_integral_floats_become_integers_and_aliases_and_effects_hold():
    new, reset = VP.apply(VP.VideoParams(), {"steps": 3.0, "strength": 0.5})
    assert new.steps == 3 and isinstance(new.steps, int) and new.noise_scale == 0.5
    assert not reset
    assert VP.apply(VP.VideoParams(), {"encoder": "tiny"})[1]        # restart
    assert not VP.apply(VP.VideoParams(), {"cache_frames": 8})[1]    # rebuild: no reset
    assert VP.apply(VP.VideoParams(), {"reset": True})[1]
    # the image engine's knob takes over from raw indices
    img = IP.apply(IP.ImageParams(), {"t_index_list": [10, 30]})[0]
    assert IP.apply(img, {"strength": 0.6})[0].t_index_list == ()
    with pytest.raises(ParamError, match="strictly increasing"):
        IP.apply(IP.ImageParams(), {"t_index_list": [30, 10]})


def test_engines_send_their_schema_in_the_welcome():
    from livediffusion.daemon.server import Daemon
    from livediffusion.shared import Client

    daemon = Daemon(port=0, engines=("passthrough", "video-tiny", "image-tiny")).start(
        timeout=120)
    try:
        with Client(daemon.endpoint) as client:
            engines = client.capabilities["engines"]
    finally:
        daemon.stop()
    for name, schema in (("passthrough", passthrough.SCHEMA), ("video-tiny", VP.SCHEMA),
                         ("image-tiny", IP.SCHEMA)):
        assert engines[name]["schema"] == schema.to_list()
    steps = next(p for p in engines["video-tiny"]["schema"] if p["name"] == "steps")
    assert (steps["lo"], steps["hi"], steps["default"]) == (1, 4, 2)


def test_params_list_prints_the_declaration_without_a_daemon():
    out = subprocess.run([sys.executable, "-m", "livediffusion.daemon", "params", "--list",
                          "image-tiny", "--endpoint", "tcp://127.0.0.1:9"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "declared in this install" in out.stdout
    cfg = next(line for line in out.stdout.splitlines() if line.startswith("cfg "))
    assert "none | full | self | initialize" in cfg and "'self'" in cfg
    bad = subprocess.run([sys.executable, "-m", "livediffusion.daemon", "params", "--list",
                          "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "no engine 'nope'" in bad.stderr


def test_a_controller_lists_every_stream_with_its_effective_parameters():
    """The `streams` message: names, engines, effective params and stats of streams any
    session opened (what OSC and a control page address by name)."""
    from livediffusion.daemon.server import Daemon
    from livediffusion.shared import Client

    daemon = Daemon(port=0, engines=("passthrough",)).start(timeout=60)
    try:
        with Client(daemon.endpoint, name="tool") as tool, \
                Client(daemon.endpoint, name="controller") as controller:
            stream = tool.open_stream("cam", 64, 64, engine="passthrough")  # noqa: F841
            listed = controller.streams()
            assert [(s["name"], s["engine"], s["params"]) for s in listed] == \
                [("cam", "passthrough", {"mode": "identity", "gain": 1.0})]
            assert listed[0]["stats"]["state"] == "open"
            controller.control("cam", {"mode": "invert"})
            assert controller.streams()[0]["params"] == {"mode": "invert", "gain": 1.0}
    finally:
        daemon.stop()
