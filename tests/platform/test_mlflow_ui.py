"""Integration: the MLflow UI, in a real headless Chromium, over a finished cascadelab training run.

A tiny real training run (local Ray, SQLite MLflow store) is tracked as users track theirs; a real
``mlflow server`` serves that store and playwright drives Debian's Chromium over the UI: the experiment's
runs table (the run, its dataset and model, a metric and a param column added through "Columns"), the
run's metric charts, its dataset (digest, profile, schema) and its logged model, and which view (GenAI or
"Model training") an experiment opens in. Each page is saved as a PNG under the test's tmp dir, and also
copied to ``$CASCADELAB_UI_SHOTS`` when that is set.

Skipped with the reason when playwright or a Chromium executable is missing (playwright cannot download
its own browser here: ``apt-get install chromium``; ``$CASCADELAB_CHROMIUM`` names another executable).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import mlflow
import pytest

from cascadelab.platform import tracking
from cascadelab.platform.config import load_config
from cascadelab.platform.tracking import EXPERIMENT_KIND_TAG, MODEL_NAME, MODEL_TRAINING
from tests.helpers import MlflowServer

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


def _chromium() -> str | None:
    named = os.environ.get("CASCADELAB_CHROMIUM")
    if named:
        return named if Path(named).exists() else None
    return next((p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None)


CHROMIUM = _chromium()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(480),
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium executable (apt-get install chromium, "
                                                "or set CASCADELAB_CHROMIUM)"),
]
EXPERIMENT = "ui"
UI_TIMEOUT_MS = 60_000  # the first page load fetches and compiles the whole UI bundle
EXPECT_TIMEOUT_MS = 20_000  # a page's data arrives in several requests after it renders


def _runs_listed(page):
    return page.get_by_text("1 matching run")


def _run_shown(page):
    return page.get_by_text("About this run")


def _charts_shown(page):
    return page.get_by_placeholder("Search metric charts")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_dataset, ray_session):
    """A FINISHED training run tracked in a SQLite store; the store's default artifact root (``./mlruns``,
    resolved against the working directory when the store is created) lands in the tmp dir."""
    from cascadelab.platform.train.run import run_training

    root = tmp_path_factory.mktemp("ui_run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = run_training(load_config(None, [
            f"data.path={tiny_dataset}", f"tracking.uri={uri}", f"tracking.experiment={EXPERIMENT}",
            f"train.storage_path={root / 'results'}", "data.batch_size=64"]))
    finally:
        os.chdir(cwd)
    run = mlflow.MlflowClient(uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    return {"root": root, "uri": uri, "run": run, "dataset": run.inputs.dataset_inputs[0].dataset}


def _serve(uri: str, root: Path):
    """A real ``mlflow server`` on the store at ``uri`` (as ``make ui`` starts it), on a free local port;
    yields its address."""
    with MlflowServer(root, store_uri=uri) as server:
        yield server.uri


@pytest.fixture(scope="module")
def ui_url(finished_run):
    """The UI over the finished training run's store."""
    yield from _serve(finished_run["uri"], finished_run["root"])


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """An experiment and a run as cascadelab's Tracker creates them (no training: the view an experiment
    opens in is the experiment's and the browser's, not the run's)."""
    root = tmp_path_factory.mktemp("ui_view")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run = tracking.Tracker.start(uri, EXPERIMENT, "view-run", {"objective.name": "dftopk"})
    run.log_dict({"eval/joint_recall_at_10_20": 0.8}, step=2)
    run.close()
    return {"root": root, "uri": uri, "run": run.client.get_run(run.run_id)}


@pytest.fixture(scope="module")
def view_url(tracked):
    """The UI over the :func:`tracked` store."""
    yield from _serve(tracked["uri"], tracked["root"])


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (the system's executable) under playwright; ``--no-sandbox`` for root in CI."""
    sync_api.expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    pw = sync_api.sync_playwright().start()
    try:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()
    finally:
        pw.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ui_shots")


@pytest.fixture
def page(browser):
    """A fresh page in its own context (no UI state saved by another test)."""
    context = browser.new_context(viewport={"width": 1800, "height": 1000})
    context.set_default_timeout(UI_TIMEOUT_MS)
    yield context.new_page()
    context.close()


@pytest.fixture
def shot(page, shots):
    """``shot(name)``: the page as ``shots/name.png`` (and under ``$CASCADELAB_UI_SHOTS`` when set)."""
    def save(name: str) -> Path:
        path = shots / f"{name}.png"
        page.screenshot(path=str(path))
        if copy_to := os.environ.get("CASCADELAB_UI_SHOTS"):
            Path(copy_to).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(copy_to) / path.name)
        return path

    return save


