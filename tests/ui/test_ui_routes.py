"""The page's routes over HTTP, no browser: on and off (EFFNET_UI), public under a key, the CSP, and the
latency /models now reports (the p50 the page's chart shows)."""

from __future__ import annotations

from pathlib import Path

import httpx
from serving_helpers import encode, live_server, photo

from effnet_serve.core.config import Settings

JPEG = {"content-type": "image/jpeg"}
PAGES = ["/", "/ui/ui.js", "/ui/ui.css", "/ui/favicon.svg", "/docs", "/docs/docs.js", "/docs/docs.css",
         "/docs/favicon.svg", "/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css"]


def test_page_and_docs_are_served_from_the_package_with_a_self_only_csp(tiny_repo: Path):
    with live_server(Settings(repository=tiny_repo, models=["tiny"], default_model="tiny")) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            answers = {path: c.get(path) for path in PAGES}
            unknown = c.get("/ui/app.py")
            outside = c.get("/docs/..%2Fui.py")
    for path, r in answers.items():
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp, csp
        assert "http" not in csp  # no other host is allowed anything
    assert answers["/"].headers["content-type"].startswith("text/html")
    assert answers["/docs/swagger-ui-bundle.js"].headers["content-type"].startswith("text/javascript")
    assert len(answers["/docs/swagger-ui-bundle.js"].content) > 500_000  # the real bundle, not a stand-in
    for html in ("/", "/docs"):
        text = answers[html].text
        assert "http://" not in text and "https://" not in text and "<style" not in text, html
        assert "<script>" not in text and "style=" not in text, html  # nothing inline: the CSP would block it
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    assert outside.status_code == 404


def test_effnet_ui_off_removes_the_page_and_keeps_docs(tiny_repo: Path):
    with live_server(Settings(repository=tiny_repo, models=["tiny"], default_model="tiny", ui=False)) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            page, asset, docs, bundle = (c.get(p) for p in ("/", "/ui/ui.js", "/docs", "/docs/swagger-ui-bundle.js"))
    assert page.status_code == 404 and page.json()["error"]["code"] == "not_found"
    assert asset.status_code == 404
    assert docs.status_code == 200 and bundle.status_code == 200


def test_with_a_key_the_pages_are_public_and_the_api_is_not(tiny_repo: Path):
    settings = Settings(repository=tiny_repo, models=["tiny"], default_model="tiny", api_key="s3cret")
    with live_server(settings) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            public = {path: c.get(path).status_code for path in PAGES}
            guarded = {path: c.get(path).status_code for path in ("/models", "/openapi.json", "/nowhere")}
            with_key = c.get("/openapi.json", headers={"x-api-key": "s3cret"}).status_code
    assert set(public.values()) == {200}, public
    assert set(guarded.values()) == {401}, guarded  # "/" is exempt as itself only, not as a prefix
    assert with_key == 200


def test_models_reports_each_models_recent_p50(tiny_repo: Path):
    with live_server(Settings(repository=tiny_repo, models=["tiny"], default_model="tiny")) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            before = c.get("/models").json()["models"][0]["latency"]
            for seed in range(6):
                assert c.post("/classify", content=encode(photo(seed=seed)), headers=JPEG).status_code == 200
            after = c.get("/models").json()["models"][0]["latency"]
            one = c.get("/models/tiny").json()["latency"]
    assert before == {"p50_ms": None, "p95_ms": None, "samples": 0}
    assert after["samples"] == 6 and 0 < after["p50_ms"] <= after["p95_ms"]
    assert one["samples"] == 6
