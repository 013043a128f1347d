"""`diffusiond web` in a real browser (headless Chromium through Selenium) against a real daemon.

The daemon is a `diffusiond run` process on the stand-in generator, which makes a job's steps
at a set pace and holds the job at a chosen step until the test opens its gate, so the page's
progress can be watched as it moves. `/metrics` is read with prometheus-client's own parser.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import CEILING_S, REPO, Spool, hold, start_daemon_process, wait_for, wait_until_ready

CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = REPO / "build" / "test-artifacts"
pytestmark = pytest.mark.skipif(
    CHROMEDRIVER is None, reason="needs chromium and chromium-driver (.ci/run installs them)"
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def page(spool: Spool, tmp_path: Path) -> Iterator[str]:
    """`diffusiond web` on a free loopback port, with a token; yields its base URL."""
    token = tmp_path / "web.token"
    token.write_text("s3cret\n")
    port = free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "diffusiond.daemon.cli", "web", "--config", str(spool.config_path)),
            *("--listen", f"127.0.0.1:{port}", "--token-file", str(token), "--cache", str(tmp_path / "thumbs")),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"diffusiond web exited: {process.stdout.read() if process.stdout else ''}")
        try:
            return urllib.request.urlopen(base + "/metrics", timeout=10).status == 200
        except OSError:
            return False

    try:
        wait_for(answers, what="the page to answer")
        yield base
    finally:
        process.terminate()
        process.communicate(timeout=CEILING_S)


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1400",
    ):
        options.add_argument(flag)
    if shutil.which("chromium"):
        options.binary_location = str(shutil.which("chromium"))
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(CEILING_S)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_shows_queue_progress_results_and_failures(spool: Spool, page: str, browser, tmp_path: Path) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    gate = tmp_path / "gate"
    daemon = start_daemon_process(spool.config_path, standin=hold(gate, "a slow lighthouse", step=20) | {"step_s": 0.1})
    try:
        wait_until_ready(spool.config_path, daemon)
        browser.get(page + "/")
        spool.drop("slow.yaml", "prompt: a slow lighthouse\nsteps: 30\nseed: 7\n")
        # The page reloads itself when a job starts or ends: an element read meanwhile is looked up again.
        until = WebDriverWait(
            browser, CEILING_S, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
        ).until

        # The queue shows the dropped job, and its progress moves while the page stays open.
        row = until(lambda b: _text(b, "tr.running"))
        assert "slow.yaml" in row
        first = until(lambda b: _step(b))
        moved = until(lambda b: (step := _step(b)) and step > first and step)
        assert first < moved <= 20
        until(lambda b: _step(b) == 20)  # held there: "step 20 of 30", never past 30
        assert until(lambda b: _text(b, "tr.running .progress")) == "step 20 of 30"

        # A wrong job shows its reason and its fix.
        spool.drop("typo.yaml", "prompt: x\nstpes: 3\n")
        failure = until(lambda b: _text(b, "tr.failure"))
        assert "typo.yaml" in failure and "invalid_field" in failure
        assert "did you mean 'steps'" in failure and "Fix: rename or remove 'stpes'" in failure

        # Done: the gallery shows its thumbnail, and its page the prompt and the seed.
        (gate / "release").touch()
        loaded = "const i = document.querySelector('#gallery a.result img'); return i && i.complete && i.naturalWidth"
        assert until(lambda b: b.execute_script(loaded)) > 0, "the thumbnail is an image"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "status-page.png"))
        browser.get(until(lambda b: b.find_element(By.CSS_SELECTOR, "#gallery a.result").get_attribute("href")))
        until(lambda b: "/result/" in b.current_url)
        assert browser.find_element(By.CSS_SELECTOR, "td.prompt").text == "a slow lighthouse"
        assert browser.find_element(By.CSS_SELECTOR, ".seed").text == "7"
        job = browser.find_element(By.ID, "job").text
        assert "prompt: a slow lighthouse" in job and "seed: 7" in job and "steps: 30" in job
        browser.save_screenshot(str(ARTIFACTS / "result-page.png"))
    finally:
        daemon.terminate()
        daemon.communicate(timeout=CEILING_S)

    # /metrics: every daemon's samples, parsed by prometheus-client, with the jobs by task and outcome.
    def jobs() -> dict[tuple[str, str], float]:
        text = urllib.request.urlopen(page + "/metrics", timeout=30).read().decode()
        found = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "diffusiond_jobs_total" and sample.labels.get("daemon") == "test":
                    found[(sample.labels["task"], sample.labels["outcome"])] = sample.value
        return found

    counted = wait_for(lambda: (found := jobs()).get(("txt2img", "done")) and found, what="the jobs counted")
    assert counted[("txt2img", "done")] == 1
    assert counted[("unknown", "rejected")] == 1, "a file refused before its jobs were read has no task"


def test_the_buttons_need_the_token(spool: Spool, page: str) -> None:
    refused = urllib.request.Request(page + "/cancel", data=urllib.parse.urlencode({"target": "x"}).encode())
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(refused, timeout=30)
    assert caught.value.code == 403
    read_only = urllib.request.urlopen(page + "/", timeout=30).read().decode()
    assert "<button>cancel</button>" not in read_only and 'name="token"' not in read_only
    assert not (spool.root / ".cancel").exists(), "nothing was asked"
    with_token = urllib.request.urlopen(page + "/?token=s3cret", timeout=30).read().decode()
    assert 'name="token"' in with_token or "Nothing published yet" in with_token


def _text(browser, selector: str) -> str | None:
    elements = browser.find_elements("css selector", selector)
    return elements[0].text if elements else None


def _step(browser) -> int | None:
    parts = (_text(browser, "tr.running .progress") or "").split()
    return int(parts[1]) if len(parts) == 4 and parts[0] == "step" and parts[1].isdigit() else None
