"""`effnet tune` (app/tools/tune.py): a real session per model, the table written where the service reads it."""

from __future__ import annotations

import json
import subprocess
import sys

from effnet_serve.core.config import Settings, read_batch_table
from effnet_serve.tools.tune import best_batch


def test_the_smallest_batch_within_three_percent_of_the_best_wins():
    assert best_batch({1: 100.0, 2: 180.0, 4: 200.0, 8: 205.0}) == 4  # 200 is within 3% of 205
    assert best_batch({1: 100.0, 2: 180.0, 4: 190.0, 8: 205.0}) == 8
    assert best_batch({1: 50.0, 2: 40.0}) == 1  # a CPU where batching only costs


def test_tune_writes_a_table_the_service_reads(copy_repo, tiny_repo):
    repo = copy_repo(tiny_repo)
    # Another device's entries and this device's other models survive a tune.
    (repo / "batch_sizes.json").write_text(json.dumps({"cuda": {"tiny": 64}, "cpu": {"gone": 3}}))
    r = subprocess.run([sys.executable, "-m", "effnet_serve", "tune", "--repo", str(repo), "--models", "tiny",
                        "--batches", "1,2", "--seconds", "0.3"], capture_output=True, text=True, timeout=300,
                       env={**_env(), "EFFNET_DEVICE": "cpu", "EFFNET_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "tiny: img/s by batch" in r.stderr
    table = json.loads((repo / "batch_sizes.json").read_text())
    assert table["cuda"] == {"tiny": 64}
    assert table["cpu"]["gone"] == 3 and table["cpu"]["tiny"] in (1, 2)
    chosen = read_batch_table(repo, "cpu")["tiny"]
    assert Settings(repository=repo).max_batch_for("tiny", "cpu", read_batch_table(repo, "cpu")) == chosen


def test_a_dry_run_writes_nothing_and_a_bad_request_says_why(copy_repo, tiny_repo):
    repo = copy_repo(tiny_repo)
    cmd = [sys.executable, "-m", "effnet_serve", "tune", "--repo", str(repo), "--models", "tiny", "--seconds", "0.2"]
    r = subprocess.run(cmd + ["--batches", "1", "--dry-run"], capture_output=True, text=True, timeout=300,
                       env={**_env(), "EFFNET_DEVICE": "cpu", "EFFNET_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"cpu": {"tiny": 1}}
    assert not (repo / "batch_sizes.json").exists()
    r = subprocess.run(cmd + ["--batches", "0,2"], capture_output=True, text=True, timeout=60, env=_env())
    assert r.returncode == 2 and "batch sizes start at 1" in r.stderr
    r = subprocess.run([sys.executable, "-m", "effnet_serve", "tune", "--repo", str(repo / "nope")], capture_output=True,
                       text=True, timeout=60, env=_env())
    assert r.returncode == 2 and "no model repository" in r.stderr


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("EFFNET_")}