def _open(page, url: str, ready) -> None:
    """Go to ``url`` and wait until ``ready(page)`` (a locator) is visible; closes the assistant side panel."""
    page.goto(url)
    ready(page).first.wait_for()
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count():
        close.first.click()


def _eval_metric(run) -> str:
    """The run's final joint recall (named ``joint_recall`` or ``eval/joint_recall_at_...``)."""
    return next(k for k in sorted(run.data.metrics) if "joint_recall" in k and not k.startswith("stream"))


def _daily_metric(run, uri: str) -> str:
    """A per-day training series with more than one point (the training loss)."""
    client = mlflow.MlflowClient(uri)
    names = [k for k in sorted(run.data.metrics) if "loss" in k and not k.startswith("system/")]
    return next(k for k in names if len(client.get_metric_history(run.info.run_id, k)) > 1)


def _run_row(page, run_name: str):
    """The runs table's row of ``run_name``: the grid renders it as one ``row`` element per pinned/scrolled
    part (the name in the pinned part), which share an ``aria-rowindex``."""
    named = page.get_by_role("row").filter(has_text=run_name)
    sync_api.expect(named).to_have_count(1)
    return page.locator(f"[role=row][aria-rowindex='{named.get_attribute('aria-rowindex')}']")


def _row_cells(row) -> list[str]:
    """The row's cell texts, one per line, over all its parts."""
    return [line.strip() for part in row.all_inner_texts() for line in part.splitlines() if line.strip()]


def _add_columns(page, names: list[str]) -> None:
    """Tick ``names`` in the runs table's "Columns" selector, as a user adds metric/param columns."""
    page.get_by_role("button", name="Columns").click()
    search = page.get_by_placeholder("Search columns")
    for name in names:
        search.fill(name)
        node = page.locator("[class*='tree-treenode']").filter(has=page.get_by_text(name, exact=True))
        node.locator("[class*='tree-checkbox']").first.click()
    page.keyboard.press("Escape")


def test_runs_table_shows_the_run_its_dataset_and_metric_and_param_columns(page, shot, ui_url, finished_run):
    run, ds = finished_run["run"], finished_run["dataset"]
    metric = _eval_metric(run)
    _open(page, f"{ui_url}/#/experiments/{run.info.experiment_id}/runs", _runs_listed)
    row = _run_row(page, run.info.run_name)
    assert f"{ds.name} ({ds.digest})" in _row_cells(row)  # the Dataset column
    _add_columns(page, [metric, "objective.name"])
    headers = page.get_by_role("columnheader").all_inner_texts()
    assert metric in headers and "objective.name" in headers
    sync_api.expect(row.get_by_text("dftopk", exact=True)).to_be_visible()  # objective.name
    cells = _row_cells(row)
    assert any(_is_close(c, run.data.metrics[metric]) for c in cells), (metric, cells)
    shot("runs_table")


def _is_close(text: str, value: float) -> bool:
    try:
        return abs(float(text) - value) < 1e-6
    except ValueError:
        return False


def _chart_card(page, metric: str, run_name: str):
    """The one chart card left after filtering the run's charts by ``metric``: it plots the run's trace,
    which the chart's legend names ``run_name (metric)``."""
    _charts_shown(page).fill(metric)
    cards = page.get_by_test_id("experiment-view-compare-runs-card").filter(has_text=f"{run_name} ({metric})")
    sync_api.expect(cards).to_have_count(1)
    return cards.first


def test_run_page_charts_its_metrics(page, shot, ui_url, finished_run):
    run, uri = finished_run["run"], finished_run["uri"]
    base = f"{ui_url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    _open(page, f"{base}/model-metrics", _charts_shown)
    for name, metric in (("chart_daily", _daily_metric(run, uri)), ("chart_eval", _eval_metric(run))):
        card = _chart_card(page, metric, run.info.run_name)
        # the chart's title: the name after its section (the UI groups charts by the part before the "/")
        sync_api.expect(card.get_by_text(metric.rpartition("/")[2], exact=True)).to_be_visible()
        sync_api.expect(card).to_contain_text("Step")  # the x axis: the training day
        assert card.locator("svg, canvas").count() > 0
        shot(name)
    cpu = next(k for k in sorted(run.data.metrics) if k.startswith("system/cpu_utilization"))
    _open(page, f"{base}/system-metrics", _charts_shown)
    sync_api.expect(_chart_card(page, cpu, run.info.run_name)).to_contain_text("Time")  # sampled over time
    shot("chart_system_cpu")


