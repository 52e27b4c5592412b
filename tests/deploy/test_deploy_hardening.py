"""Deploy hardening (issue 21, finding 12): what a hostile client, or a compromised process, can make a container
of the stack hold, and who may reach it.

- compose: every service has memory, CPU and process limits, a read-only root filesystem with bounded tmpfs,
  every capability dropped and no-new-privileges; Grafana has no default password and no anonymous editing;
  /dev/shm holds what the server's defaults ask of it; the TLS override mounts the PEM files the server reads.
- the image's HEALTHCHECK still answers when the server speaks TLS.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from deploy_helpers import ENV_EXAMPLE, ROOT, TEST_PASSWORD, clean_env, config, one, render, run_config
from prerequisites import require_tool

BASE = ["docker-compose.yml"]
TLS = ["docker-compose.yml", "docker-compose.tls.yml"]
COMPOSE_SETS = [
    BASE,
    ["docker-compose.yml", "docker-compose.gpu.yml"],
    ["docker-compose.yml", "docker-compose.ci.yml"],
    TLS,
]


def _tls_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not read by `compose config`\n")
    key.write_text("not read by `compose config`\n")
    return clean_env(GRAFANA_ADMIN_PASSWORD=TEST_PASSWORD, EFFNET_TLS_CERT_FILE=str(cert),
                     EFFNET_TLS_KEY_FILE=str(key), **extra)


def _bytes(value) -> int:
    """Compose normalises sizes to a byte count (a string or a number)."""
    return int(value)


# --------------------------------------------------------------------------- compose
@pytest.mark.parametrize("files", COMPOSE_SETS, ids=lambda f: "+".join(Path(x).stem for x in f))
def test_every_compose_service_is_bounded_and_locked_down(files, tmp_path):
    services = config(files, _tls_env(tmp_path))["services"]
    for name, service in services.items():
        limits = (service.get("deploy") or {}).get("resources", {}).get("limits") or {}
        assert _bytes(limits.get("memory", 0)) > 0, f"{name}: no memory limit"
        assert float(limits.get("cpus", 0)) > 0, f"{name}: no CPU limit"
        assert int(limits.get("pids", 0)) > 0, f"{name}: no pids limit"
        assert service.get("read_only") is True, f"{name}: writable root filesystem"
        assert service.get("cap_drop") == ["ALL"], f"{name}: capabilities not all dropped"
        assert "no-new-privileges:true" in service.get("security_opt", []), f"{name}: no-new-privileges"
        # A tmpfs is memory: each one has a size.
        for mount in service.get("tmpfs", []):
            assert re.search(r":.*size=\d+[kmg]?", mount), f"{name}: unbounded tmpfs {mount}"
        # Every writable place is a named volume or a bounded tmpfs; bind mounts are read-only.
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert volume.get("read_only") is True, f"{name}: writable bind mount {volume['target']}"


def test_the_limits_size_the_server_and_shm_holds_its_default_workers():
    from effnet_serve.core.config import Settings

    app = config(BASE)["services"]["app"]
    limits = app["deploy"]["resources"]["limits"]
    # EFFNET_WORKERS defaults to the CPU quota (app/core/limits.py), each wanting EFFNET_SHM_MB of /dev/shm.
    workers = math.ceil(float(limits["cpus"]))
    shm_mb = Settings.model_fields["shm_mb"].default
    assert _bytes(app["shm_size"]) >= workers * shm_mb * 2**20
    # The in-flight budget defaults to a quarter of this; what is left must hold the models and /dev/shm.
    assert _bytes(limits["memory"]) >= 4 * 256 * 2**20 + _bytes(app["shm_size"])


def test_grafana_has_no_default_password_and_anonymous_users_only_view():
    refused = run_config(BASE, clean_env())
    assert refused.returncode != 0 and not refused.stdout.strip()
    assert "GRAFANA_ADMIN_PASSWORD" in refused.stderr
    env = config(BASE)["services"]["grafana"]["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == TEST_PASSWORD
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert env.get("GF_USERS_ALLOW_SIGN_UP") == "false"
    # The example file sets no password either (copying it must not bring one).
    assert not re.search(r"^GRAFANA_ADMIN_PASSWORD=", ENV_EXAMPLE.read_text(), re.M)
    # Anonymous access on, still only as a viewer.
    env = config(BASE, clean_env(GRAFANA_ADMIN_PASSWORD=TEST_PASSWORD, GRAFANA_ANONYMOUS="true"))
    assert env["services"]["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_grpc_gets_its_own_host_interface():
    def host_ips(**extra):
        ports = config(BASE, clean_env(GRAFANA_ADMIN_PASSWORD=TEST_PASSWORD, **extra))["services"]["app"]["ports"]
        return {p["target"]: p["host_ip"] for p in ports}

    assert host_ips() == {8000: "127.0.0.1", 8001: "127.0.0.1"}
    assert host_ips(EFFNET_BIND="0.0.0.0") == {8000: "0.0.0.0", 8001: "0.0.0.0"}
    assert host_ips(EFFNET_BIND="0.0.0.0", EFFNET_GRPC_BIND="127.0.0.1") == {8000: "0.0.0.0", 8001: "127.0.0.1"}


def test_the_tls_override_hands_the_server_its_pem_files_and_prometheus_scrapes_https(tmp_path):
    refused = run_config(TLS, clean_env(GRAFANA_ADMIN_PASSWORD=TEST_PASSWORD))
    assert refused.returncode != 0 and re.search(r"EFFNET_TLS_(CERT|KEY)_FILE", refused.stderr)
    env = _tls_env(tmp_path)
    cfg = config(TLS, env)
    app, prometheus = cfg["services"]["app"], cfg["services"]["prometheus"]
    mounted = {s["source"]: s["target"] for s in app["secrets"]}
    assert cfg["secrets"][[k for k, v in mounted.items() if v == app["environment"]["EFFNET_TLS_CERT"]][0]]["file"] \
        == env["EFFNET_TLS_CERT_FILE"]
    assert cfg["secrets"][[k for k, v in mounted.items() if v == app["environment"]["EFFNET_TLS_KEY"]][0]]["file"] \
        == env["EFFNET_TLS_KEY_FILE"]
    # The server accepts the pair (both or neither).
    from effnet_serve.core.config import Settings

    s = Settings(tls_cert=app["environment"]["EFFNET_TLS_CERT"], tls_key=app["environment"]["EFFNET_TLS_KEY"])
    assert s.tls_cert and s.tls_key
    # Prometheus gets the HTTPS scrape configuration (compose merges the mount by its target path).
    (mount,) = [v for v in prometheus["volumes"] if v["target"] == "/etc/prometheus/prometheus.yml"]
    scrape = yaml.safe_load(Path(mount["source"]).read_text())
    (job,) = [j for j in scrape["scrape_configs"] if j["job_name"] == "effnet"]
    assert job["scheme"] == "https"
    ca_targets = {s["target"] for s in prometheus["secrets"]}
    assert job["tls_config"]["ca_file"] in ca_targets and not job["tls_config"].get("insecure_skip_verify")


def test_the_tls_scrape_configuration_passes_promtool(tmp_path):
    promtool = require_tool("promtool", "make system-deps (Debian's prometheus package)", "/usr/bin/promtool")
    cert, _key = _self_signed(tmp_path)
    text = (ROOT / "deploy/prometheus/prometheus-tls.yml").read_text().replace("/run/secrets/effnet_tls_ca", str(cert))
    path = tmp_path / "prometheus.yml"
    path.write_text(text)
    out = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# --------------------------------------------------------------------------- the image's HEALTHCHECK
def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    openssl = require_tool("openssl", "apt-get install openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=app",
                    "-addext", "subjectAltName=DNS:app", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def _healthcheck_module():
    spec = importlib.util.spec_from_file_location("effnet_healthcheck", ROOT / "deploy/docker/healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Ready(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server interface
        code = 200 if self.path == "/health/ready" else 404
        self.send_response(code)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_healthcheck_speaks_https_to_a_tls_server_with_a_certificate_for_another_name(tmp_path):
    hc = _healthcheck_module()
    assert hc.url({}) == "http://127.0.0.1:8000/health/ready"
    assert hc.url({"EFFNET_TLS_CERT": "/run/secrets/effnet_tls_cert"}) == "https://127.0.0.1:8000/health/ready"
    assert hc.url({"EFFNET_TLS_CERT": "x", "EFFNET_HEALTHCHECK_URL": "http://h/r"}) == "http://h/r"

    cert, key = _self_signed(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        # The script as the image runs it: a certificate for `app`, reached as 127.0.0.1.
        env = {**os.environ, "EFFNET_HEALTHCHECK_URL": f"https://127.0.0.1:{port}/health/ready"}
        out = subprocess.run([sys.executable, str(ROOT / "deploy/docker/healthcheck.py")], env=env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        env["EFFNET_HEALTHCHECK_URL"] = f"https://127.0.0.1:{port}/not-ready"
        out = subprocess.run([sys.executable, str(ROOT / "deploy/docker/healthcheck.py")], env=env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 1 and "not ready" in out.stderr
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- Kubernetes and KServe
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
KSERVE = ROOT / "deploy" / "kserve"


def _key_from_secret(container: dict) -> dict:
    (entry,) = [e for e in container.get("env", []) if e["name"] == "EFFNET_API_KEY"]
    assert "value" not in entry, "the key is never written into a manifest"
    ref = entry["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"]
    # Required: a missing Secret keeps the pod from starting instead of serving without a key.
    assert ref.get("optional") is not True
    return ref


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_the_deployment_reads_the_api_key_from_a_secret_it_does_not_ship(overlay):
    docs = render(overlay)
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    _key_from_secret(container)
    # An applied placeholder Secret would overwrite the operator's real key on every apply.
    assert not [d for d in docs if d["kind"] == "Secret"]


def test_the_kserve_runtime_reads_the_api_key_from_a_secret():
    runtime = yaml.safe_load((KSERVE / "cluster-serving-runtime.yaml").read_text())
    (container,) = [c for c in runtime["spec"]["containers"] if c["name"] == "kserve-container"]
    _key_from_secret(container)
    env = {e["name"]: e.get("value") for e in container["env"]}
    # Probes and metrics stay reachable without the key.
    exempt = env["EFFNET_API_KEY_EXEMPT"].split(",")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert any(container[probe]["httpGet"]["path"].startswith(p) for p in exempt), probe


def _matches(selector: dict | None, labels: dict) -> bool:
    """A NetworkPolicy label selector (matchLabels only, which is all the shipped ones use)."""
    assert set(selector or {}) <= {"matchLabels"}, "this evaluator knows matchLabels only"
    return (selector or {}).get("matchLabels", {}).items() <= labels.items()


def _allowed(policy: dict, own_namespace: str, peer_ns: dict, peer_pod: dict, port) -> bool:
    """Whether `policy` lets a pod (labels peer_pod) in a namespace (labels peer_ns) reach `port`."""
    for rule in policy["spec"].get("ingress", []):
        if not any(p["port"] == port for p in rule.get("ports", [])):
            continue
        for peer in rule["from"]:
            ns_ok = (_matches(peer["namespaceSelector"], peer_ns) if "namespaceSelector" in peer
                     else peer_ns.get("kubernetes.io/metadata.name") == own_namespace)
            pod_ok = _matches(peer.get("podSelector"), peer_pod) if "podSelector" in peer else True
            if ns_ok and pod_ok:
                return True
    return False


def _check_policy(policy: dict, pod_labels: dict, namespace: str, http, grpc) -> None:
    kubernetes_validate.validate(policy, kubernetes_validate.utils.latest_version(), strict=True)
    assert _matches(policy["spec"]["podSelector"], pod_labels), "the policy does not select the server's pods"
    assert "Ingress" in policy["spec"]["policyTypes"]
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from") and rule.get("ports"), "a rule without from/ports opens the pods to everyone"
    here = {"kubernetes.io/metadata.name": namespace}
    client = {"effnet-serve/client": "true"}
    ingress_ns = {"kubernetes.io/metadata.name": "ingress-nginx", "effnet-serve/client": "true"}
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    other_ns = {"kubernetes.io/metadata.name": "elsewhere"}
    for port in (http, grpc):
        assert _allowed(policy, namespace, here, client, port)  # a labelled client beside it
        assert _allowed(policy, namespace, ingress_ns, {"app": "controller"}, port)  # a client namespace
        assert not _allowed(policy, namespace, here, {"app": "anything"}, port)  # an unlabelled pod
        assert not _allowed(policy, namespace, other_ns, client, port)  # a label in a foreign namespace
        assert not _allowed(policy, namespace, other_ns, prometheus, port)  # not the monitoring namespace
    assert _allowed(policy, namespace, monitoring, prometheus, http)  # /metrics
    assert not _allowed(policy, namespace, monitoring, prometheus, grpc)
    assert not _allowed(policy, namespace, monitoring, {"app": "grafana"}, http)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_a_network_policy_lets_only_clients_and_prometheus_reach_the_pods(overlay):
    docs = render(overlay)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    names = {p["name"] for p in container["ports"]}
    assert names == {"http", "grpc"}
    policy = one(docs, "NetworkPolicy")
    assert policy["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    _check_policy(policy, pod["metadata"]["labels"], deployment["metadata"]["namespace"], "http", "grpc")


def test_the_kserve_network_policy_covers_the_example_inference_service():
    policy = yaml.safe_load((KSERVE / "network-policy.yaml").read_text())
    isvc = yaml.safe_load((KSERVE / "inference-service.yaml").read_text())
    runtime = yaml.safe_load((KSERVE / "cluster-serving-runtime.yaml").read_text())
    (container,) = [c for c in runtime["spec"]["containers"] if c["name"] == "kserve-container"]
    http, grpc = (p["containerPort"] for p in container["ports"])
    # KServe labels the predictor's pods with the InferenceService's name.
    pod_labels = {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"], "component": "predictor"}
    _check_policy(policy, pod_labels, "effnet", http, grpc)
    assert "NetworkPolicy" in {d["kind"] for d in render(KSERVE)}


def test_the_tls_overlay_mounts_the_secret_and_the_server_reads_its_pem_files():
    from effnet_serve.core.config import Settings

    docs = render(K8S / "overlays" / "tls")
    pod = one(docs, "Deployment")["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if "secret" in volumes[m["name"]]]
    secret = volumes[mount["name"]]["secret"]
    assert mount.get("readOnly") is True and secret["defaultMode"] & 0o007 == 0  # not world-readable
    # A kubernetes.io/tls Secret holds tls.crt and tls.key.
    assert env["EFFNET_TLS_CERT"] == f"{mount['mountPath']}/tls.crt"
    assert env["EFFNET_TLS_KEY"] == f"{mount['mountPath']}/tls.key"
    assert pod["spec"]["securityContext"]["fsGroup"] == pod["spec"]["securityContext"]["runAsGroup"]
    s = Settings(tls_cert=env["EFFNET_TLS_CERT"], tls_key=env["EFFNET_TLS_KEY"])
    assert str(s.tls_cert) == env["EFFNET_TLS_CERT"]
    # The kubelet's probes and annotation-based scraping speak TLS too.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS", probe
    assert pod["metadata"]["annotations"]["prometheus.io/scheme"] == "https"
    # The gRPC port is no longer announced as HTTP/2 in clear.
    service = one(docs, "Service")
    assert all(p.get("appProtocol") != "kubernetes.io/h2c" for p in service["spec"]["ports"])
    # Without the component the plain overlay keeps plaintext (TLS terminated in front).
    (plain,) = one(render(K8S / "overlays" / "cpu"), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "EFFNET_TLS_CERT" not in {e["name"] for e in plain["env"]}


# --------------------------------------------------------------------------- base images
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "deploy" / "ci" / "prometheus.Dockerfile"]
DIGEST = "sha256:" + "0123456789abcdef" * 4  # the shape of one; `compose config` does not resolve it
EXACT_TAG = re.compile(r"^[\w./-]+:(?!latest$)[\w.-]*\d[\w.-]*$")  # a version tag, never latest
PINNED = re.compile(r"^[\w./-]+(:[\w.-]+)?@sha256:[0-9a-f]{64}$")


def _base_args(text: str) -> dict[str, str]:
    """The ARGs declared before the first FROM (the only ones a FROM line can use), with their defaults."""
    head = text.split("\nFROM ", 1)[0]
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", head, re.M))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_base_image_is_a_build_argument_or_a_digest(dockerfile):
    """No registry is reachable where this is tested, so no digest is written in: every base comes through a build
    argument a digest can be passed in, and its default is an exact version tag."""
    text = dockerfile.read_text()
    args = _base_args(text)
    stages: set[str] = set()
    froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?\s*$", text, re.M | re.I)
    assert froms
    for image, stage in froms:
        if image in stages:
            pass  # an earlier stage
        elif m := re.fullmatch(r"\$\{(\w+)\}", image):
            default = args.get(m.group(1))
            assert default, f"FROM {image}: the argument is not declared before the first FROM"
            assert PINNED.match(default) or EXACT_TAG.match(default), f"ARG {m.group(1)}={default}"
        else:
            assert PINNED.match(image), f"FROM {image}: neither a build argument nor pinned by digest"
        if stage:
            stages.add(stage)


def test_compose_builds_and_pulls_what_the_operator_pins():
    dockerfile_args = _base_args((ROOT / "Dockerfile").read_text())
    for name in ("docker-compose.yml", "docker-compose.gpu.yml"):
        for var, default in re.findall(r"\$\{(EFFNET_(?:BASE|CUDA)_IMAGE):-([^}]+)\}", (ROOT / name).read_text()):
            arg = {"EFFNET_BASE_IMAGE": "BASE_IMAGE", "EFFNET_CUDA_IMAGE": "CUDA_IMAGE"}[var]
            assert default == dockerfile_args[arg], f"{name}: {var} and the Dockerfile's {arg} disagree"
    # Every image a service pulls comes from a variable with an exact-tag default.
    text = (ROOT / "docker-compose.yml").read_text()
    images = re.findall(r"^\s+image:\s*(\S+)$", text, re.M)
    assert len(images) == 3
    for image in images:
        m = re.fullmatch(r"\$\{(\w+):-(\S+)\}", image)
        assert m, f"image: {image} cannot be pinned from .env"
        if m.group(1) != "EFFNET_IMAGE":  # the app's image is built here
            assert EXACT_TAG.match(m.group(2)), image
    # A digest set in the environment reaches the build and the pulls.
    env = clean_env(GRAFANA_ADMIN_PASSWORD=TEST_PASSWORD,
                    EFFNET_BASE_IMAGE=f"python:3.11-slim-bookworm@{DIGEST}",
                    EFFNET_CUDA_IMAGE=f"nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04@{DIGEST}",
                    PROMETHEUS_IMAGE=f"prom/prometheus:v2.55.1@{DIGEST}", GRAFANA_IMAGE=f"grafana/grafana:11.3.0@{DIGEST}")
    services = config(["docker-compose.yml", "docker-compose.gpu.yml"], env)["services"]
    assert services["app"]["build"]["args"]["CUDA_IMAGE"].endswith(DIGEST)
    assert services["prometheus"]["image"].endswith(DIGEST) and services["grafana"]["image"].endswith(DIGEST)
    assert config(BASE, env)["services"]["app"]["build"]["args"]["BASE_IMAGE"].endswith(DIGEST)


# --------------------------------------------------------------------------- docs/security.md
def test_every_test_the_threat_table_names_exists():
    """The table's proof column names real tests: `file.py::function`, `::function` (same file as the one
    before it), `file.py` (case `name`) for a parametrised case."""
    rows = [line for line in (ROOT / "docs/security.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith(("| resource", "| ---"))]
    assert len(rows) >= 20
    named = 0
    for row in rows:
        resource, *_, proof = [c.strip() for c in row.strip("|").split(" | ")]
        assert proof, resource
        current: Path | None = None
        for token in re.findall(r"`([^`]+)`|\(case", proof):
            if token.endswith(".py") or ".py::" in token:
                path, _, func = token.partition("::")
                current = ROOT / "tests" / path
                assert current.is_file(), f"{resource}: no {path}"
            elif token.startswith("::"):
                func = token[2:]
            elif current is not None and token and re.fullmatch(r"[\w*]+", token):
                # A case name (or a pattern of them) inside the file.
                assert re.search(token.replace("*", r"\w*"), current.read_text()), f"{resource}: no case {token}"
                continue
            else:
                continue
            if func:
                assert re.search(rf"^(async )?def {func}\(", current.read_text(), re.M), f"{resource}: no {func}"
                named += 1
    assert named >= 20
