"""The manifest's refusals, word for word: a ManifestError's message is what /models shows for a model
that cannot be served (docs/manifest.md), so an operator must be able to act on it. Added for mutants
of app/engine/manifest.py that survived `make mutation` (docs/testing.md): the tests in
test_serve_config.py match a word of each message, and "manifest" matches every one of them.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import effnet_serve
from effnet_serve.engine.manifest import ManifestError, load_manifest, sha256_file, verify_onnx
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


def test_sha256_file_reads_in_bounded_chunks(tmp_path):
    """An ONNX file can be gigabytes: it is hashed a chunk at a time (1 MiB by default), never read whole."""
    sizes: list = []

    class Spy:  # the file object, recording the size of every read asked of it
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            sizes.append(n)
            return self.f.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    class SpyPath(type(Path())):
        def open(self, *args, **kwargs):
            return Spy(super().open(*args, **kwargs))

    data = bytes(range(256)) * 20_000  # 5.1 MB
    (tmp_path / "blob").write_bytes(data)
    path = SpyPath(tmp_path / "blob")
    for chunk, bound in ((None, 1 << 20), (4096, 4096)):
        sizes.clear()
        digest = sha256_file(path) if chunk is None else sha256_file(path, chunk=chunk)
        assert digest == hashlib.sha256(data).hexdigest()
        # None or a negative size means "the rest of the file"
        assert all(isinstance(n, int) and 0 < n <= bound for n in sizes), sizes[:3]
        assert len(sizes) > len(data) // bound


def test_non_ascii_labels_are_read_as_utf8(tmp_path):
    """The file is UTF-8 whatever the locale (json.dumps escapes by default: write the bytes as such)."""
    folder = write_model(tmp_path, "utf8")
    raw = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    raw["labels"][:3] = ["café", "naïve", "日本"]
    (folder / "manifest.json").write_bytes(json.dumps(raw, ensure_ascii=False).encode("utf-8"))
    assert "café".encode() in (folder / "manifest.json").read_bytes()
    assert load_manifest(folder).labels[:3] == ["café", "naïve", "日本"]


# Run in a fresh interpreter whose locale encoding is not UTF-8; prints what it read, in ASCII.
READ_IN_LOCALE = """
import json, locale, sys
from pathlib import Path
from effnet_serve.engine.manifest import load_manifest
print(json.dumps({"encoding": locale.getencoding(), "labels": load_manifest(Path(sys.argv[1])).labels[:3]}))
"""


def test_non_ascii_labels_are_read_as_utf8_under_a_locale_that_is_not(tmp_path):
    """Python's default text encoding is the locale's. Under the C locale, with locale coercion and UTF-8
    mode off (PYTHONCOERCECLOCALE=0 PYTHONUTF8=0), it is ASCII; on a Latin-1 server it would be Latin-1.
    The C locale is the non-UTF-8 locale every Linux has, so the manifest is read there, by a fresh
    interpreter (the encoding is fixed at start-up), and must still give the UTF-8 labels."""
    folder = write_model(tmp_path, "utf8")
    raw = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    raw["labels"][:3] = ["café", "naïve", "日本"]
    (folder / "manifest.json").write_bytes(json.dumps(raw, ensure_ascii=False).encode("utf-8"))
    assert load_manifest(folder).labels[:3] == ["café", "naïve", "日本"]  # and in this process too
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONUTF8", "PYTHONIOENCODING"))}
    env.update(LC_ALL="C", PYTHONCOERCECLOCALE="0", PYTHONUTF8="0")
    root = Path(effnet_serve.__file__).resolve().parents[1]  # the app/ these tests import (a mutation run's copy too)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", READ_IN_LOCALE, str(folder)], cwd=root, env=env,
                         capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout)
    assert codecs.lookup(seen["encoding"]).name != "utf-8"  # the locale really was another encoding
    assert seen["labels"] == ["café", "naïve", "日本"]
