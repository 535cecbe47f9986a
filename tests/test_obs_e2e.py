"""End to end in a real OBS Studio (Debian's obs-studio 29 under Xvfb, software GL): our
filter plugin loaded from a private HOME, set up through obs-websocket by `livediffusion obs
setup`, showing the daemon's output (passthrough inverted, then the tiny video engine) in
OBS's own screenshots; the prompt changed from `livediffusion obs prompt`; the source shown
again when the daemon goes away; the plugin-free Media Source path, and the filter on that
asynchronous source (as on a camera).

Skipped without OBS, Xvfb or the build tools; .ci/run installs them and sets
LIVEDIFFUSION_REQUIRE_OBS=1, which turns those skips into failures."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from livediffusion.daemon.server import free_port
from livediffusion.daemon.spawn import spawned_daemon
from livediffusion.plugins.obs import build
from livediffusion.plugins.obs import websocket as ows
from livediffusion.shared import Client

from conftest import skip_or_fail
from obs_harness import HeadlessObs, obs_missing_reason

pytestmark = [pytest.mark.obs, pytest.mark.slow]

W, H = 160, 120
QUADRANTS = {(30, 40): (200, 30, 30), (30, 120): (30, 200, 30), (90, 40): (30, 30, 200),
             (90, 120): (220, 220, 40)}  # (row, column) -> RGB: catches flips and swaps


def quad_image() -> np.ndarray:
    img = np.zeros((H, W, 3), np.uint8)
    for (y, x), rgb in QUADRANTS.items():
        img[y - 30:y + 30, x - 40:x + 40] = rgb
    return img


def looks_like(shot: np.ndarray, colours: dict, tol: int = 12) -> bool:
    return all(np.abs(shot[y, x].astype(int) - np.array(rgb)).max() <= tol
               for (y, x), rgb in colours.items())


INVERTED = {k: tuple(255 - c for c in v) for k, v in QUADRANTS.items()}


def wait_for(pred, timeout: float, what: str, step: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last is not None and last is not False:
            return last
        time.sleep(step)
    raise AssertionError(f"{what} did not happen within {timeout:g} s")


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "livediffusion.daemon", "obs", *args],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def obs(obs_build, tmp_path_factory):
    reason = obs_missing_reason()
    if reason:
        skip_or_fail(reason)
    build_dir, plugin_built = obs_build
    if not plugin_built:
        skip_or_fail("the OBS plugin was not built (libobs-dev missing)")
    plugin_dir = build.install(build_dir, tmp_path_factory.mktemp("obs-plugin"))
    instance = HeadlessObs(tmp_path_factory.mktemp("obs-home"), plugin_dir, width=W * 2,
                           height=H * 2)
    instance.start()
    try:
        assert "[livediffusion] filter loaded" in instance.log(), instance.log()[-3000:]
        yield instance
    finally:
        instance.stop()


def ws_args(obs: HeadlessObs) -> list[str]:
    return ["--obs-port", str(obs.port), "--obs-password", obs.password]


def test_filter_shows_the_daemons_output(obs, tmp_path):
    from PIL import Image
    Image.fromarray(quad_image()).save(tmp_path / "quad.png")
    scene = obs.cl.get_current_program_scene().current_program_scene_name
    obs.cl.create_input(scene, "quad", "image_source", {"file": str(tmp_path / "quad.png")},
                        True)
    wait_for(lambda: looks_like(obs.screenshot("quad", W, H), QUADRANTS), 10, "the image")

    with spawned_daemon("passthrough,video-tiny") as endpoint:
        out = cli("setup", "--source", "quad", "--engine", "passthrough", "--param",
                  "mode=invert", "--endpoint", endpoint, *ws_args(obs)).stdout
        assert "added filter 'livediffusion' on 'quad'" in out and "'obs:quad'" in out
        # the source's own screenshot and the program scene both show the daemon's output
        wait_for(lambda: looks_like(obs.screenshot("quad", W, H), INVERTED), 30,
                 "the inverted picture")
        canvas = obs.screenshot(scene, 2 * W, 2 * H)  # the image sits at the top left
        assert looks_like(canvas[:H, :W], INVERTED)
        # the status line (refreshed every second) through `livediffusion obs status`
        wait_for(lambda: "quad / livediffusion (on, stream obs:quad): streaming passthrough "
                         "160x120 | in " in cli("status", *ws_args(obs)).stdout, 10,
                 "the streaming status")

        # the tiny video engine: abstract moving pictures, neither the source nor its inverse
        out = cli("setup", "--source", "quad", "--engine", "video-tiny", "--prompt", "a forest",
                  "--endpoint", endpoint, *ws_args(obs)).stdout
        assert "updated filter" in out
        wait_for(lambda: "streaming video-tiny" in ows.list_filters(obs.cl, "quad")[0].status,
                 60, "the video engine's stream")
        source = quad_image().astype(int)

        def engine_picture():
            shot = obs.screenshot("quad", W, H)
            far = np.abs(shot.astype(int) - source).mean() > 30 and \
                np.abs(shot.astype(int) - (255 - source)).mean() > 30
            return shot if far else None
        first = wait_for(engine_picture, 60, "a video engine picture")
        wait_for(lambda: np.abs(obs.screenshot("quad", W, H).astype(int)
                                - first.astype(int)).mean() > 3, 30, "a new video frame")

        # lip sync: a microphone's audio delayed by the filter's measured video delay
        obs.cl.create_input(scene, "mic", "ffmpeg_source", {}, False)
        out = cli("sync", "--audio-source", "mic", "--source", "quad", *ws_args(obs)).stdout
        offset = obs.cl.get_input_audio_sync_offset("mic").input_audio_sync_offset
        assert f"delayed by {offset} ms" in out and offset >= 1000 // 15, out

        # the prompt, from the command line through obs-websocket into the daemon's stream
        out = cli("prompt", "a neon city", *ws_args(obs)).stdout
        assert "prompt of quad / livediffusion set" in out
        with Client(endpoint, name="e2e") as c:
            wait_for(lambda: c.control("obs:quad", {}).get("prompt") == "a neon city", 20,
                     "the new prompt in the daemon")
    # daemon gone: the source, unchanged, and the status says so
    wait_for(lambda: looks_like(obs.screenshot("quad", W, H), QUADRANTS), 20,
             "the source after the daemon left")
    wait_for(lambda: "no daemon" in ows.list_filters(obs.cl, "quad")[0].status, 20,
             "the 'no daemon' status")


def test_properties_come_from_the_schema_and_presets_have_hotkeys(obs, tmp_path):
    """A connected filter builds its properties from the engine's schema (the image engine's
    guidance slider with its range and description, as OBS holds it: logged by the filter),
    registers one hotkey per daemon preset, and a hotkey recalls the preset into its stream;
    a property changed afterwards goes out alone (the recalled value stays)."""
    from PIL import Image
    Image.fromarray(quad_image()).save(tmp_path / "quad.png")
    scene = obs.cl.get_current_program_scene().current_program_scene_name
    obs.cl.create_input(scene, "quad-presets", "image_source",
                        {"file": str(tmp_path / "quad.png")}, True)
    with spawned_daemon("passthrough,image-tiny") as endpoint:
        with Client(endpoint, name="e2e") as c:
            c.presets("save", "e2e guided", params={"guidance": 3.5, "mode": "invert"})

        def params() -> dict:
            with Client(endpoint, name="e2e-streams") as c:  # a fresh one: no heartbeats here
                for s in c.streams():
                    if s["name"] == "obs:quad-presets":
                        return s["params"]
            return {}
        cli("setup", "--source", "quad-presets", "--engine", "image-tiny", "--param",
            "seed=7", "--endpoint", endpoint, *ws_args(obs))
        wait_for(lambda: "streaming image-tiny" in
                 ows.list_filters(obs.cl, "quad-presets")[0].status, 60,
                 "the image engine's stream")
        wait_for(lambda: "image-tiny property p_guidance: float 0..20 step 0.1 | "
                         "classifier-free guidance" in obs.log(), 20,
                 "the schema's guidance property")
        log = obs.log()
        assert "image-tiny property p_steps: int 1..4 |" in log
        assert "image-tiny property p_prompts" not in log  # a list kind: through Extra
        # the old "seed" key of `obs setup` reached the stream as the p_seed property
        assert params()["seed"] == 7 and params()["guidance"] == 1.0
        settings = ows.list_filters(obs.cl, "quad-presets")[0].settings
        assert settings.get("p_seed") == 7 and "seed" not in settings

        hotkey = "livediffusion.preset.e2e guided"
        try:
            wait_for(lambda: hotkey in obs.cl.get_hotkey_list().hotkeys, 20,
                     "the preset's hotkey")
        except AssertionError as exc:
            lines = [line for line in obs.log().splitlines()
                     if "livediffusion" in line and "property" not in line]
            raise AssertionError(f"{exc}; OBS log: {lines[-10:]}") from None
        obs.cl.trigger_hotkey_by_name(hotkey)
        wait_for(lambda: params().get("guidance") == 3.5, 20, "the recalled preset")
        obs.cl.set_source_filter_settings("quad-presets", "livediffusion",
                                          {"p_delta": 1.5}, True)
        wait_for(lambda: params().get("delta") == 1.5, 20, "the changed property")
        assert params()["guidance"] == 3.5 and params()["seed"] == 7
        with Client(endpoint, name="e2e") as c:
            c.presets("delete", "e2e guided")


def test_media_source_path_without_the_plugin(obs, tmp_path):
    import cv2
    writer = cv2.VideoWriter(str(tmp_path / "quad.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 15,
                             (W, H))
    for _ in range(15):
        writer.write(np.ascontiguousarray(quad_image()[..., ::-1]))
    writer.release()
    port = free_port()
    with spawned_daemon("passthrough") as endpoint:
        proc = subprocess.Popen(
            [sys.executable, "-m", "livediffusion.daemon", "obs", "setup", "--media-source",
             str(tmp_path / "quad.avi"), "--media-name", "ld-media", "--rawvideo-port",
             str(port), "--size", f"{W}x{H}", "--fps", "15", "--engine", "passthrough",
             "--param", "mode=invert", "--endpoint", endpoint, "--seconds", "60",
             *ws_args(obs)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        seen = []

        def media_looks(colours, tol=12):
            try:
                shot = obs.screenshot("ld-media", W, H)
            except Exception as exc:  # noqa: BLE001 - the command has not created it yet
                seen.append(repr(exc)[:120])
                return False
            seen.append(str([shot[y, x].tolist() for y, x in colours]))
            return looks_like(shot, colours, tol)
        try:
            wait_for(lambda: media_looks(INVERTED), 60, "the inverted picture in the Media Source")
            settings = obs.cl.get_input_settings("ld-media").input_settings
            assert settings["input"] == f"tcp://127.0.0.1:{port}"
            assert settings["input_format"] == "rawvideo"
            # the Media Source path's daemon stream is reachable by its name
            with Client(endpoint, name="e2e") as c:
                c.control("obs-media", {"mode": "identity"})
            wait_for(lambda: media_looks(QUADRANTS, tol=20), 20, "the identity picture")
            # the filter on an asynchronous source (a Media Source, like a camera): inverted
            cli("setup", "--source", "ld-media", "--engine", "passthrough", "--param",
                "mode=invert", "--endpoint", endpoint, *ws_args(obs))
            wait_for(lambda: media_looks(INVERTED, tol=20), 30,
                     "the filter's output on an asynchronous source")
        except AssertionError as exc:
            proc.terminate()
            out = proc.communicate(timeout=20)[0]
            media_log = [line for line in obs.log().splitlines() if "media" in line.lower()]
            raise AssertionError(f"{exc}\ncommand output:\n{out}\nscreenshots: {seen[-5:]}\n"
                                 f"OBS log: {media_log[-15:]}") from None
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
        assert "added Media Source 'ld-media'" in out, out


def test_filter_on_a_whole_scene(obs, tmp_path):
    """Streamers put filters on scenes too: a scene renders itself (custom draw)."""
    from PIL import Image
    Image.fromarray(quad_image()).save(tmp_path / "quad.png")
    obs.cl.create_scene("ld-scene")
    obs.cl.create_input("ld-scene", "quad-in-scene", "image_source",
                        {"file": str(tmp_path / "quad.png")}, True)
    obs.cl.set_current_program_scene("ld-scene")

    def scene_looks(colours):
        return looks_like(obs.screenshot("ld-scene", 2 * W, 2 * H)[:H, :W], colours)
    wait_for(lambda: scene_looks(QUADRANTS), 10, "the scene")
    with spawned_daemon("passthrough") as endpoint:
        cli("setup", "--source", "ld-scene", "--engine", "passthrough", "--param",
            "mode=invert", "--endpoint", endpoint, *ws_args(obs))
        wait_for(lambda: scene_looks(INVERTED), 30, "the inverted scene")
        assert ows.list_filters(obs.cl, "ld-scene")[0].stream_name == "obs:ld-scene"


def test_setup_explains_an_obs_without_the_plugin(tmp_path):
    reason = obs_missing_reason()
    if reason:
        skip_or_fail(reason)
    bare = HeadlessObs(tmp_path / "home", None).start()  # no plugin in this one
    try:
        bare.cl.create_input(bare.cl.get_current_program_scene().current_program_scene_name,
                             "col", "color_source_v3", {}, True)
        for args, words in [
                (("setup", "--source", "col"), "OBS does not know the livediffusion filter"),
                (("setup", "--source", "nosuch"), "OBS has no source called 'nosuch'")]:
            result = subprocess.run([sys.executable, "-m", "livediffusion.daemon", "obs", *args,
                                     *ws_args(bare)], capture_output=True, text=True, timeout=60)
            assert result.returncode == 2 and words in result.stderr, result.stderr
        result = subprocess.run([sys.executable, "-m", "livediffusion.daemon", "--log-level",
                                 "debug", "obs", "status", "--obs-port", str(bare.port),
                                 "--obs-password", "s3cret-xyz"], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2 and "wrong --obs-password" in result.stderr
        assert "s3cret-xyz" not in result.stdout + result.stderr  # obsws-python would log it
    finally:
        bare.stop()
