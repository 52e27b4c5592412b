"""The manifest's refusals, word for word: a ManifestError's message is what /models shows for a model
that cannot be served (docs/manifest.md), so an operator must be able to act on it. Added for mutants
of app/engine/manifest.py that survived `make mutation` (docs/testing.md): the tests in
test_serve_config.py match a word of each message, and "manifest" matches every one of them.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from app.engine.manifest import ManifestError, load_manifest, sha256_file, verify_onnx
from serving_helpers import write_model


def refusal(folder) -> str:
    with pytest.raises(ManifestError) as exc:
        load_manifest(folder)
    return str(exc.value)


def test_a_missing_or_unreadable_manifest_says_which(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert refusal(empty) == "manifest.json is missing"
    odd = tmp_path / "odd"
    (odd / "manifest.json").mkdir(parents=True)  # there, but not a file
    assert refusal(odd) == "manifest.json cannot be read"
    bad = write_model(tmp_path, "bad")
    (bad / "manifest.json").write_bytes(b'{"name": "\xff"}')
    assert refusal(bad) == "manifest.json is not valid UTF-8 JSON"


def test_a_field_error_names_the_field_and_pydantics_reason(tmp_path):
    bad = write_model(tmp_path, "bad", changes={"resolution": 0})
    assert refusal(bad) == "manifest.json is invalid at resolution: Input should be greater than or equal to 1"
    nested = write_model(tmp_path, "nested", changes={"onnx": {"opset": 11}})
    assert refusal(nested).startswith("manifest.json is invalid at onnx.")


def test_an_error_of_the_whole_manifest_is_placed_at_manifest(tmp_path):
    """A check across fields has no field: the message says "manifest", and still gives the reason."""
    bad = write_model(tmp_path, "bad", changes={"labels": ["a", "b"]})
    assert refusal(bad) == (
        "manifest.json is invalid at manifest: Value error, onnx.output.shape must be [batch, len(labels)]"
    )


def test_the_onnx_file_missing_or_different_is_said_with_both_digests(tmp_path):
    folder = write_model(tmp_path, "ok")
    m = load_manifest(folder)
    onnx = folder / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    with pytest.raises(ManifestError) as exc:
        verify_onnx(folder, m)
    actual = hashlib.sha256(onnx.read_bytes()).hexdigest()
    assert str(exc.value) == f"model.onnx sha256 {actual[:12]}… does not match the manifest's {m.onnx.sha256[:12]}…"
    onnx.unlink()
    with pytest.raises(ManifestError) as exc:
        verify_onnx(folder, m)
    assert str(exc.value) == "model.onnx is missing"


def test_sha256_file_reads_in_chunks_and_equals_hashlib(tmp_path):
    path = tmp_path / "blob"
    data = bytes(range(256)) * 5000  # 1.28 MB: more than one 1 MiB chunk
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path, chunk=7) == hashlib.sha256(data).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", sha256_file(path))
    path.write_bytes(b"")
    assert sha256_file(path) == hashlib.sha256(b"").hexdigest()


def test_non_ascii_labels_are_read_as_utf8(tmp_path):
    """The file is UTF-8 whatever the locale (json.dumps escapes by default: write the bytes as such)."""
    folder = write_model(tmp_path, "utf8")
    raw = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    raw["labels"][:3] = ["café", "naïve", "日本"]
    (folder / "manifest.json").write_bytes(json.dumps(raw, ensure_ascii=False).encode("utf-8"))
    assert "café".encode() in (folder / "manifest.json").read_bytes()
    assert load_manifest(folder).labels[:3] == ["café", "naïve", "日本"]
