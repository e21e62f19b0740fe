"""report.html driven in a real headless Chromium, as a researcher uses it.

The report comes from the whole pipeline at demo size: a tiny GPT-2 (random weights, char
tokenizer) harvested into a store, a Matryoshka BatchTopK and a plain BatchTopK trained on
it, evaluated with downstream metrics. Chromium is Debian's (`apt-get install chromium`,
which .ci/run does); without it this test fails rather than skips.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from kukla.pipeline.evaluate import AbsorptionConfig, DownstreamConfig, EvaluateConfig, evaluate
from kukla.pipeline.models import load_model
from kukla.pipeline.train import train
from kukla.pipeline.train.config import TrainConfig
from tests.evaluate.helpers import D, make_dictionary
from tests.harvest.conftest import harvest_tiny_text

HOOK = "blocks.1.hook_resid_post"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]


def build_demo_report(root: Path) -> Path:
    """Harvest, train two dictionaries (Matryoshka and plain) and evaluate: the report directory."""
    store, _, model_dir = harvest_tiny_text(root, [HOOK], n_docs=400, context_size=32, tokens=3000, holdout_rows=800)
    dictionaries = []
    for arch in ("matryoshka-batchtopk", "batchtopk"):
        dictionaries += train(TrainConfig(store=store, out=root / arch, hook=HOOK, arch=arch, width=[64], k=[4],
                                          tokens=8192, batch_size=256, log_every=2, device="cpu",
                                          init_tokens=512, calibration_tokens=512))
    return evaluate(EvaluateConfig(dictionaries=dictionaries, store=store, out=root / "report",
                                   downstream=DownstreamConfig(contexts=8, batch_size=4),
                                   absorption=AbsorptionConfig(enabled=False)), model=load_model(str(model_dir)))


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return build_demo_report(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is needed for the report test: apt-get install -y chromium"
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("profile")), executable_path=executable,
                                                       headless=True, args=CHROMIUM_FLAGS,
                                                       viewport={"width": 1400, "height": 1000})
        yield context
        context.close()


@pytest.mark.slow
def test_a_researcher_finds_a_latent_sees_its_contexts_switches_dictionary_and_sees_the_frontier(
        demo_report: Path, browser) -> None:
    metrics = json.loads((demo_report / "metrics.json").read_text())
    names = list(metrics["dictionaries"])
    url = (demo_report / "report.html").resolve().as_uri()
    page = browser.new_page()
    requests, errors = [], []
    page.route("**/*", lambda route: (requests.append(route.request.url),
                                      route.continue_() if route.request.url == url else route.abort()))
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")
    assert page.inner_text("#count") == f"64 of 64 latents of {names[0]}"
    # 800 held out: the first 400 calibrate, the other 400 are scored
    assert any("dead latents counted on only 400 eval tokens" in w for w in metrics["dictionaries"][names[0]]["warnings"])
    assert page.locator("tr.warnings .warn").count() >= 2  # shown in the metrics table, beside the numbers

    # Search a latent by number and open it: its contexts, the max token marked.
    page.fill("#search", "5")
    assert page.locator("#latents tr.row").count() == 1
    page.click("#latents tr.row")
    page.wait_for_selector("#contexts .tok.max")
    assert page.inner_text("#latent-title") == f"{names[0]} · latent 5"
    table = pq.read_table(demo_report / f"latents_{names[0]}.parquet").to_pydict()
    contexts = page.locator("#contexts .context")
    assert contexts.count() == len(table["top_rows"][5]) > 0
    first = contexts.nth(0)
    shown_max = float(first.locator(".ctxval").inner_text())
    assert shown_max == pytest.approx(table["max_activation"][5], rel=2e-3)
    marked = first.locator(".tok.max")
    assert marked.count() == 1 and float(marked.get_attribute("title")) == pytest.approx(shown_max, rel=1e-3)
    text = first.inner_text()
    assert any(c.isalpha() for c in text) and "[" not in text, "contexts are text, not token ids"
    assert "logit lens" in page.inner_text("#detail") and "Nearest latents" in page.inner_text("#detail")
    assert page.locator("svg.hist rect").count() > 0

    # Search by token text, then switch dictionary: the list and the tree follow.
    page.fill("#search", "e")
    assert 0 < page.locator("#latents tr.row").count() <= 50
    page.select_option("#dict", "1")
    assert page.inner_text("#count").endswith(names[1])
    page.fill("#search", "")
    page.click("#latents tr.row >> nth=3")
    page.wait_for_selector("#contexts .context")
    assert page.inner_text("#latent-title") == f"{names[1]} · latent 3"
    assert "has one level" in page.inner_text("#treeview")
    page.select_option("#dict", "0")
    assert page.locator("#treeview ul.tree li").count() > 0

    # The frontier plots are there and rendered.
    frontier = page.locator("img[alt^='Frontier L0 → explained variance']")
    frontier.scroll_into_view_if_needed()
    assert frontier.evaluate("img => img.complete && img.naturalWidth > 100")
    assert page.locator("img[alt^='Frontier L0 → CE loss recovered']").count() == 1
    assert page.locator("img[alt^='Training: ']").count() == 2
    assert errors == []
    assert requests == [url], "report.html requested something besides itself"


@pytest.mark.slow
def test_contexts_are_text_without_a_model(demo_report: Path, tmp_path: Path) -> None:
    """--no-downstream loads no model, yet the contexts decode through the store's tokenizer alone."""
    metrics = json.loads((demo_report / "metrics.json").read_text())
    dictionaries = [Path(m["path"]) for m in metrics["dictionaries"].values()]
    out = evaluate(EvaluateConfig(dictionaries=dictionaries, store=Path(metrics["store"]["path"]), out=tmp_path / "r",
                                  downstream=DownstreamConfig(enabled=False), absorption=AbsorptionConfig(enabled=False)))
    name = next(iter(metrics["dictionaries"]))
    contexts = [c for latent in pq.read_table(out / f"latents_{name}.parquet").to_pydict()["top_contexts"] for c in latent]
    assert contexts and all("«" in c for c in contexts)
    assert not any(c.split("«")[0].replace(" ", "").isdigit() for c in contexts), "contexts came out as token ids"
    notes = json.loads((out / "metrics.json").read_text())["notes"]
    assert any("no logit lens (no model loaded" in n for n in notes)
    assert not any("no tokenizer" in n for n in notes)


