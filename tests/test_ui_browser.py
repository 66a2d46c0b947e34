"""End to end: `clipsearch ui` as a real server, driven by a real headless Chromium through selenium.

Needs Debian's `chromium` and `chromium-driver` (a tool's own browser download cannot work offline).
The helpers here also make `docs/screenshot.png`:

    python tests/test_ui_browser.py LIBRARY docs/screenshot.png "a red circle"
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest's helpers, also when run as a script
from conftest import clipsearch_command  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = REPO / "test-artifacts"
SERVER_START_TIMEOUT = 60
RESULTS_TIMEOUT = 90  # the first query loads torch and the model in the server
CARD_CAPTION = re.compile(r"^(\S+\.(?:jpe?g|png|webp|gif|bmp|tiff?|heic|heif|avif)) · ", re.IGNORECASE)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--window-size=1400,1000")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                       reason="needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium "
                              "chromium-driver)"),
]


# --- the server -----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def running_ui(library: Path, port: int) -> Iterator[str]:
    """`clipsearch ui` in its own process group (the CLI starts streamlit as a child), stopped however we leave."""
    env = {**os.environ, "CLIPSEARCH_LIBRARY": str(library), "HF_HUB_OFFLINE": "1"}
    command = [*clipsearch_command(), "ui", "--library", str(library), "--port", str(port)]
    # The server's output goes to a file, not a pipe nobody reads (a full pipe would stall the server).
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_healthy(url, server, log)
            yield url
        finally:
            stop_process_group(server)


def wait_until_healthy(url: str, server: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            output = log.read().decode(errors="replace")
            raise AssertionError(f"clipsearch ui exited with {server.returncode}:\n{output}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"clipsearch ui did not answer at {url} within {SERVER_START_TIMEOUT} s")


def stop_process_group(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the group we started, then SIGKILL if it lingers."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if server.poll() is not None:
            break
        try:
            os.killpg(server.pid, sig)
            server.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


# --- the browser ----------------------------------------------------------------------------------------------


@contextmanager
def headless_chromium(profile: Path) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()


def search_in_browser(driver, url: str, text: str) -> list[str]:
    """Type a query, press Enter, wait until the result thumbnails have loaded; the result names, in order."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    box = WebDriverWait(driver, SERVER_START_TIMEOUT).until(
        lambda d: d.find_element(By.CSS_SELECTOR, 'input[aria-label="Search"]'))
    box.send_keys(text, Keys.ENTER)
    WebDriverWait(driver, RESULTS_TIMEOUT).until(lambda d: thumbnails_loaded(d) and result_names(d))
    time.sleep(1)  # let the last cards finish laying out before anyone takes a picture
    return result_names(driver)


def thumbnails_loaded(driver) -> bool:
    return bool(driver.execute_script(
        "const imgs = [...document.querySelectorAll('[data-testid=\"stImage\"] img')];"
        "return imgs.length > 0 && imgs.every(img => img.complete && img.naturalWidth > 0);"))


def result_names(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    captions = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stCaptionContainer"]')
    return [match.group(1) for caption in captions if (match := CARD_CAPTION.match(caption.text.strip()))]


def screenshot_of_search(library: Path, text: str, out: Path, profile: Path) -> list[str]:
    """Start the server, search, save a screenshot of the page; the result names shown."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with running_ui(library, free_port()) as url, headless_chromium(profile) as driver:
        names = search_in_browser(driver, url, text)
        driver.save_screenshot(str(out))
    return names


# --- the test -------------------------------------------------------------------------------------------------


@pytest.fixture
def library_of_shapes(library_dir: Path, tmp_path: Path, trained_model: str) -> Path:
    from clipsearch.indexer.pipeline import index_folders

    from clipsearch.library import Library
    from clipsearch.model import ModelSpec
    from clipsearch.tinyclip import draw_shape

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for shape in ("circle", "square", "triangle"):
        for colour in ("red", "green", "blue"):
            draw_shape(shape, colour, size=128, rng=rng).save(photos / f"{colour}-{shape}.jpg")
    library = Library.create(library_dir)
    try:
        index_folders(library, [photos], model=ModelSpec.parse(trained_model))
    finally:
        library.close()
    return library_dir


def test_search_in_a_real_browser(library_of_shapes: Path, tmp_path: Path):
    screenshot = ARTIFACTS / "ui-search.png"
    screenshot.unlink(missing_ok=True)
    names = screenshot_of_search(library_of_shapes, "a red circle", screenshot, tmp_path / "chromium-profile")
    assert names, "result captions were shown"
    assert names[0].startswith("red-circle"), names
    assert screenshot.stat().st_size > 10_000


if __name__ == "__main__":
    library_arg, out_arg, query_arg = sys.argv[1:4]
    with tempfile.TemporaryDirectory() as scratch:
        print(screenshot_of_search(Path(library_arg), query_arg, Path(out_arg), Path(scratch) / "profile"))
