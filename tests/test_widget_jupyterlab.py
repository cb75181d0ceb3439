"""The widget in a real JupyterLab: the test starts ``jupyter lab`` on loopback (its own config and runtime
directories, a random token), opens a notebook with Playwright on Debian's chromium (no browser download), runs its
cells (``lm = decodelab.load(); lm.explore(...)``) and checks the widget's DOM: " night" first in the chart, a click
on it appends the token (the kernel recomputes the chips: 7 instead of 6), a generation with the logit lens draws
one heatmap row per layer (30), and following " night" draws its rank at every layer (30 rows). It also opens the
saved examples/walkthrough.ipynb without running it: the widget cell shows its static fallback (chips, next-token
table). Screenshots: test-artifacts/screenshots/jupyterlab-*.png.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("anywidget")
pytest.importorskip("jupyterlab")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "screenshots"
WAIT_MS = 240_000  # kernel start + model load + a generation on a busy 2-core machine
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "walkthrough.ipynb"
CELLS = ["import decodelab\nlm = decodelab.load()", "w = lm.explore('It was a dark and stormy')\nw"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(embedded, tmp_path_factory):
    """A JupyterLab server on loopback serving a directory with widget.ipynb; yields (url, token)."""
    root = tmp_path_factory.mktemp("lab")
    nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                          "language": "python"}},
          "cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "source": src, "outputs": [],
                     "execution_count": None} for i, src in enumerate(CELLS)]}
    (root / "widget.ipynb").write_text(json.dumps(nb), encoding="utf-8")
    (root / "walkthrough.ipynb").write_bytes(EXAMPLE.read_bytes())
    token, port = secrets.token_hex(16), _free_port()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(root / ".config"), JUPYTER_RUNTIME_DIR=str(root / ".runtime"),
               JUPYTERLAB_WORKSPACES_DIR=str(root / ".workspaces"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
         "--allow-root", "--ServerApp.terminals_enabled=False",
         "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabServerApp.extension_manager=readonly"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(root / "lab.log", "wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/api/status", params={"token": token}, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("jupyter lab did not start: " + (root / "lab.log").read_text(errors="replace")[-2000:])
            time.sleep(0.5)
        yield url, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _open_notebook(browser, lab, name: str, height: int):
    """A new page showing notebook ``name`` of the ``lab`` server, once JupyterLab exposes it as the current widget."""
    url, token = lab
    page = browser.new_page(viewport={"width": 1280, "height": height})
    page.set_default_timeout(WAIT_MS)
    page.goto(f"{url}/lab/tree/{name}?token={token}")
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell")
    page.wait_for_function("window.jupyterapp && window.jupyterapp.shell.currentWidget "
                           "&& window.jupyterapp.shell.currentWidget.content")
    return page


def test_widget_runs_in_jupyterlab(browser, lab):
    page = _open_notebook(browser, lab, "widget.ipynb", 1600)
    try:
        page.wait_for_function("window.jupyterapp.shell.currentWidget.sessionContext.session")
        page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        bars = page.locator(".dl-widget ol.bars button.cand")
        bars.first.wait_for()
        assert bars.count() == 10
        assert bars.nth(0).get_attribute("data-id") == "3163" and "night" in bars.nth(0).inner_text()
        assert page.locator(".dl-widget .chip").count() == 6
        page.screenshot(path=str(SHOTS / "jupyterlab-widget-chart.png"), full_page=True)

        bars.nth(0).click()  # step mode: the kernel appends " night" and recomputes chips and chart
        page.wait_for_function("document.querySelectorAll('.dl-widget .chip').length === 7")
        assert page.locator(".dl-widget .dl-prompt").inner_text() == "It was a dark and stormy night"

        page.locator(".dl-widget input[name=max_new_tokens]").fill("3")
        page.locator(".dl-widget input[name=lens]").check()
        page.locator(".dl-widget button.dl-generate").click()
        page.wait_for_selector(".dl-widget .dl-lens tr.lens-row")
        assert page.locator(".dl-widget .dl-lens tr.lens-row").count() == 30
        assert page.locator(".dl-widget .dl-gen .gtok").count() == 3
        page.locator(".dl-widget input[name=follow]").fill(" night")  # follow a token through the layers
        page.locator(".dl-widget button.dl-follow-go").click()
        page.wait_for_selector(".dl-widget .dl-follow tr.lens-row")
        assert page.locator(".dl-widget .dl-follow tr.lens-row").count() == 30
        page.screenshot(path=str(SHOTS / "jupyterlab-widget-lens.png"), full_page=True)
    finally:
        page.close()


def test_saved_widget_output_shows_its_static_view_when_reopened(browser, lab):
    """The walk-through as saved (outputs kept, no widget state, nothing run): the lm.explore cell shows the
    static fallback (token chips and the next-token table) instead of an empty or broken widget."""
    page = _open_notebook(browser, lab, "walkthrough.ipynb", 1200)
    try:
        output = """() => { const nb = window.jupyterapp.shell.currentWidget.content;
            const i = nb.widgets.findIndex((w) => w.model.sharedModel.getSource().includes("lm.explore(PROMPT)"));
            if (i < 0) return "";
            nb.activeCellIndex = i; nb.scrollToItem(i, "start");
            const area = nb.widgets[i].node.querySelector(".jp-OutputArea");
            return area ? area.innerText : ""; }"""
        page.wait_for_function(f"({output})().includes('3163')")
        text = page.evaluate(output)
        assert "1589" in text and "43471" in text and '" night"' in text and "97.07%" in text
        page.screenshot(path=str(SHOTS / "jupyterlab-reopened-fallback.png"))
    finally:
        page.close()
