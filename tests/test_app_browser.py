"""`kaleido-s2v app` in a real headless Chromium (Debian's `chromium`, driven by Playwright; no browser download):
the command starts the app on a free port, a user uploads a reference, types a prompt, clicks Generate and watches
the video; every request the page makes goes to the local server. Skips where Playwright or Chromium is missing
(`.ci/run` installs Debian's chromium). Artefacts (a screenshot, the measured times) go to `test-artifacts/`
(or $KALEIDO_ARTIFACTS)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no Chromium installed (Debian: apt-get install chromium)", allow_module_level=True)

from tests.test_app import EXAMPLES, PROMPT, free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("KALEIDO_ARTIFACTS", REPO / "test-artifacts"))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, output folder, start-up seconds) of `kaleido-s2v app` run as a user runs it."""
    import httpx

    out = tmp_path_factory.mktemp("browser") / "outputs"
    port = free_port()
    log = open(out.parent / "app.log", "w")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "kaleido_s2v", "app", "--port", str(port), "--output-dir", str(out)],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # as conftest: one thread beats two contended
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            assert proc.poll() is None, (out.parent / "app.log").read_text()
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.perf_counter() - start < 120, "the app did not start within 120 s"
            time.sleep(0.2)
        yield url, out, time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        yield b
        b.close()


def test_a_user_generates_a_video_in_the_page(served, browser):
    url, out, startup = served
    host = urlparse(url).netloc
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(url)
    page.locator("#preview img").first.wait_for(timeout=30_000)  # the page is live: the default reference shows
    page.locator("#references input[type=file]").set_input_files(
        [str(EXAMPLES / "red_striped_circle.png"), str(EXAMPLES / "blue_square.png")])
    page.locator("#preview img").nth(1).wait_for(timeout=30_000)  # both, fitted as the model sees them
    page.locator("#prompt textarea").fill(PROMPT)
    clicked = time.perf_counter()
    page.locator("#generate").click()
    video = page.locator("#video video")
    video.wait_for(timeout=60_000)
    click_to_video = time.perf_counter() - clicked
    playing = video.evaluate("""async v => { v.muted = true; await v.play();
        await new Promise(r => setTimeout(r, 300));
        return {time: v.currentTime, width: v.videoWidth, height: v.videoHeight, error: v.error && v.error.code}; }""")
    assert playing["error"] is None and playing["time"] > 0 and (playing["width"], playing["height"]) == (64, 64)
    history = page.locator("#history").get_by_text(PROMPT).filter(visible=True)
    history.first.wait_for(timeout=10_000)  # the history has this result
    seed = page.locator("#seed-used textarea").input_value()
    assert seed.isdigit()  # the random seed, reported
    assert page.locator("#sidecar a").first.get_attribute("href")  # the sidecar, downloadable
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)
    (ARTIFACTS / "app_timings.json").write_text(json.dumps(
        {"startup_s": round(startup, 2), "click_to_video_s": round(click_to_video, 2)}, indent=1) + "\n")
    print(f"start-up (command -> page served) {startup:.1f} s; click -> video {click_to_video:.1f} s")
    assert len(list(out.glob("kaleido_*.mp4"))) == len(list(out.glob("kaleido_*.json"))) == 1

    # bad input: one line in the page, and the next click works
    page.locator("#prompt textarea").fill("")
    page.locator("#generate").click()
    toast = page.get_by_text("The prompt is empty")
    toast.first.wait_for(timeout=20_000)
    page.get_by_text("The green figure with an orange hat moves").first.click()  # an example, as it is
    page.locator("#generate").click()
    page.locator("#history").get_by_text("green_figure.png").filter(visible=True).wait_for(timeout=60_000)
    page.wait_for_function("s => document.querySelector('#seed-used textarea').value !== s", arg=seed)
    history.first.click()  # a row of the history shows its video and seed again
    page.wait_for_function("s => document.querySelector('#seed-used textarea').value === s", arg=seed)

    # cancel: a long run stops between steps, with one line
    page.get_by_text("Advanced").click()
    steps = page.locator("input[aria-label='number input for Steps']")
    steps.fill("100")
    steps.press("Enter")
    page.locator("#generate").click()
    page.locator(".progress-text, .meta-text").first.wait_for(timeout=30_000)
    page.locator("#cancel").click()
    page.get_by_text("Cancelled").first.wait_for(timeout=30_000)
    assert len(list(out.glob("kaleido_*.mp4"))) == 2  # the cancelled run wrote nothing

    # a file that is not an image: one line as soon as it is uploaded
    fake = out.parent / "not_an_image.png"
    fake.write_text("hello")
    page.locator("#references input[type=file]").set_input_files([str(fake)])
    page.get_by_text("'not_an_image.png' is not a readable image").first.wait_for(timeout=20_000)

    outside = [u for u in requests if not u.startswith(("data:", "blob:")) and urlparse(u).netloc != host]
    assert outside == [] and len(requests) > 10  # the page's assets all come from the local server
    page.close()
