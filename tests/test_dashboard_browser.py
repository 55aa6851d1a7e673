"""The gradwatch tab in a real headless Chromium (driven by Selenium and Debian's ``chromedriver``),
served by a real ``tensorboard``: the heatmap draws one row per layer and one column per step, and a
click on a row shows that layer's chart.

Skipped, with the reason, when Chromium, chromedriver or selenium is missing; CI (``.ci/run``)
installs them and sets ``GRADWATCH_REQUIRE_BROWSER=1``, which turns the skip into a failure.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from gw_dashboard import TensorBoard
from gw_testing import mlp, train, vector_task
from torch import nn

import gradwatch

pytestmark = pytest.mark.slow
STEPS = 40
LAYERS = 8
WAIT_S = 120


def _browser() -> tuple[str, str]:
    """Paths of Chromium and chromedriver, or a skip (a failure in CI) naming what is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    missing = [what for what, path in (("chromium (apt-get install chromium)", chromium),
                                       ("chromedriver (apt-get install chromium-driver)", driver)) if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        reason = "the browser test needs " + " and ".join(missing)
        if os.environ.get("GRADWATCH_REQUIRE_BROWSER"):
            pytest.fail(reason + " (GRADWATCH_REQUIRE_BROWSER is set)")
        pytest.skip(reason)
    return chromium, driver  # type: ignore[return-value]


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory):
    """The gradwatch tab open in headless Chromium, switched into the plugin's iframe, drawn."""
    chromium, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    logdir: Path = tmp_path_factory.mktemp("dashboard_browser")
    model = mlp(nn.Sigmoid, LAYERS)
    with gradwatch.watch(model, log_dir=logdir / "sigmoid", figure_every_n_steps=0, histogram_every_n_steps=0,
                         diagnose_every_n_steps=10) as w:
        train(model, vector_task(), STEPS, watcher=w)
    server = TensorBoard(logdir)
    profile = tempfile.mkdtemp(prefix="gw-chromium-")
    browser = None
    try:
        server.wait_for_runs({"sigmoid": STEPS})
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={profile}"):
            options.add_argument(flag)
        browser = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
        browser.get(server.base + "/#gradwatch")
        wait = WebDriverWait(browser, WAIT_S, poll_frequency=0.2)
        frame = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "iframe") and b.find_elements(By.CSS_SELECTOR, "iframe")[0])
        browser.switch_to.frame(frame)
        wait.until(lambda b: b.execute_script("return document.body && document.body.dataset.state") == "drawn")
        yield browser, wait, server
    finally:
        if browser is not None:
            browser.quit()
        server.stop()
        shutil.rmtree(profile, ignore_errors=True)


def test_heatmap_draws_one_row_per_layer_and_one_column_per_step(page) -> None:
    from selenium.webdriver.common.by import By

    browser, _, _ = page
    (panel,) = browser.find_elements(By.CSS_SELECTOR, ".gw-panel")
    data = browser.execute_script("return Object.assign({}, arguments[0].dataset)", panel)
    assert data["run"] == "sigmoid"
    assert (int(data["rows"]), int(data["cols"])) == (LAYERS, STEPS)
    assert (int(data["nLayers"]), int(data["nSteps"])) == (LAYERS, STEPS)
    assert int(data["findings"]) >= 1 and browser.find_elements(By.CSS_SELECTOR, ".gw-marker")
    canvas = panel.find_element(By.CSS_SELECTOR, "canvas.gw-heatmap")
    # the canvas really holds colour: the first and last layers' cells differ (vanishing: decades apart)
    top, bottom = browser.execute_script(
        "const c = arguments[0], ctx = c.getContext('2d'), h = Number(arguments[1]);"
        "const px = (y) => Array.from(ctx.getImageData(c.width - 5, y, 1, 1).data);"
        "return [px(h / 2), px(c.height - 18 - h / 2)];", canvas, panel.get_attribute("data-cell-h"))
    assert top != bottom and top[3] == bottom[3] == 255


def test_click_on_a_row_shows_that_layers_chart(page) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser, wait, server = page
    rows = server.plugin("heatmap", run="sigmoid", width=1000, height=1000)["rows"]
    panel = browser.find_element(By.CSS_SELECTOR, ".gw-panel")
    canvas = panel.find_element(By.CSS_SELECTOR, "canvas.gw-heatmap")
    cell_h = float(panel.get_attribute("data-cell-h"))
    label_w = int(panel.get_attribute("data-label-w"))
    for row in (3, 0):
        x = label_w + 30 - canvas.size["width"] / 2      # Selenium offsets are from the element's centre
        y = row * cell_h + cell_h / 2 - canvas.size["height"] / 2
        ActionChains(browser).move_to_element_with_offset(canvas, int(x), int(y)).click().perform()
        chart = browser.find_element(By.ID, "gw-layer-chart")
        wait.until(lambda b, c=chart, r=row: c.get_attribute("data-state") == "drawn"
                   and c.get_attribute("data-layer") == rows[r]["layer"])
        assert int(chart.get_attribute("data-series")) >= 5  # grad_norm, grad_to_weight, update_ratio, ...
        drawn = {p.get_attribute("data-series") for p in chart.find_elements(By.CSS_SELECTOR, "svg path")}
        assert {"grad_norm", "grad_to_weight", "update_ratio"} <= drawn
        assert len(drawn) == int(chart.get_attribute("data-visible"))
        assert rows[row]["layer"] in chart.find_element(By.TAG_NAME, "h2").text
    # the legend shows a hidden series on click
    chart = browser.find_element(By.ID, "gw-layer-chart")
    chart.find_element(By.CSS_SELECTOR, '.gw-legend-item[data-series="weight_norm"]').click()
    wait.until(lambda b: chart.find_elements(By.CSS_SELECTOR, 'svg path[data-series="weight_norm"]'))
    profile = browser.find_element(By.ID, "gw-profile-chart")
    wait.until(lambda b: profile.get_attribute("data-state") == "drawn")
    assert len(profile.find_elements(By.CSS_SELECTOR, "svg rect")) == LAYERS  # one bar per layer at that step
