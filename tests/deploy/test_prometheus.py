"""The shipped dashboards against a real Prometheus scraping a real server.

Two tiny models are built by the real build step and served by `effnet serve`; a real
Prometheus (Debian's `prometheus` package; `apt-get install prometheus`) scrapes it every
second. After real traffic (successes, a rejected upload, an unknown model), every `expr`
of every dashboard JSON in deploy/grafana/dashboards, with Grafana's variables filled in,
is run through Prometheus's HTTP API and must return data.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import http.client
import urllib.error
import urllib.parse
from pathlib import Path

import pytest
from prerequisites import missing

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
MODELS = ("tiny", "tiny2")
SCRAPE_S = 1

PROMETHEUS_INSTALL = "make system-deps (Debian's prometheus package, which also has promtool)"
PROMETHEUS = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None)
PROMTOOL = shutil.which("promtool") or ("/usr/bin/promtool" if os.path.exists("/usr/bin/promtool") else None)


@pytest.fixture(scope="module", autouse=True)
def _needs_prometheus():
    """Before any other fixture of the module starts a server."""
    if PROMETHEUS is None:
        missing("the Prometheus server binary", PROMETHEUS_INSTALL)


# Grafana's built-in variables, as Grafana would fill them in for a short time range on a
# Prometheus scraped every second ($__rate_interval is at least four scrape intervals).
GRAFANA_VARIABLES = {
    "$__rate_interval": "20s",
    "${__rate_interval}": "20s",
    "$__interval": "2s",
    "${__interval}": "2s",
    "$__range": "5m",
    "${__range}": "5m",
}


# --------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The same proxy-free urllib client the Docker test's probes use (deploy/ci/probe.py).
sys.path.insert(0, str(ROOT / "deploy" / "ci"))
from probe import http as _http  # noqa: E402


def _announce_oversized_body(url: str, length: int) -> int:
    """Send only the headers of an oversized upload and read the answer. The server refuses on
    Content-Length and closes the connection; a client still writing the body would get a broken
    pipe instead of the status, depending on timing."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.putrequest("POST", f"{parts.path}?{parts.query}")
        conn.putheader("Content-Type", "image/jpeg")
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}\n{log.read_text()[-3000:] if log else ''}")
        try:
            if predicate():
                return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{log.read_text()[-3000:] if log else ''}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _jpeg(size=(160, 120), color=(200, 40, 40)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _exprs(panels):
    """Every (panel title, expr) in a dashboard's panels, collapsed rows included."""
    for panel in panels:
        yield from _exprs(panel.get("panels", []))
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield panel.get("title", "?"), target["expr"]


def substitute(expr: str, model_regex: str) -> str:
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    expr = re.sub(r"\$\{model(?::\w+)?\}|\$model\b", model_regex, expr)
    leftover = re.findall(r"\$\{?\w+", expr)
    assert not leftover, f"unsubstituted Grafana variable(s) {leftover} in {expr!r}"
    return expr


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_repo(tiny_repo, tmp_path_factory) -> Path:
    """The session's tiny models, with reference and measured accuracy written into their
    manifests as `effnet eval` and a published table would, so that the accuracy series
    (absent for models without accuracy numbers) exist."""
    repo = tmp_path_factory.mktemp("deploy-repo")
    for i, name in enumerate(MODELS):
        shutil.copytree(tiny_repo / name, repo / name)
        path = repo / name / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["accuracy"] = {
            "reference": {"top1": 40.0 + i, "top5": 65.0 + i, "dataset": "ImageNet-1k val", "source": "test"},
            "measured": {"top1": 39.5 + i, "top5": 64.5 + i, "top1_ci95": [38.0 + i, 41.0 + i],
                         "top5_ci95": [63.0 + i, 66.0 + i], "dataset": "test images", "size": 100,
                         "date": "2026-01-01"},
        }
        path.write_text(json.dumps(manifest, indent=2))
    return repo


@pytest.fixture(scope="module")
def app_server(model_repo, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("app") / "serve.log"
    env = dict(os.environ, EFFNET_REPOSITORY=str(model_repo), EFFNET_MODELS=",".join(MODELS),
               EFFNET_DEFAULT_MODEL=MODELS[0], EFFNET_DEVICE="cpu", EFFNET_THREADS="1",
               EFFNET_MAX_DELAY_MS="20", EFFNET_MAX_BODY_MB="1")
    env.pop("EFFNET_API_KEY", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "effnet_serve", "serve", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _http("GET", base + "/health/ready")[0] == 200, 180, "the app to be ready", proc, log)
        yield base
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def prometheus(app_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prometheus")
    target = app_server.removeprefix("http://")
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n"
        f"  scrape_interval: {SCRAPE_S}s\n"
        f"  scrape_timeout: {SCRAPE_S}s\n"
        "scrape_configs:\n"
        "  - job_name: effnet\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    port = _free_port()
    log = tmp / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
            cwd=tmp, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _http("GET", base + "/-/ready")[0] == 200, 60, "Prometheus to be ready", proc, log)
        yield base, proc, log
    finally:
        _stop(proc)


def query(prom: str, expr: str) -> list:
    status, body = _http("GET", f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    data = json.loads(body)
    assert status == 200 and data.get("status") == "success", f"query {expr!r} failed: {status} {body[:500]!r}"
    return data["data"]["result"]


@pytest.fixture(scope="module")
def scraped(app_server, prometheus):
    """Real traffic while Prometheus scrapes, then enough scrapes for rate() windows."""
    prom, proc, log = prometheus
    _wait(lambda: query(prom, 'up{job="effnet"} == 1'), 30, "the first successful scrape", proc, log)

    image = _jpeg()
    codes: list[int] = []

    def classify(model: str) -> int:
        return _http("POST", f"{app_server}/classify?model={model}&top_k=3", image,
                     {"Content-Type": "image/jpeg"})[0]

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        # Several rounds spread over a few scrapes, concurrent so that batches form.
        for _ in range(6):
            codes += pool.map(classify, [m for m in MODELS for _ in range(8)])
            time.sleep(0.5)
    assert set(codes) == {200}, codes

    # Rejections, all refused by the server with a reason label:
    assert _http("POST", f"{app_server}/classify?model=tiny", b"this is not an image",
                 {"Content-Type": "image/jpeg"})[0] == 400
    assert _http("POST", f"{app_server}/classify?model=tiny2", b"hello", {"Content-Type": "text/plain"})[0] == 415
    assert _announce_oversized_body(f"{app_server}/classify?model=tiny", 2 << 20) == 413
    # An unknown model: answered 404, and must not mint a metric series.
    status, body = _http("POST", f"{app_server}/classify?model=no-such-model-xyz", image, {"Content-Type": "image/jpeg"})
    assert status == 404, body

    # Wait for scrapes to cover everything sent, and at least 4 scrapes of it.
    time.sleep(max(0.0, 5 * SCRAPE_S - (time.monotonic() - started)))
    _wait(lambda: query(prom, 'sum(effnet_requests_rejected_total{reason="payload_too_large"}) > 0'), 30,
          "Prometheus to see the rejections", proc, log)
    time.sleep(2 * SCRAPE_S)
    return prom


# --------------------------------------------------------------------------- tests
def test_shipped_prometheus_config_is_valid():
    if PROMTOOL is None:
        missing("promtool", PROMETHEUS_INSTALL)
    result = subprocess.run([PROMTOOL, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_dashboards_exist():
    names = {p.stem for p in DASHBOARDS}
    assert {"effnet-latency", "effnet-accuracy-flops"} <= names, names


def test_every_dashboard_expr_returns_data(scraped):
    prom = scraped
    model_regex = "|".join(MODELS)
    checked, empty = [], []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        exprs = list(_exprs(dashboard.get("panels", [])))
        assert exprs, f"{path.name} has no queries"
        for where, expr in exprs:
            concrete = substitute(expr, model_regex)
            result = query(prom, concrete)
            checked.append(concrete)
            if not result:
                empty.append(f"{path.name} / {where}: {concrete}")
    assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)
    assert len(checked) >= 20, checked


def test_dashboard_queries_cover_every_model(scraped):
    """Per-model panels show both loaded models, not just one."""
    prom = scraped
    for expr in (
        'histogram_quantile(0.95, sum by (le, model) (rate(effnet_request_duration_seconds_bucket{status="200"}[20s])))',
        "max by (model) (effnet_model_macs) / 1e9",
        'max by (model) (effnet_model_accuracy{metric="top1", source="measured"})',
    ):
        models = {r["metric"].get("model") for r in query(prom, expr)}
        assert models == set(MODELS), (expr, models)


def test_template_variable_values(scraped):
    """The dashboards' `model` variable is label_values(effnet_model_info, model)."""
    for path in DASHBOARDS:
        for var in json.loads(path.read_text()).get("templating", {}).get("list", []):
            definition = var.get("definition") or ""
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", definition)
            if not m:
                continue
            metric, label = m.groups()
            status, body = _http("GET", f"{scraped}/api/v1/label/{label}/values?"
                                 + urllib.parse.urlencode({"match[]": metric}))
            assert status == 200, body
            assert set(json.loads(body)["data"]) == set(MODELS), (path.name, var["name"])


def test_batching_and_stages_visible(scraped):
    stages = {r["metric"]["stage"] for r in query(scraped, "sum by (stage) (effnet_stage_duration_seconds_count)")}
    assert stages == {"decode", "preprocess", "queue", "inference"}, stages
    reasons = {r["metric"]["reason"] for r in query(scraped, "sum by (reason) (effnet_requests_rejected_total)")}
    assert {"invalid_image", "unsupported_media_type", "payload_too_large"} <= reasons, reasons


def test_unknown_model_creates_no_series(app_server, scraped):
    # In Prometheus: every effnet_ series carries only loaded model names.
    models = {r["metric"].get("model") for r in query(scraped, 'count by (model) ({__name__=~"effnet_.+"})')}
    assert models == set(MODELS), models
    # And straight from the exposition text.
    status, text = _http("GET", f"{app_server}/metrics")
    assert status == 200
    assert b"no-such-model-xyz" not in text
    labelled = set(re.findall(rb'model="([^"]*)"', text))
    assert labelled == {m.encode() for m in MODELS}, labelled
