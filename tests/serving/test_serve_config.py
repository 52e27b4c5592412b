"""Settings from the environment, per-model batch sizes, and the manifest contract."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from effnet_serve.core.config import Settings, read_batch_table
from effnet_serve.engine.manifest import ManifestError, load_manifest, verify_onnx
from serving_helpers import write_model


def test_environment_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFNET_REPOSITORY", str(tmp_path))
    monkeypatch.setenv("EFFNET_MODELS", "b0, lite0,phi-0.5")
    monkeypatch.setenv("EFFNET_DEVICE", "cpu")
    monkeypatch.setenv("EFFNET_MAX_DELAY_MS", "2.5")
    monkeypatch.setenv("EFFNET_API_KEY", "k")
    monkeypatch.setenv("EFFNET_API_KEY_EXEMPT", "/health")
    s = Settings()
    assert s.repository == tmp_path and s.models == ["b0", "lite0", "phi-0.5"]
    assert s.max_delay_ms == 2.5 and s.api_key.get_secret_value() == "k" and s.api_key_exempt == ["/health"]
    assert s.cors_origins == [] and s.max_image_pixels == 50_000_000
    monkeypatch.setenv("EFFNET_DEVICE", "tpu")
    with pytest.raises(ValidationError):
        Settings()


def test_max_batch_most_specific_wins(monkeypatch, tmp_path):
    (tmp_path / "batch_sizes.json").write_text(json.dumps({"b0": 4, "b4": 2, "phi-0.5": 3}))
    table = read_batch_table(tmp_path, "cpu")
    s = Settings()
    assert s.max_batch_for("b0", "cpu", table) == 4  # file
    assert s.max_batch_for("b7", "cpu", table) == 8 and s.max_batch_for("b7", "cuda", table) == 32  # device default
    monkeypatch.setenv("EFFNET_MAX_BATCH", "16")
    monkeypatch.setenv("EFFNET_MAX_BATCH_B4", "1")
    monkeypatch.setenv("EFFNET_MAX_BATCH_PHI_0_5", "5")
    s = Settings()
    assert s.max_batch_for("b4", "cpu", table) == 1  # env per model beats the file
    assert s.max_batch_for("phi-0.5", "cpu", table) == 5
    assert s.max_batch_for("b0", "cpu", table) == 4  # the file's per-model entry beats the global
    assert s.max_batch_for("b7", "cpu", table) == 16
    monkeypatch.setenv("EFFNET_MAX_BATCH_B2", "zero")
    with pytest.raises(ValidationError):
        Settings()


def test_batch_table_per_device_and_bad_files_are_ignored(tmp_path):
    (tmp_path / "batch_sizes.json").write_text(json.dumps({"cpu": {"b0": 8}, "cuda": {"b0": 64}}))
    assert read_batch_table(tmp_path, "cuda") == {"b0": 64}
    (tmp_path / "batch_sizes.json").write_text("{not json")
    assert read_batch_table(tmp_path, "cpu") == {}
    (tmp_path / "batch_sizes.json").write_text(json.dumps({"b0": -1, "b1": "8", "b2": 2}))
    assert read_batch_table(tmp_path, "cpu") == {"b2": 2}


def test_manifest_validation_and_checksum(tmp_path):
    folder = write_model(tmp_path, "ok")
    m = load_manifest(folder)
    assert m.preprocess.crop == 32 and verify_onnx(folder, m).name == "model.onnx"
    (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(ManifestError, match="sha256"):
        verify_onnx(folder, m)
    for change, where in [
        ({"name": "../evil"}, "name"),
        ({"preprocess": {"resize": 10, "crop": 32, "interpolation": "bicubic", "mean": [0, 0, 0], "std": [1, 1, 1]}}, "preprocess"),
        ({"labels": ["a", "b"]}, "manifest"),
        ({"schema_version": 2}, "schema_version"),
    ]:
        bad = write_model(tmp_path, "bad", changes=change)
        with pytest.raises(ManifestError, match=where):
            load_manifest(bad)
    (bad / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="JSON"):
        load_manifest(bad)
    m = json.loads((folder / "manifest.json").read_text())
    m["onnx"]["file"] = "../../etc/passwd"
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="onnx.file"):
        load_manifest(folder)


@pytest.mark.parametrize("value, mode", [("false", "off"), ("true", "on"), ("off", "off"), ("run", "run"), ("on", "on"),
                                         ("auto", "auto")])
def test_ort_spinning_takes_a_mode_or_the_old_booleans(monkeypatch, value, mode):
    from effnet_serve.engine.sessions import session_options, spin_for

    monkeypatch.setenv("EFFNET_ORT_SPINNING", value)
    s = Settings()
    assert s.ort_spinning == mode
    mode = spin_for(mode, 385_814_752)  # what a b0 session gets ("auto": spinning within its runs)
    so = session_options(1, mode, arena="per-session")
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == ("0" if mode == "off" else "1")
    # "run": spinning within a run only; ORT parks the threads the moment a run returns.
    stops = so.get_session_config_entry("session.force_spinning_stop") if mode == "run" else None
    assert stops == ("1" if mode == "run" else None)


def test_ort_spinning_auto_spins_within_runs_for_real_size_models_only(monkeypatch):
    from effnet_serve.engine.sessions import SPIN_MIN_MACS, spin_for

    monkeypatch.delenv("EFFNET_ORT_SPINNING", raising=False)
    assert Settings().ort_spinning == "auto"  # the default
    assert spin_for("auto", 385_814_752) == "run"  # b0
    assert spin_for("auto", 2_269_920) == "off"  # a tiny custom variant: its spinners would only take cores
    assert spin_for("auto", SPIN_MIN_MACS) == "run" and spin_for("auto", SPIN_MIN_MACS - 1) == "off"
    for mode in ("off", "run", "on"):
        assert spin_for(mode, 10) == mode == spin_for(mode, 10**10)  # anything else is taken as it is


def test_ort_spinning_refuses_an_unknown_mode(monkeypatch):
    monkeypatch.setenv("EFFNET_ORT_SPINNING", "fast")
    with pytest.raises(ValidationError):
        Settings()
