"""The studio in a real headless browser: Debian's chromium driven by Playwright.

No browser is ever downloaded: Playwright launches ``/usr/bin/chromium`` (``make install``
installs it with apt). Without it the test skips, except under ``CI=true`` where it fails.
Screenshots go to ``$ROOTFLOW_STUDIO_SCREENSHOTS`` (default: the test's tmp dir).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rootflow.io.images import decode_mask
from rootflow.lake import Lake
from rootflow.studio.app import create_app
from rootflow.studio.session import StudioConfig, build_studio
from tests.studio._helpers import make_setup

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _need_browser() -> None:
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright python package")
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        missing.append(f"{CHROMIUM} (apt-get install -y chromium chromium-driver)")
    if missing:
        msg = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + " (CI=true: a missing browser is a failure)")
        pytest.skip(msg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """uvicorn serving the app in a thread of this process."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}/"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _pixels(page, x: float, y: float, r: int = 6) -> np.ndarray:
    """RGBA canvas pixels in a (2r+1)^2 box around canvas point (x, y)."""
    data = page.evaluate(
        """([x, y, r]) => Array.from(document.getElementById('view').getContext('2d')
             .getImageData(Math.round(x) - r, Math.round(y) - r, 2 * r + 1, 2 * r + 1).data)""",
        [x, y, r])
    return np.asarray(data, np.int32)


@pytest.mark.slow
def test_browser_click_undo_accept(tmp_path):
    """Guards: a page that does not load, shows no image/overlay, ignores clicks, cannot undo,
    or whose accept does not reach the lake; i.e. the studio failing a real user."""
    _need_browser()
    from playwright.sync_api import sync_playwright

    from rootflow.inference.rootsam import RootSAMInferenceConfig, RootSAMPredictor

    shots = Path(os.environ.get("ROOTFLOW_STUDIO_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    s = make_setup(tmp_path, n=2, h=360, w=480)
    predictor = RootSAMPredictor(RootSAMInferenceConfig(variant="test", device="cpu",
                                                        embedding_cache_tiles=128))
    st = build_studio(StudioConfig(lake_uri=s.lake_uri, manifest_uri=s.manifest_uri,
                                   prefetch_ahead=1), rootsam=predictor)
    first = st.queue()[0].image_id
    truth = s.truth[first]
    # a root pixel in the top third, which the given mask misses
    ys, xs = np.nonzero(truth[20:110])
    k = len(ys) // 2
    ix, iy = int(xs[k]), int(ys[k]) + 20
    errors: list[str] = []
    with Server(create_app(st)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            # bypass_csp: Playwright's wait_for_function evaluates strings, which the studio's
            # Content-Security-Policy (no eval) rightly forbids to the page itself.
            page = browser.new_page(viewport={"width": 1280, "height": 800}, bypass_csp=True)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_selector("#queue li")
            assert page.locator("#shortcuts tr").count() >= 10  # shortcuts shown on the page
            page.locator("#queue li", has_text=first).click()
            page.wait_for_function("document.getElementById('status').textContent"
                                   ".includes('first mask')")
            page.screenshot(path=str(shots / "1-opened.png"))
            # image -> canvas coordinates through the page's own view transform
            cx, cy = page.evaluate(f"[S.tx + ({ix} + 0.5) * S.scale, S.ty + ({iy} + 0.5) * S.scale]")
            box = page.locator("#view").bounding_box()
            before = _pixels(page, cx, cy)
            page.select_option("#engine", "forest")
            page.mouse.click(box["x"] + cx, box["y"] + cy)
            page.wait_for_function("document.getElementById('status').textContent"
                                   ".includes('1 clicks')")
            after = _pixels(page, cx, cy)
            page.screenshot(path=str(shots / "2-after-root-click.png"))
            assert np.abs(after - before).sum() > 0, "canvas unchanged near the click"
            assert st.sessions[first].current[iy, ix]
            # a RootSAM background click elsewhere, through the right button
            page.select_option("#engine", "rootsam")
            page.mouse.click(box["x"] + cx + 40, box["y"] + cy + 200, button="right")
            page.wait_for_function("document.getElementById('status').textContent"
                                   ".includes('2 clicks')")
            page.screenshot(path=str(shots / "3-after-rootsam-click.png"))
            page.keyboard.press("z")
            page.wait_for_function("document.getElementById('status').textContent"
                                   ".includes('undo') && document.getElementById('status')"
                                   ".textContent.includes('1 clicks')")
            page.keyboard.press("z")
            page.wait_for_function("document.getElementById('status').textContent"
                                   ".includes('0 clicks')")
            undone = _pixels(page, cx, cy)
            page.screenshot(path=str(shots / "4-after-undo.png"))
            assert np.array_equal(undone, before), "undo did not restore the canvas"
            page.keyboard.press("y")  # redo the root click, then accept it
            page.wait_for_function("document.getElementById('status').textContent"
                                   ".includes('1 clicks')")
            page.fill("#person", "Ana Tester")
            page.click("#b-accept")
            page.wait_for_function("document.getElementById('status').textContent"
                                   ".includes('accepted') || document.getElementById('status')"
                                   ".textContent.includes('first mask')")
            page.wait_for_timeout(300)
            page.screenshot(path=str(shots / "5-after-accept-next-image.png"))
            page.goto(url + "figures")
            page.wait_for_selector("#byprop tbody tr")
            page.screenshot(path=str(shots / "6-figures.png"), full_page=True)
        finally:
            browser.close()
            st.close()
    assert not errors, errors
    rows = Lake(s.lake_uri).read("annotations").to_pylist()
    assert len(rows) == 1 and rows[0]["image_id"] == first
    assert rows[0]["person"] == "Ana Tester"
    (click,) = json.loads(rows[0]["clicks_json"])  # the redone root click, where we clicked
    assert click["label"] == 1  # (the browser rounds mouse positions to CSS pixels: +-1 px)
    assert abs(click["x"] - ix) <= 1 and abs(click["y"] - iy) <= 1
    mask = decode_mask(Path(rows[0]["mask_uri"]).read_bytes())
    assert mask.shape == truth.shape and mask[click["y"], click["x"]]