@pytest.mark.slow
def test_matching_is_the_mean_max_correlation_on_the_scored_rows(demo_report: Path) -> None:
    """Cross-dictionary matching reads the scored rows, not the calibration split that tuned the thresholds."""
    from kukla.pipeline.dictionary import evaluation_rows, load_dictionary
    from kukla.pipeline.evaluate.browser import MATCH_ROWS
    from kukla.pipeline.evaluate.latents import max_correlation, mean_max_correlation
    from kukla.storage import open_store

    metrics = json.loads((demo_report / "metrics.json").read_text())
    store = open_store(metrics["store"]["path"])
    scored = evaluation_rows(store)
    assert metrics["store"]["eval_rows"] == [scored.start, scored.stop] and scored.start > store.n_rows - store.holdout_rows
    rows = scored[:MATCH_ROWS]
    x = store.read(HOOK, rows.start, rows.stop)
    (a, meta_a), (b, meta_b) = metrics["dictionaries"].items()
    with torch.no_grad():
        codes = [load_dictionary(m["path"]).eval().encode(x) for m in (meta_a, meta_b)]
    best, _ = max_correlation(codes[0], codes[1])
    assert meta_a["matching"][b]["rows"] == len(rows)
    assert meta_a["matching"][b]["mean_max_correlation"] == pytest.approx(mean_max_correlation(best), abs=1e-9)


def _small_report(names: list[str], store: Path, root: Path) -> Path:
    """A report of random 16-latent ReLU SAEs with these folder names, without downstream metrics."""
    g = torch.Generator().manual_seed(0)
    paths = [make_dictionary(root / name, torch.randn(D, 16, generator=g), torch.randn(16, D, generator=g))
             for name in names]
    return evaluate(EvaluateConfig(dictionaries=paths, store=store, out=root / "report",
                                   downstream=DownstreamConfig(enabled=False), absorption=AbsorptionConfig(enabled=False)))


@pytest.mark.slow
def test_a_link_to_a_latent_the_dictionary_lacks_opens_the_report_without_errors(rows_store: Path, tmp_path: Path,
                                                                                browser) -> None:
    """A #latent= link made for a wider dictionary (another report, an edited URL) opens nothing, quietly."""
    from playwright.sync_api import expect

    url = (_small_report(["only"], rows_store, tmp_path) / "report.html").resolve().as_uri()
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    for link in ("#latent=0:16", "#latent=0:999", "#latent=1:0"):
        page.goto(url + link)
        page.wait_for_selector("body[data-ready='1']", timeout=10_000)
        assert page.inner_text("#detail") == "Open a latent from the list."
        assert page.locator("#latents tr.row").count() == 16
    page.goto(url + "#latent=0:15")
    expect(page.locator("#latent-title")).to_have_text("only · latent 15")
    assert errors == []


@pytest.mark.slow
@pytest.mark.parametrize("odd", ["my \"sae\" <v2> & 'x'", "<!--<script>", "a|b"])
def test_a_dictionary_named_with_html_characters_opens_in_the_browser(odd: str, rows_store: Path, tmp_path: Path,
                                                                      browser) -> None:
    """Names are folder names, and token text comes from any vocabulary: neither may break the page."""
    out = _small_report(["plain", odd], rows_store, tmp_path)
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto((out / "report.html").resolve().as_uri() + "#latent=1:3")
    page.wait_for_selector("body[data-ready='1']", timeout=10_000)
    assert page.inner_text("#latent-title") == f"{odd} · latent 3"
    assert page.inner_text("#count") == f"16 of 16 latents of {odd}"
    assert page.locator("#dict option").all_inner_texts() == ["plain", odd]
    assert errors == []
    header = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| metric |"))
    assert len(header.replace("\\|", "").split("|")) == 5 and "<" not in header  # | metric | plain | odd |
