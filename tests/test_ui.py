"""The control page (daemon/ui.py, ``livediffusion daemon --ui PORT``): its API against a real
daemon, its guards (Host, token, bad input), and the page itself in a real headless Chromium
(Debian's chromium and chromium-driver; LIVEDIFFUSION_REQUIRE_BROWSER=1 turns their absence
into a failure, as .ci/run sets it)."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from livediffusion.daemon.server import Daemon
from livediffusion.daemon.ui import ControlPage, png
from livediffusion.shared import Client

from helpers import wait_until


def test_png_is_a_valid_picture_of_the_pixels():
    from PIL import Image
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    back = np.asarray(Image.open(io.BytesIO(png(7, 5, rgb.tobytes()))).convert("RGB"))
    assert np.array_equal(back, rgb)


@pytest.fixture
def served(tmp_path):
    d = Daemon(port=0, engines=("passthrough",), presets_path=tmp_path / "presets.json")
    d.start()
    page = ControlPage(d.endpoint, 0).start()
    host = Client(d.endpoint, name="host")
    host.connect()
    stream = host.open_stream("cam", 64, 32, engine="passthrough")
    stop = threading.Event()
    level = {"value": 200}

    def feed() -> None:  # a host sending 30 FPS, as a webcam would
        while not stop.is_set():
            stream.send(np.full((32, 64, 3), level["value"], np.uint8))
            host.poll(0.033)
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    yield d, page, level
    stop.set()
    feeder.join(5)
    host.close()
    page.stop()
    d.stop()


def call(page: ControlPage, path: str, body=None, token: str | None = None,
         host: str | None = None) -> tuple[int, bytes, dict]:
    url = f"http://127.0.0.1:{page.port}{path}"
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    req.add_header("X-Livediffusion-Token", page.token if token is None else token)
    if host is not None:
        req.add_header("Host", host)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def error_of(raw: bytes) -> str:
    return json.loads(raw)["error"]


def test_the_api_lists_changes_and_shows_streams_and_refuses_bad_input(served):
    d, page, _ = served
    status, raw, _ = call(page, "/api/overview")
    data = json.loads(raw)
    assert status == 200 and [s["name"] for s in data["streams"]] == ["cam"]
    assert [p["name"] for p in data["schemas"]["passthrough"]] == ["mode", "gain"]
    assert data["workers"][0]["engines"] == ["passthrough"]
    status, raw, _ = call(page, "/api/params/cam", {"params": {"gain": 0.5}})
    assert status == 200 and json.loads(raw)["params"]["gain"] == 0.5
    # a thumbnail: the first ask starts them, then a PNG of the newest output
    assert wait_until(lambda: call(page, "/api/thumb/cam.png?width=32")[0] == 200, 5)
    from PIL import Image
    status, raw, headers = call(page, "/api/thumb/cam.png?width=32")
    picture = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    assert picture.shape == (16, 32, 3) and abs(float(picture.mean()) - 100) <= 2
    assert headers["Cache-Control"] == "no-store"
    # refusals: one clear error each, nothing changed
    for path, body, code, says in (
            ("/api/params/cam", {"params": {"gain": 9}}, 400, "gain must be a number"),
            ("/api/params/nobody", {"params": {"gain": 1}}, 404, "no open stream is named"),
            ("/api/params/cam", b"{not json", 400, "not JSON"),
            ("/api/params/cam", {"params": [1]}, 400, "params must be a JSON object"),
            ("/api/params/cam", {"params": {"gain": 0.2}, "transition": -1}, 400,
             "from 0 to 3600"),
            ("/api/cues/cam", {"op": "jump", "index": 3}, 400, "no cue list is playing"),
            ("/api/presets", {"op": "rename"}, 400, "save or delete"),
            ("/api/thumb/nobody.png", None, 404, "no open stream is named"),
            ("/api/thumb/cam.png?width=lots", None, 400, "width must be an integer"),
            ("/api/elsewhere", None, 404, "no such page")):
        status, raw, _ = call(page, path, body)
        assert (status, says in error_of(raw)) == (code, True), (path, raw)
    assert call(page, "/api/overview", token="guess")[0] == 403
    assert call(page, "/", host="evil.example:80")[0] == 403       # DNS rebinding
    status, raw, _ = call(page, "/", token="")
    assert status == 200 and page.token.encode() in raw              # the page carries it
    overview = json.loads(call(page, "/api/overview")[1])
    assert overview["streams"][0]["params"]["gain"] == 0.5
    assert overview["streams"][0]["stats"]["frames_out"] > 0


def test_a_transition_and_a_cue_list_from_the_api(served):
    d, page, _ = served
    call(page, "/api/presets", {"op": "save", "name": "dark", "params": {"gain": 0.1}})
    status, raw, _ = call(page, "/api/params/cam", {"params": {"gain": 0.0},
                                                     "transition": {"seconds": 1.0}})
    assert status == 200
    assert wait_until(lambda: (json.loads(call(page, "/api/overview")[1])["streams"][0]
                               ["stats"]["transition"] or {}).get("progress", 0) > 0, 5)
    status, raw, _ = call(page, "/api/cues/cam", {"op": "play", "cues": [
        {"preset": "dark", "hold": 0.2}, {"params": {"gain": 0.3}}]})
    assert status == 200 and json.loads(raw)["cues"]["count"] == 2
    assert wait_until(lambda: json.loads(call(page, "/api/overview")[1])["streams"][0]
                      ["params"]["gain"] == 0.3, 5)


# --- the page in a real browser --------------------------------------------------------------

def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        reason = "no chromium and chromedriver (apt-get install chromium chromium-driver)"
        if os.environ.get("LIVEDIFFUSION_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason} (LIVEDIFFUSION_REQUIRE_BROWSER=1)")
        pytest.skip(reason)
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver),
                            options=options)


def test_the_page_in_a_browser_moves_a_control_and_the_frames_follow(served):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    d, page, level = served
    web = browser()
    try:
        web.get(f"http://127.0.0.1:{page.port}/")
        wait = WebDriverWait(web, 20)
        card = wait.until(lambda w: w.find_element(By.CSS_SELECTOR,
                                                   'section.stream[data-name="cam"]'))
        gain = card.find_element(By.CSS_SELECTOR, 'input[data-param="gain"]')
        assert gain.get_attribute("type") == "range"
        assert (gain.get_attribute("min"), gain.get_attribute("max")) == ("0", "4")
        assert card.find_element(By.CSS_SELECTOR, 'select[data-param="mode"]')

        def thumb_level() -> float:
            """The mean of the thumbnail the page shows, read back from the browser."""
            return web.execute_script("""
                const img = arguments[0];
                if (!img.complete || !img.naturalWidth) return -1;
                const c = document.createElement('canvas');
                c.width = img.naturalWidth; c.height = img.naturalHeight;
                const g = c.getContext('2d'); g.drawImage(img, 0, 0);
                const d = g.getImageData(0, 0, c.width, c.height).data;
                let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i];
                return s / (d.length / 4);""", card.find_element(By.CSS_SELECTOR, "img.thumb"))
        wait.until(lambda w: abs(thumb_level() - 200) <= 2)
        frames = int(card.find_element(By.CSS_SELECTOR, "img.thumb").get_attribute(
            "data-frames"))
        assert frames >= 1
        # move the slider as a user would (set, then the change event a drag ends with)
        web.execute_script("arguments[0].value = 0.25; arguments[0].dispatchEvent("
                           "new Event('change'));", gain)
        with Client(d.endpoint, name="check") as check:
            assert wait_until(lambda: check.streams()[0]["params"]["gain"] == 0.25, 10)
        wait.until(lambda w: abs(thumb_level() - 50) <= 2)     # a new frame, 200 * 0.25
        assert int(card.find_element(By.CSS_SELECTOR, "img.thumb").get_attribute(
            "data-frames")) > frames
        # a refused value shows its error on the page; the stream goes on
        web.execute_script("arguments[0].type = 'number'; arguments[0].value = '7';"
                           "arguments[0].dispatchEvent(new Event('change'));", gain)
        wait.until(lambda w: "gain must be a number" in w.find_element(By.ID, "message").text)
        level["value"] = 100
        wait.until(lambda w: abs(thumb_level() - 25) <= 2)
        # the telemetry plot and figures are drawn from the polls
        assert "latency p50" in card.find_element(By.CSS_SELECTOR, ".figures").text
    finally:
        web.quit()
