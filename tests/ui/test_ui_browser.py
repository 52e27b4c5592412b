"""The page at / and /docs in a real browser (Debian's Chromium through Playwright), as a person uses them.

Every test records each request the browser makes and checks that none goes to a host but the service;
and that the page's console shows no error (a script or style the Content-Security-Policy blocked shows
there). The page's screenshot for the README (docs/ui.png) is taken here.
"""

from __future__ import annotations

import os

import contextlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import skimage
from serving_helpers import live_server

from effnet_serve.core.config import Settings

ROOT = Path(__file__).resolve().parents[2]
CAT = Path(skimage.__file__).parent / "data" / "chelsea.png"  # a real photo scikit-image ships
# Every run takes the screenshot (.cache/ui.png); EFFNET_UPDATE_SCREENSHOT=1 puts it in docs/ for the README, so
# an ordinary run leaves the tree as it was (the timings on the page differ from run to run).
SCREENSHOT = ROOT / ("docs" if os.environ.get("EFFNET_UPDATE_SCREENSHOT") == "1" else ".cache") / "ui.png"
TIMEOUT_MS = 60_000  # waits end when the page shows the thing; this only bounds a broken run


@contextlib.contextmanager
def visit(browser, srv) -> Iterator[tuple[object, list[str], list[str]]]:
    """A fresh browser context on the service: (page, every URL requested, console errors)."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    requested: list[str] = []
    errors: list[str] = []
    context.on("request", lambda r: requested.append(r.url))
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        yield page, requested, errors
        assert page.evaluate("localStorage.length + sessionStorage.length") == 0
        assert context.cookies() == []
    finally:
        context.close()
    service = urlsplit(srv.url).netloc
    elsewhere = [u for u in requested if urlsplit(u).scheme not in ("data", "blob") and urlsplit(u).netloc != service]
    assert requested and not elsewhere, elsewhere


def only_expected(errors: list[str], *allowed: str) -> list[str]:
    """Console errors other than the failed loads a test caused on purpose (Chromium logs each non-2xx fetch)."""
    return [e for e in errors if not any(a in e for a in allowed)]


@pytest.fixture(scope="module")
def served(ui_repo: Path):
    with live_server(Settings(repository=ui_repo, default_model="lite0")) as srv:
        yield srv


def test_a_photo_to_lite0_gets_the_label_classify_gives_and_the_chart_shows_every_model(browser, served):
    with httpx.Client(base_url=served.url, timeout=60) as c:
        loaded = [m["name"] for m in c.get("/models").json()["models"] if m["status"] == "ready"]
        # Enough answers that the service has a p50 for lite0 (it needs 5 recent images), which the chart shows.
        answers = [c.post("/classify", params={"model": "lite0"}, content=CAT.read_bytes(),
                          headers={"content-type": "image/png"}).json() for _ in range(5)]
    expected = answers[0]["results"][0]["predictions"][0]["label"]
    assert sorted(loaded) == ["lite0", "tiny"]
    with visit(browser, served) as (page, _, errors):
        page.goto(served.url + "/")
        page.wait_for_selector("#models tbody tr[data-model='tiny']")
        assert sorted(page.eval_on_selector_all("#chart g.point", "ps => ps.map(p => p.dataset.model)")) == loaded
        assert "random" in page.inner_text("#models tr[data-model='tiny']")
        assert "75.1% (published)" in page.inner_text("#models tr[data-model='lite0']")
        assert page.text_content("#chart g.point[data-model='lite0'] .pt-label").endswith(" ms")  # its live p50

        page.select_option("#model", "lite0")
        page.set_input_files("#files", str(CAT))
        page.click("#send")
        page.wait_for_selector(".result .top1")
        assert page.inner_text(".result .top1") == expected
        assert page.locator(".top5 li").count() == 5
        assert "Answered by lite0" in page.inner_text("#answer")
        assert "inference" in page.inner_text(".result .timing")
        assert page.locator("#answer .random").count() == 0  # real weights: no warning
        page.wait_for_selector("#chart g.point.answered")
        assert page.eval_on_selector_all("#chart g.point.answered", "ps => ps.map(p => p.dataset.model)") == ["lite0"]
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)

        page.select_option("#model", "tiny")  # random weights are said plainly
        page.click("#send")
        page.wait_for_selector("#answer .random")
        assert "random" in page.inner_text("#answer .random")
        page.wait_for_selector("#chart g.point.answered[data-model='tiny']")
    assert errors == []


def test_auto_says_which_model_answered(browser, served):
    with visit(browser, served) as (page, _, errors):
        page.goto(served.url + "/")
        page.wait_for_selector("#models tbody tr")
        page.select_option("#model", "auto")
        assert page.is_visible("#budget")
        page.fill("#budget", "5000")
        page.set_input_files("#files", [str(CAT), str(CAT)])
        page.click("#send")
        page.wait_for_selector(".result .top1")
        said = page.inner_text("#answer .who")
        assert said.startswith("auto chose ") and "5000 ms" in said
        chosen = said.removeprefix("auto chose ").split()[0]
        assert chosen in ("lite0", "tiny")
        assert page.locator(".result").count() == 2
    assert errors == []


def test_docs_lists_the_apis_operations_offline(browser, served):
    with httpx.Client(base_url=served.url, timeout=30) as c:
        spec = c.get("/openapi.json").json()
    operations = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    with visit(browser, served) as (page, _, errors):
        page.goto(served.url + "/docs")
        page.wait_for_selector(".opblock")
        page.wait_for_function(f"document.querySelectorAll('.opblock').length >= {len(operations)}")
        shown = {(m, p) for m, p in page.eval_on_selector_all(
            ".opblock", "bs => bs.map(b => [b.querySelector('.opblock-summary-method').textContent.trim(), "
                        "b.querySelector('.opblock-summary-path').dataset.path])")}
    assert shown == operations
    assert errors == []


def test_with_a_key_the_page_explains_the_401_then_answers(browser, tiny_repo: Path, tmp_path: Path):
    settings = Settings(repository=tiny_repo, models=["tiny"], default_model="tiny", api_key="s3cret",
                        max_body_mb=0.05)
    small = tmp_path / "small.png"
    big = tmp_path / "big.png"
    from PIL import Image

    with Image.open(CAT) as im:
        im.resize((64, 48)).save(small)
    big.write_bytes(CAT.read_bytes())
    assert big.stat().st_size > 0.05 * 1024 * 1024
    text = tmp_path / "notes.txt"
    text.write_text("not a photo\n")
    with live_server(settings) as srv, visit(browser, srv) as (page, requested, errors):
        page.goto(srv.url + "/")
        page.wait_for_selector("#key-form:not([hidden])")
        assert "401" in page.inner_text("#message") and "API key" in page.inner_text("#message")
        page.fill("#key", "wrong")
        page.click("#key-form button")
        page.wait_for_selector("#key-note:has-text('refused')")
        page.fill("#key", "s3cret")
        page.click("#key-form button")
        page.wait_for_selector("#models tbody tr[data-model='tiny']")
        assert page.is_hidden("#key-form")

        page.set_input_files("#files", str(small))
        page.click("#send")
        page.wait_for_selector(".result .top1")
        assert "random" in page.inner_text("#answer .random")

        page.set_input_files("#files", str(big))  # over EFFNET_MAX_BODY_MB
        page.click("#send")
        page.wait_for_selector("#message:has-text('413')")
        assert "Too large" in page.inner_text("#message")

        page.set_input_files("#files", str(text))  # text/plain
        page.click("#send")
        page.wait_for_selector("#message:has-text('415')")
        assert "Not an image type" in page.inner_text("#message")

        # A 503 cannot be had from a healthy test server on demand: this one answer comes from the browser's
        # route, shaped as the service's own (tests/serving cover the service sending it).
        page.route("**/classify?*", lambda route: route.fulfill(
            status=503, headers={"Retry-After": "7", "content-type": "application/json"},
            body='{"error": {"code": "overloaded", "message": "queue full for tiny"}}'))
        page.set_input_files("#files", str(small))
        page.click("#send")
        page.wait_for_selector("#message:has-text('503')")
        assert "Try again in 7 s" in page.inner_text("#message") and "queue full" in page.inner_text("#message")
    assert all("s3cret" not in u for u in requested)  # the key went in a header, never in a URL
    assert only_expected(errors, "401", "413", "415", "503") == []
