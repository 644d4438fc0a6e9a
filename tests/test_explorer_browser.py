"""The explorer in a real JupyterLab, driven by a real headless Chromium (Playwright).

The test starts its own JupyterLab server on localhost, opens a notebook that builds the explorer,
runs it, changes the latent, types text in the box, and checks that the panels update with no error
in the notebook. A second test opens a built student lab (labs/00) and runs one exercise's stub. It saves a screenshot (to $SAE_KIT_SCREENSHOT_DIR too, when set). It is skipped,
saying why, when Chromium (Debian's ``chromium`` package) or Playwright is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FIRST, SECOND = 3, 11  # the latents shown first, then typed in


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook(store_path: Path) -> dict:
    cells = [
        "import warnings\nwarnings.filterwarnings('ignore')\nimport sae_kit\ndevice = sae_kit.setup(seed=0)",
        f"model = sae_kit.load_model(device='cpu')\nstore = sae_kit.ActivationStore({str(store_path)!r})\n"
        "sae = sae_kit.topk_sae(store.d_in, 2 * store.d_in, k=8, seed=0)\n"
        "sae_kit.train(sae, store, batch_size=256, progress=False);",
        f"app = sae_kit.explore(sae, store, model, latent={FIRST})\napp",
    ]
    return {"nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
            "cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None, "outputs": [],
                       "source": src} for i, src in enumerate(cells)]}


@pytest.fixture
def lab(tmp_path, small_store):
    """A JupyterLab server of our own on a free localhost port, stopped afterwards."""
    root = tmp_path / "lab"
    root.mkdir()
    (root / "explore.ipynb").write_text(json.dumps(_notebook(small_store.path)))
    shutil.copy(Path(__file__).resolve().parent.parent / "labs" / "00_quickstart.ipynb", root / "lab00.ipynb")
    port, token = _free_port(), "sae-kit-test"
    env = {**os.environ, "TQDM_DISABLE": "1", "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "ws")}
    args = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--allow-root")  # JupyterLab refuses to start as root without it
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("JupyterLab exited:\n" + (tmp_path / "lab.log").read_text()[-3000:])
                time.sleep(0.2)
        else:
            raise RuntimeError("JupyterLab did not start in 120 s:\n" + (tmp_path / "lab.log").read_text()[-3000:])
        yield url, token
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_explorer_in_jupyterlab(lab, tmp_path):
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine: install Debian's 'chromium' package to run the browser test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra) to run it")
    url, token = lab
    with _page(sync_api, tmp_path / "failure.png") as page:
        _drive(page, sync_api, url, token, tmp_path)
    shot = tmp_path / "explorer.png"
    assert shot.stat().st_size > 10_000


def test_a_student_lab_opens_and_its_stub_names_the_exercise(lab, tmp_path):
    """The built student notebook opens in JupyterLab: header, folded hint, and an exercise cell whose
    stub raises NotImplementedError with the exercise id when the student runs it."""
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine: install Debian's 'chromium' package to run the browser test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra) to run it")
    url, token = lab
    with _page(sync_api, tmp_path / "failure-lab.png") as page:
        page.goto(f"{url}/lab/tree/lab00.ipynb?token={token}")
        page.locator(".jp-Notebook").wait_for()
        _wait_for_idle_kernel(url, token)
        expect = sync_api.expect
        expect(page.locator(".jp-Notebook")).to_contain_text("This is the lab version")
        hint = page.locator("details summary", has_text="Hint").first
        hint.scroll_into_view_if_needed()
        expect(hint).to_be_visible()
        assert hint.locator("xpath=..").get_attribute("open") is None  # the <details> is folded until opened
        page.locator(".jp-Cell").first.locator(".jp-InputPrompt").click()
        page.keyboard.press("Shift+Enter")  # import sae_kit, setup
        cell = page.locator(".jp-CodeCell", has_text="def topk_select").first
        cell.scroll_into_view_if_needed()
        cell.locator(".jp-InputPrompt").click()
        page.keyboard.press("Shift+Enter")
        expect(cell.locator(".jp-OutputArea")).to_contain_text("exercise 00.topk_select", timeout=120_000)
        expect(cell.locator(".jp-OutputArea")).to_contain_text("NotImplementedError")


@contextlib.contextmanager
def _page(sync_api, failure_shot: Path):
    """A page of the system Chromium; on failure, a screenshot and the page's text are kept."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.set_default_timeout(60_000)
        try:
            yield page
        except Exception:
            page.screenshot(path=str(failure_shot), full_page=True)
            print("screenshot of the failure:", failure_shot)
            print("page text:", page.locator("body").inner_text()[-4000:])
            raise
        finally:
            browser.close()


def _wait_for_idle_kernel(url: str, token: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            kernels = json.loads(urllib.request.urlopen(f"{url}/api/kernels?token={token}", timeout=5).read())
        except OSError:  # the server can answer 500 while a kernel is still being created: ask again
            time.sleep(0.5)
            continue
        if kernels and all(k["execution_state"] == "idle" and k["connections"] > 0 for k in kernels):
            time.sleep(1.0)
            return
        time.sleep(0.25)
    raise TimeoutError(f"no idle, connected kernel within {timeout:g} s")


def _drive(page, sync_api, url, token, tmp_path):
    """Open the notebook, run it, switch latent, type text; screenshot."""
    page.goto(f"{url}/lab/tree/explore.ipynb?token={token}")
    page.locator(".jp-Notebook").wait_for()
    _wait_for_idle_kernel(url, token)  # keys pressed before the kernel is connected would be lost
    page.get_by_text("Kernel status: Idle").first.wait_for(state="attached")
    page.locator(".jp-Cell").first.locator(".jp-InputPrompt").click()  # select the first cell ...
    for _ in range(3):  # ... and run the three cells as a user would, Shift+Enter each
        page.keyboard.press("Shift+Enter")
    view = page.locator(".sae-kit-explorer .sae-kit-view")
    view.wait_for(timeout=int(os.environ.get("SAE_KIT_BROWSER_WAIT", "300")) * 1000)  # model load, a short training run and the precompute
    expect = sync_api.expect
    expect(view).to_contain_text(f"latent {FIRST}")
    first_panel = view.inner_text()

    box = page.locator(".sae-kit-latent input")  # change the latent as a user would
    box.fill(str(SECOND))
    t0 = time.perf_counter()
    box.press("Enter")
    expect(view).to_contain_text(f"latent {SECOND}", timeout=30_000)
    print(f"latent switch seen in the browser after {1000 * (time.perf_counter() - t0):.0f} ms")
    assert view.inner_text() != first_panel

    page.locator(".sae-kit-textbox textarea").fill("import os\nimport sys\nprint(sys.path)")
    page.locator(".sae-kit-run-text").click()
    tokens = page.locator(".sae-kit-text-result .sae-kit-tok")
    expect(tokens.first).to_be_visible(timeout=30_000)
    assert tokens.count() >= 5

    notebook_text = page.locator(".jp-Notebook").inner_text()
    assert "Traceback" not in notebook_text, notebook_text[-3000:]
    shot = tmp_path / "explorer.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("SAE_KIT_SCREENSHOT_DIR"):
        dest = Path(os.environ["SAE_KIT_SCREENSHOT_DIR"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, dest / "explorer.png")
