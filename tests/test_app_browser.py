"""The web page in real headless Chromium (selenium + Debian's chromium and chromium-driver).

Run with ``pytest -m browser tests/test_app_browser.py -rs``. Needs ``apt-get install chromium
chromium-driver`` and ``pip install selenium``. By default the server runs a tiny random Llama
with a fake judge; ``SUPERSCOPES_APP_MODEL=smollm2-135m`` runs a real model and the real judge
(slower; what docs/app.png shows) with its embedded SAE for the cell panels. Saves a screenshot
of the page to docs/app.png (or to ``$SUPERSCOPES_APP_SCREENSHOT``), and of the cell panels to
docs/app-sae.png beside it. The queue and cancel test runs on a server of its own (the tiny model,
a judge that holds each chunk until the test lets it through) in two windows, two clients.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("SUPERSCOPES_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SUPERSCOPES_CHROMEDRIVER", "/usr/bin/chromedriver")
REAL_MODEL = os.environ.get("SUPERSCOPES_APP_MODEL")
SCREENSHOT = Path(
    os.environ.get("SUPERSCOPES_APP_SCREENSHOT") or Path(__file__).resolve().parents[1] / "docs" / "app.png"
)
PROMPT = "Diana, Princess of Wales"
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
    "--force-device-scale-factor=1",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from superscopes import sae as S
    from superscopes.app import App, make_server
    from superscopes.app.store import RunStore
    from superscopes.app.testing import fake_similarity, tiny_model, tiny_panels

    store = RunStore(tmp_path_factory.mktemp("runs") / "runs.sqlite")
    if REAL_MODEL:
        saes = [S.EMBEDDED_DIR / S.EMBEDDED[REAL_MODEL]] if REAL_MODEL in S.EMBEDDED else []
        generators = [os.environ["SUPERSCOPES_APP_GENERATOR"]] if os.environ.get("SUPERSCOPES_APP_GENERATOR") else []
        app = App(default_model=REAL_MODEL, offer_embedded=False, store=store, saes=saes, generators=generators)
    else:
        model = tiny_model()
        sae, generator = tiny_panels(model, tmp_path_factory.mktemp("panels"))
        app = App(
            default_model="tiny-llama",
            models={"tiny-llama": model},
            judge=fake_similarity,
            offer_embedded=False,
            store=store,
            saes=[sae],
            generators=[generator],
        )
    httpd = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def gated():
    """A server of its own on the tiny model (whatever ``SUPERSCOPES_APP_MODEL`` says) whose
    judge holds each prompt's chunks until the test opens that prompt's gate (``judge``), whose
    cancel requests wait while ``cancels`` is clear and polls while ``answers`` is, and which
    counts each run's polls (``polls``): a run stays running, cancelling or queued exactly as
    long as the test needs, and the page hears from the server only when the test lets it."""
    from superscopes.app import App, make_server
    from superscopes.app.store import RunStore
    from superscopes.app.testing import GatedJudge, tiny_model

    judge, cancels, answers, polls = GatedJudge(), threading.Event(), threading.Event(), Counter()
    cancels.set()
    answers.set()
    folder = Path(tempfile.mkdtemp(prefix="superscopes-gated-"))
    app = App(
        default_model="tiny-llama",
        models={"tiny-llama": tiny_model()},
        judge=judge,
        offer_embedded=False,
        store=RunStore(folder / "runs.sqlite"),
    )
    cancel, state = app.cancel, app.state

    def held_cancel(job_id):
        assert cancels.wait(60), "the test never let the cancel through"
        return cancel(job_id)

    def counted_state(job_id, *args):
        polls[job_id] += 1
        assert answers.wait(60), "the test never let the poll through"
        return state(job_id, *args)

    app.cancel, app.state = held_cancel, counted_state
    httpd = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield SimpleNamespace(url=httpd.url, app=app, judge=judge, cancels=cancels, answers=answers, polls=polls)
    judge.open_all()
    cancels.set()
    answers.set()
    app.close()
    httpd.shutdown()
    httpd.server_close()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def downloads():
    path = Path(tempfile.mkdtemp(prefix="superscopes-downloads-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def driver(downloads):
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.chrome.service import Service

    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).exists():
            pytest.skip(f"{path} is missing: apt-get install {package}")
    profile = tempfile.mkdtemp(prefix="superscopes-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    yield browser
    browser.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait_for(condition, timeout=30.0, message="condition"):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = condition()
            if last:
                return last
        except Exception as error:  # the DOM may be re-rendering between polls
            last = error
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {message} (last: {last!r})")


def test_page_end_to_end(server, driver, downloads):
    from selenium.webdriver.common.by import By

    from superscopes.judge import best

    find = driver.find_element
    driver.get(server.url)
    info = wait_for(lambda: re.search(r"(\d+) layers", find(By.ID, "model-info").text), 300, "the model to load")
    n_layers = int(info.group(1))
    layers, alphas = ("0-1", "1,3,6") if not REAL_MODEL else ("1-4", "1,3,6,9,12,15")
    new_tokens = "4" if not REAL_MODEL else "10"

    def fill(element_id, text):
        box = find(By.ID, element_id)
        box.clear()
        box.send_keys(text)

    def error_text():
        box = find(By.ID, "error")
        return box.text if box.is_displayed() else ""

    # Bad input: an empty prompt, then a layer the model lacks; the page shows the core's message.
    fill("prompt", "")
    find(By.ID, "run").click()
    wait_for(lambda: "the prompt is empty" in error_text(), 30, "the empty-prompt message")
    fill("prompt", PROMPT)
    fill("layers", f"0-{n_layers + 3}")
    find(By.ID, "run").click()
    wait_for(lambda: f"layer {n_layers} is out of range" in error_text(), 30, "the layer-range message")
    assert f"has layers 0-{n_layers - 1}" in error_text()

    # A good grid: the page states its size, then runs it.
    fill("layers", layers)
    fill("alphas", alphas)
    fill("max-new-tokens", new_tokens)
    wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#badges .badge")) == 6, 30, "six token badges")
    low, high = map(int, layers.split("-"))
    n_alphas, n_layer_rows = len(alphas.split(",")), high - low + 1
    total = 6 * 3 * n_layer_rows * n_alphas
    size = find(By.ID, "grid-size").text
    controls = 6 * 3 * n_layer_rows * 2  # norm-matched and random per best readout; alpha 1 is in the grid
    assert f"= {total} cells + {controls} controls (cap 2000)" in size, size
    find(By.ID, "run").click()
    wait_for(
        lambda: find(By.ID, "cancel").is_enabled() or "done" in find(By.ID, "progress-text").text,
        30,
        "the run to start",
    )
    assert not error_text()
    done = f"{total} / {total} cells + {controls} / {controls} controls — done"
    wait_for(lambda: done in find(By.ID, "progress-text").text, 120 if not REAL_MODEL else 3600, "the run to finish")
    assert not find(By.ID, "cancel").is_enabled() and find(By.ID, "run").is_enabled()

    # Click a token: a Layer x Site table of best-alpha readouts, as the judge picks them.
    job = next(iter(server.app.jobs.values()))
    grid_rows = job.frame().query("control == ''")  # the controls are shown apart, under each winner
    winners = best(grid_rows, ["position", "site", "layer"], threshold=0.3)
    badge = find(By.CSS_SELECTOR, '#badges .badge[data-position="3"]')
    assert badge.text.startswith("·Princess")
    badge.click()
    wait_for(lambda: "Princess" in find(By.ID, "detail-title").text, 10, "the token's table")
    headers = [th.text for th in driver.find_elements(By.CSS_SELECTOR, "#table thead th")]
    assert headers == ["Layer", "MLP input", "MLP output", "Hidden state"]
    body_rows = driver.find_elements(By.CSS_SELECTOR, "#table tbody tr")
    assert len(body_rows) == n_layer_rows
    for cell in driver.find_elements(By.CSS_SELECTOR, "#table tbody td"):
        site, layer = cell.get_attribute("data-site"), int(cell.get_attribute("data-layer"))
        winner = winners[(winners.position == 3) & (winners.site == site) & (winners.layer == layer)].iloc[0]
        meta = re.fullmatch(
            r"α (\S+) · similarity (\S+)( echo)?", cell.find_element(By.CSS_SELECTOR, "td > .meta").text
        )
        assert meta and float(meta.group(1)) == winner.alpha, meta
        assert abs(float(meta.group(2)) - winner.similarity) <= 0.0051
        shown = cell.find_element(By.CSS_SELECTOR, "td > .out").get_attribute("textContent")
        assert shown == (winner.output if isinstance(winner.output, str) and winner.output else "(empty)")
        # Its controls: alpha 1, norm-matched and a random direction, each with its similarity.
        controls = cell.find_elements(By.CSS_SELECTOR, "ul.controls li")
        assert [c.get_attribute("data-control") for c in controls] == ["alpha1", "norm", "random"]
        assert all(re.search(r"· -?\d\.\d\d", c.text) for c in controls), [c.text for c in controls]
    # The toggle shows every alpha in each cell.
    find(By.ID, "all-alphas").click()
    for cell in driver.find_elements(By.CSS_SELECTOR, "#table tbody td"):
        assert len(cell.find_elements(By.CSS_SELECTOR, "li")) == n_alphas
    find(By.ID, "all-alphas").click()
    # One heatmap (layer x alpha) per site.
    maps = driver.find_elements(By.CSS_SELECTOR, "#heatmaps svg.heatmap")
    assert len(maps) == 3
    for heat in maps:
        assert len(heat.find_elements(By.CSS_SELECTOR, "rect.hm-cell")) == n_layer_rows * n_alphas

    # Download the CSV.
    for old in downloads.glob("*"):
        old.unlink()
    find(By.ID, "download").click()
    files = wait_for(lambda: [p for p in downloads.glob("*.csv")], 30, "the CSV download")
    wait_for(lambda: not list(downloads.glob("*.crdownload")), 30, "the download to complete")
    frame = pd.read_csv(files[0])
    assert frame["control"].isna().sum() == total  # the grid's rows; the rest are controls
    assert {"source", "token", "site", "layer", "alpha", "output", "similarity"} <= set(frame.columns)

    # The screenshot: the last token's table, the whole page.
    find(By.CSS_SELECTOR, '#badges .badge[data-position="5"]').click()
    wait_for(lambda: "Wales" in find(By.ID, "detail-title").text, 10, "the Wales table")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 1400, "height": height, "deviceScaleFactor": 1, "mobile": False}
    )
    time.sleep(0.3)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    assert driver.save_screenshot(str(SCREENSHOT))


def test_permalink_history_compare_and_narrow_layout(server, driver):
    """After the end-to-end run: its URL restores it after a reload, a second run joins the
    history, the first is compared beside it, and the page fits 420 px and a wide screen."""
    from selenium.webdriver.common.by import By

    find = driver.find_element
    first = re.search(r"\?run=([0-9a-f]{12})$", driver.current_url)
    assert first, driver.current_url
    driver.get(driver.current_url)  # a reload
    wait_for(lambda: "— done" in find(By.ID, "progress-text").text, 60 if not REAL_MODEL else 300, "the kept run")
    assert find(By.ID, "prompt").get_attribute("value") == PROMPT
    assert find(By.CSS_SELECTOR, "#table tbody td ul.controls")
    # A second run from the same page: another prompt, the last token.
    prompt = find(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("Paris is the capital of France")
    find(By.CSS_SELECTOR, 'input[name="tokens"][value="last"]').click()
    find(By.ID, "run").click()
    wait_for(lambda: re.search(r"run=([0-9a-f]{12})", driver.current_url).group(1) != first.group(1), 30, "a new URL")
    wait_for(lambda: "— done" in find(By.ID, "progress-text").text, 120 if not REAL_MODEL else 1800, "the second run")
    entries = wait_for(
        lambda: (
            [e for e in driver.find_elements(By.CSS_SELECTOR, "#history-list li") if e.is_displayed()]
            if len(driver.find_elements(By.CSS_SELECTOR, "#history-list li")) >= 2
            else None
        ),
        30,
        "history",
    )
    older = next(e for e in entries if first.group(1) in e.find_element(By.CSS_SELECTOR, "a").get_attribute("href"))
    older.find_element(By.CSS_SELECTOR, "button").click()
    wait_for(lambda: find(By.ID, "compare").is_displayed(), 30, "the compared run")
    assert PROMPT in find(By.ID, "compare-title").text and f"compare={first.group(1)}" in driver.current_url
    assert find(By.ID, "detail").location["y"] == find(By.ID, "compare").location["y"]  # side by side at 1400 px
    for width in (420, 1800):
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": 1000, "deviceScaleFactor": 1, "mobile": False},
        )
        time.sleep(0.3)
        overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow} px wider than {width} px"
        if width == 420:
            assert find(By.ID, "compare").location["y"] > find(By.ID, "detail").location["y"]  # stacked
            driver.save_screenshot(str(SCREENSHOT.with_name("app-narrow.png")))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_cell_panels_sae_breakdown_latent_source_and_generated_inputs(server, driver):
    """A small grid at the SAE's layer; a click on its token and then on a cell opens the SAE
    breakdown of that cell's vector and its generated inputs; a latent's button runs it as the
    source; the URL restores both panels after a reload."""
    from selenium.webdriver.common.by import By

    find = driver.find_element
    sae = server.app.panels.config()["saes"][0]
    layer = sae["layer"]
    driver.get(server.url)
    wait_for(lambda: re.search(r"(\d+) layers", find(By.ID, "model-info").text), 300, "the model to load")
    for element_id, text in (("prompt", PROMPT), ("layers", str(layer)), ("alphas", "1,3")):
        box = find(By.ID, element_id)
        box.clear()
        box.send_keys(text)
    find(By.CSS_SELECTOR, 'input[name="tokens"][value="last"]').click()
    find(By.ID, "controls").click()  # off: this grid only gives the table a row at the SAE's layer
    find(By.ID, "run").click()
    wait_for(lambda: "— done" in find(By.ID, "progress-text").text, 120 if not REAL_MODEL else 1800, "the grid")
    find(By.CSS_SELECTOR, '#badges .badge[data-position="5"]').click()
    cell = wait_for(
        lambda: find(By.CSS_SELECTOR, f'#table td[data-site="resid_post"][data-layer="{layer}"]'), 10, "the cell"
    )
    cell.click()

    # The breakdown: the server's result, row by row, with each latent's promoted tokens.
    wait_for(
        lambda: find(By.ID, "cell").is_displayed() and driver.find_elements(By.CSS_SELECTOR, "#sae-table tbody tr"),
        120,
        "the SAE breakdown",
    )
    cell_id = re.search(r"cell=([0-9a-f]{12})", driver.current_url).group(1)
    result = server.app.jobs[cell_id].result
    rows = driver.find_elements(By.CSS_SELECTOR, "#sae-table tbody tr")
    assert [int(r.get_attribute("data-latent")) for r in rows] == [x["latent"] for x in result["sae"]["latents"]]
    assert "Wales" in find(By.ID, "cell-title").text and "layer" in find(By.ID, "cell-title").text
    assert len(rows[0].find_elements(By.CSS_SELECTOR, "td.tokens span")) == 5
    assert "unembedding" in find(By.ID, "sae-hint").text
    generated = driver.find_elements(By.CSS_SELECTOR, "#generated-list li")
    if result["generated"]["id"]:
        assert len(generated) == 5 and all(re.search(r"d \d\.\d\d$", g.text) for g in generated)
    else:  # no generator for this model: the panel gives the command that trains one
        assert not generated and "superscopes.inverse train" in find(By.ID, "generated-why").text

    # A latent as the source: its readouts, and the breakdown labels it with its self-explanation.
    rows[0].find_element(By.CSS_SELECTOR, "button").click()
    wait_for(
        lambda: len(driver.find_elements(By.CSS_SELECTOR, "#latent-table tbody tr")) == 4, 300, "the latent readouts"
    )
    assert len(driver.find_elements(By.CSS_SELECTOR, "#latent-table tbody tr.chosen")) == 1
    first = result["sae"]["latents"][0]["latent"]
    wait_for(
        lambda: "not run" not in find(By.CSS_SELECTOR, f'#sae-table tr[data-latent="{first}"]').text,
        30,
        "the breakdown's self-explanation",
    )
    assert f"Latent {first} of {sae['id']} as the source" == find(By.ID, "latent-title").text

    # The URL restores the grid, the cell and the latent.
    url = driver.current_url
    assert re.search(r"\?run=[0-9a-f]{12}&cell=[0-9a-f]{12}&latent=[0-9a-f]{12}$", url), url
    driver.get(url)
    wait_for(
        lambda: len(driver.find_elements(By.CSS_SELECTOR, "#latent-table tbody tr")) == 4, 60, "the restored panels"
    )
    assert len(driver.find_elements(By.CSS_SELECTOR, "#sae-table tbody tr")) == len(rows)
    assert find(By.CSS_SELECTOR, "#table td.cell-open").get_attribute("data-layer") == str(layer)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 1400, "height": height, "deviceScaleFactor": 1, "mobile": False}
    )
    time.sleep(0.3)
    assert driver.save_screenshot(str(SCREENSHOT.with_name("app-sae.png")))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_queue_and_cancel_across_two_pages(gated, driver):
    """Two pages (two clients) and one worker: the second page's run waits "queued (1 ahead)"
    behind the first's, which a click on Cancel marks cancelling at once (before the server has
    the cancel) and stops after its chunk in progress; the second then runs. The cancelled run
    stays cancelled after a reload of its permalink, and its page runs again."""
    from selenium.webdriver.common.by import By

    find = driver.find_element
    other = "Paris is the capital of France"
    cancelling = " — cancelling after the chunk in progress…"

    def progress():
        return find(By.ID, "progress-text").text

    def reads(line, after=""):  # the progress line is "<line> (<elapsed> s)<after>"
        return re.fullmatch(re.escape(line) + r" \([\d.]+ s\)" + re.escape(after), progress())

    def buttons():  # (Run usable, Cancel usable)
        return find(By.ID, "run").is_enabled(), find(By.ID, "cancel").is_enabled()

    def start(prompt, tokens):  # a grid of layers 0-1 x alphas 1,3 x 3 sites, without controls
        driver.get(gated.url)
        wait_for(lambda: re.search(r"\d+ layers", find(By.ID, "model-info").text), 60, "the model to load")
        for element_id, text in (("prompt", prompt), ("layers", "0-1"), ("alphas", "1,3"), ("max-new-tokens", "4")):
            box = find(By.ID, element_id)
            box.clear()
            box.send_keys(text)
        find(By.CSS_SELECTOR, f'input[name="tokens"][value="{tokens}"]').click()
        if find(By.ID, "controls").is_selected():
            find(By.ID, "controls").click()
        find(By.ID, "run").click()
        return wait_for(lambda: re.search(r"\?run=([0-9a-f]{12})$", driver.current_url), 30, "the run's URL").group(1)

    def polled(run_id, count=2):  # the page has had ``count`` more answers for ``run_id``
        seen = gated.polls[run_id]
        wait_for(lambda: gated.polls[run_id] >= seen + count + 1, 15, f"{count} polls of {run_id}")

    page_a = driver.current_window_handle
    try:
        # Page A: every token (6 chunks of 12 cells); its first chunk holds in the judge.
        run_a = start(PROMPT, "all")
        assert gated.judge.wait(PROMPT), "the first run's first chunk never reached the judge"
        wait_for(lambda: reads("0 / 72 cells — running"), 30, "the first run running")
        assert buttons() == (False, True)

        # Page B, another client: its run waits behind A's.
        driver.switch_to.new_window("window")
        page_b = driver.current_window_handle
        run_b = start(other, "last")
        wait_for(lambda: progress() == "queued (1 ahead)", 30, "the second run queued behind the first")
        assert buttons() == (False, True)

        # Cancel A: the page says so at once, with the server holding the cancel and its polls;
        # then a poll answered while the server has not the cancel ("running", not cancelling)
        # does not undo it.
        driver.switch_to.window(page_a)
        gated.answers.clear()
        gated.cancels.clear()
        find(By.ID, "cancel").click()
        wait_for(lambda: progress().endswith(cancelling) and buttons() == (False, False), 5, "the page's cancelling")
        gated.answers.set()
        polled(run_a)
        assert not gated.app.jobs[run_a].cancel.is_set()
        assert progress().endswith(cancelling) and buttons() == (False, False), progress()
        gated.cancels.set()
        wait_for(lambda: gated.app.jobs[run_a].cancel.is_set(), 15, "the server to take the cancel")
        polled(run_a)
        assert reads("0 / 72 cells — running", cancelling), progress()

        # B still waits: A's chunk in progress finishes first.
        driver.switch_to.window(page_b)
        polled(run_b)
        assert progress() == "queued (1 ahead)"
        assert not gated.judge.wait(other, 0), "the second run started before the first stopped"

        # A's chunk ends: A stops there, cancelled, and B runs (its first chunk holds in the judge).
        gated.judge.open(PROMPT)
        assert gated.judge.wait(other), "the second run never started"
        wait_for(lambda: reads("0 / 12 cells — running"), 30, "the second run running")
        gated.judge.open(other)
        wait_for(lambda: reads("12 / 12 cells — done"), 60, "the second run done")
        assert buttons() == (True, False)
        driver.close()
        driver.switch_to.window(page_a)
        wait_for(lambda: reads("12 / 72 cells — cancelled"), 30, "the first run cancelled")
        assert buttons() == (True, False)

        # The permalink keeps the cancel; Run works again from the restored form.
        assert driver.current_url == gated.url.rstrip("/") + f"/?run={run_a}", driver.current_url
        driver.get(driver.current_url)  # a reload
        wait_for(lambda: reads("12 / 72 cells — cancelled"), 30, "the kept cancelled run")
        form = {k: find(By.ID, k).get_attribute("value") for k in ("prompt", "layers", "alphas", "max-new-tokens")}
        assert form == {"prompt": PROMPT, "layers": "0-1", "alphas": "1,3", "max-new-tokens": "4"}, form  # not defaults
        assert not find(By.ID, "controls").is_selected()
        assert buttons() == (True, False)
        find(By.ID, "run").click()
        wait_for(
            lambda: re.search(r"\?run=([0-9a-f]{12})$", driver.current_url).group(1) not in (run_a, run_b),
            30,
            "the new run's URL",
        )
        wait_for(lambda: reads("72 / 72 cells — done"), 60, "the run again")
        assert buttons() == (True, False)
    finally:
        gated.judge.open_all()
        gated.cancels.set()
        gated.answers.set()
        for handle in driver.window_handles:
            if handle != page_a:
                driver.switch_to.window(handle)
                driver.close()
        driver.switch_to.window(page_a)