def test_run_page_shows_the_dataset_with_its_profile_and_schema(page, shot, ui_url, finished_run):
    run, ds = finished_run["run"], finished_run["dataset"]
    _open(page, f"{ui_url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}", _run_shown)
    page.get_by_text(f"{ds.name} ({ds.digest})").first.click()
    details = page.get_by_role("dialog")
    sync_api.expect(details).to_contain_text(f"Digest: {ds.digest}")
    sync_api.expect(details).to_contain_text("rows: 576")  # 3 days x 192 requests
    sync_api.expect(details).to_contain_text(json.loads(ds.source)["uri"])  # the source path
    sync_api.expect(details.get_by_text("rank_pos_items", exact=True)).to_be_visible()  # the schema
    shot("dataset")


def test_the_logged_model_shows_in_the_runs_table_and_on_the_run_page(page, shot, ui_url, finished_run):
    run = finished_run["run"]
    exp = run.info.experiment_id
    _open(page, f"{ui_url}/#/experiments/{exp}/runs", _runs_listed)
    in_table = _appears(_run_row(page, run.info.run_name).get_by_text(MODEL_NAME, exact=True))  # Models column
    shot("models_column")
    _open(page, f"{ui_url}/#/experiments/{exp}/runs/{run.info.run_id}", _run_shown)
    on_run_page = _appears(page.get_by_text("Logged models (1)", exact=True))
    shot("run_overview")
    assert in_table and on_run_page, {"runs table": in_table, "run page": on_run_page}


def _appears(locator, timeout_ms: float = 10_000) -> bool:
    """Whether ``locator`` becomes visible within ``timeout_ms`` (the models arrive in their own request)."""
    try:
        locator.first.wait_for(state="visible", timeout=timeout_ms)
    except sync_api.TimeoutError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- the view


WORKFLOW_STORAGE = "mlflow.workflowType_v1"  # the UI's localStorage key of the sidebar's GenAI / Model training switch


def _view(page) -> str:
    """The view the page is in: the ``workflowType`` the UI writes into the page's address."""
    page.wait_for_url("**workflowType=*")
    return parse_qs(urlsplit(page.url.split("#", 1)[1]).query)["workflowType"][0]


def _stored_view(page) -> str | None:
    return page.evaluate(f"() => window.localStorage.getItem('{WORKFLOW_STORAGE}')")


def test_the_links_cascadelab_prints_open_the_model_training_view(page, shot, view_url, tracked):
    """In a browser that never chose a view: the experiment opens on its runs, the run on its page."""
    run = tracked["run"]
    exp = run.info.experiment_id
    _open(page, tracking.ui_url(view_url, exp), _runs_listed)
    assert _view(page) == "machine_learning" and "/runs?" in page.url
    sync_api.expect(page.get_by_text("Model registry", exact=True)).to_be_visible()  # the training sidebar
    assert _stored_view(page) is None  # nothing was chosen in this browser
    shot("view_experiment_link")
    _open(page, tracking.ui_url(view_url, exp, run.info.run_id), _run_shown)
    assert _view(page) == "machine_learning"
    sync_api.expect(page.get_by_text("Model registry", exact=True)).to_be_visible()


def test_the_browser_not_the_experiment_tag_picks_the_view(page, shot, view_url, tracked):
    """MLflow 3.17.2: the experiment is tagged as model training, yet a plain link opens the GenAI view
    until this browser's switch is set to "Model training" (kept in its localStorage)."""
    exp = tracked["run"].info.experiment_id
    assert mlflow.MlflowClient(tracked["uri"]).get_experiment(exp).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    plain = f"{view_url}/#/experiments/{exp}"
    page.goto(plain)
    assert _view(page) == "genai" and _stored_view(page) is None
    shot("view_plain_link_genai")
    got_it = page.get_by_text("Got it", exact=True)  # the GenAI overview's "Detect issues" tip
    if got_it.count():
        got_it.first.click()
    page.get_by_text("Model training", exact=True).first.click()  # the sidebar's switch
    _runs_listed(page).first.wait_for()
    assert _view(page) == "machine_learning" and json.loads(_stored_view(page)) == "machine_learning"
    again = page.context.new_page()  # the same browser profile: its choice holds for every plain link
    again.goto(plain)
    _runs_listed(again).first.wait_for()
    assert _view(again) == "machine_learning"
