"""The GPU logic without a GPU: device choice, refusal, CUDA padding, and the per-device batch table.

ONNX Runtime's provider list is monkeypatched, and where CUDA must "run" a graph, a real CPU
session of a real EfficientNet (tiny_repo) stands in, reporting CUDAExecutionProvider as the
provider ORT would report on a GPU machine. The arithmetic is always ORT's own.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import effnet_serve.engine.sessions as sessions
from effnet_serve.engine.batcher import Batcher, softmax
from effnet_serve.core.config import Settings
from effnet_serve.engine.manifest import load_manifest
from effnet_serve.engine.preprocess import prepare
from effnet_serve.engine.registry import Registry
from effnet_serve.engine.sessions import CPU, CUDA, SessionError, create_session, resolve_device
from serving_helpers import encode, photo

REAL_ORT_SESSION = ort.InferenceSession


class CudaStandIn:
    """A real CPU session that reports CUDA as its provider, the way ORT does when CUDA initialised."""

    created: list[list] = []

    def __init__(self, path, sess_options=None, providers=None):
        CudaStandIn.created.append(providers)
        self._session = REAL_ORT_SESSION(path, sess_options=sess_options, providers=[CPU])

    def get_providers(self):
        return [CUDA, CPU]

    def __getattr__(self, name):
        return getattr(self._session, name)


class CudaFailedToInitialise(CudaStandIn):
    """ORT asked for CUDA but fell back (a driver or cuDNN mismatch): only the CPU provider is active."""

    def get_providers(self):
        return [CPU]


@pytest.fixture
def gpu_build(monkeypatch):
    """onnxruntime-gpu on a machine with a GPU: CUDA is listed, sessions report it."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(sessions.ort, "InferenceSession", CudaStandIn)
    # The stand-in's graph runs on the CPU: its bound buffers must live there too (the binding logic is the same).
    monkeypatch.setattr(sessions, "BUFFER_DEVICE", {CUDA: "cpu", sessions.TENSORRT: "cpu"})
    CudaStandIn.created = []


@pytest.fixture
def cpu_build(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])


def tiny_model(tiny_repo: Path) -> tuple[Path, object]:
    manifest = load_manifest(tiny_repo / "tiny")
    return tiny_repo / "tiny" / manifest.onnx.file, manifest


# --- which device ---------------------------------------------------------------------------
def test_auto_takes_cuda_when_onnxruntime_offers_it(gpu_build):
    assert resolve_device("auto") == "cuda" and resolve_device("cuda") == "cuda"
    assert resolve_device("cpu") == "cpu"  # an explicit cpu is honoured on a GPU machine


def test_auto_is_cpu_and_cuda_is_refused_without_the_cuda_provider(cpu_build):
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(SessionError, match="CUDAExecutionProvider"):
        resolve_device("cuda")


def test_a_cuda_session_asks_for_cuda_first_and_reports_it(gpu_build, tiny_repo):
    path, m = tiny_model(tiny_repo)
    s = create_session(path, m.onnx.input.name, m.onnx.output.name, device="cuda", threads=1, spinning=False)
    assert (s.provider, s.device) == (CUDA, "cuda")
    (providers,) = CudaStandIn.created
    assert providers[0][0] == CUDA and providers[-1] == CPU  # CPU stays as the fallback for unsupported nodes
    create_session(path, m.onnx.input.name, m.onnx.output.name, device="cpu", threads=1, spinning=False)
    assert CudaStandIn.created[-1] == [CPU]  # cpu asks for nothing else


def test_a_session_where_cuda_did_not_initialise_says_cpu(monkeypatch, tiny_repo):
    monkeypatch.setattr(sessions.ort, "InferenceSession", CudaFailedToInitialise)
    path, m = tiny_model(tiny_repo)
    s = create_session(path, m.onnx.input.name, m.onnx.output.name, device="cuda", threads=1, spinning=False)
    assert (s.provider, s.device) == (CPU, "cpu")  # what runs the graph, not what was asked for


def test_effnet_device_cuda_without_cuda_refuses_every_model_with_the_reason(cpu_build, tiny_repo):
    registry = Registry(Settings(repository=tiny_repo, models=["tiny", "tiny2"], device="cuda", threads=1))
    asyncio.run(registry.load_all())
    assert registry.loaded and not registry.ready
    for name in ("tiny", "tiny2"):
        entry = registry.entries[name]
        assert entry.status == "unavailable" and entry.session is None and entry.batcher is None
        assert "EFFNET_DEVICE=cuda" in entry.reason and "CUDAExecutionProvider" in entry.reason


# --- IOBinding and TensorRT ------------------------------------------------------------------
def test_gpu_providers_put_tensorrt_first_only_when_it_is_there_and_has_a_cache(tmp_path):
    cuda = (CUDA, {"arena_extend_strategy": "kSameAsRequested"})
    assert sessions.providers_for("cpu", [sessions.TENSORRT, CUDA, CPU], tmp_path) == [CPU]
    assert sessions.providers_for("cuda", [CUDA, CPU], tmp_path) == [cuda, CPU]
    assert sessions.providers_for("cuda", [sessions.TENSORRT, CUDA, CPU], None) == [cuda, CPU]  # EFFNET_TENSORRT=0
    trt, *rest = sessions.providers_for("cuda", [sessions.TENSORRT, CUDA, CPU], tmp_path / "trt")
    assert trt == (sessions.TENSORRT, {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                        "trt_engine_cache_path": str(tmp_path / "trt")})
    assert rest == [cuda, CPU]  # CUDA, then the CPU, for whatever TensorRT does not take
    # One engine for every batch size the model runs, not one per size (minutes each).
    profile = sessions.BatchProfile("images", (3, 380, 380), 32)
    trt, *_ = sessions.providers_for("cuda", [sessions.TENSORRT, CUDA, CPU], tmp_path, profile)
    assert {k: v for k, v in trt[1].items() if k.startswith("trt_profile")} == {
        "trt_profile_min_shapes": "images:1x3x380x380", "trt_profile_opt_shapes": "images:32x3x380x380",
        "trt_profile_max_shapes": "images:32x3x380x380"}


def test_bound_buffers_compute_what_a_plain_run_computes_and_answers_never_share_memory(tiny_repo):
    """IOBinding over buffers made per batch shape (here on the CPU, where ORT binds the same way): the same
    logits as session.run for each batch size, in any order, and an earlier answer is not overwritten by
    the next run of its shape (the buffer is reused, the answer must not be)."""
    path, m = tiny_model(tiny_repo)
    session = REAL_ORT_SESSION(str(path), providers=[CPU])
    plain = lambda x: session.run(None, {m.onnx.input.name: x})[0]  # noqa: E731
    bound = sessions.BoundBuffers(session, m.onnx.input.name, m.onnx.output.name, "cpu")
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, 3, 64, 64)).astype(np.float32) for n in (1, 4, 1, 4, 2)]
    answers = [bound.run(x) for x in batches]
    for x, got in zip(batches, answers):
        np.testing.assert_allclose(got, plain(x), rtol=1e-5, atol=1e-5)
    assert answers[0].shape == (1, 1000) and not np.array_equal(answers[0], answers[2])
    assert sorted(bound._slots) == [(1, 3, 64, 64), (2, 3, 64, 64), (4, 3, 64, 64)]  # one slot per shape
    cpu = create_session(path, m.onnx.input.name, m.onnx.output.name, device="cpu", threads=1, spinning=False)
    assert cpu.bound is None  # on the CPU ORT reads numpy memory where it lies: nothing to bind


def test_a_gpu_session_runs_through_its_bound_buffers(gpu_build, tiny_repo):
    path, m = tiny_model(tiny_repo)
    s = create_session(path, m.onnx.input.name, m.onnx.output.name, device="cuda", threads=1, spinning=False)
    assert s.bound is not None
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(s.run(x), s.session.run(None, {m.onnx.input.name: x})[0], rtol=1e-5, atol=1e-5)
    assert list(s.bound._slots) == [x.shape]


def test_cpu_runs_from_the_shrink_size_up_give_the_arena_back_and_compute_the_same(tiny_repo):
    """EFFNET_ORT_SHRINK_MB: a run whose input reaches it makes the session owe a shrink, paid by the first run
    with no other batch waiting (ORT's arena-shrink run option), whatever its size; other runs run plainly;
    all compute what ORT computes. Without an arena there is nothing to shrink."""
    path, m = tiny_model(tiny_repo)
    s = create_session(path, m.onnx.input.name, m.onnx.output.name, device="cpu", threads=1, spinning=False,
                       shrink_above=3 * 3 * 64 * 64 * 4)  # three images of 64 px
    seen: list = []
    real_run = s.session.run
    s.session = type("Spy", (), {"run": lambda _self, out, feed, options=None: (seen.append(options), real_run(out, feed))[1]})()
    rng = np.random.default_rng(2)
    small, big = (rng.standard_normal((n, 3, 64, 64)).astype(np.float32) for n in (2, 3))
    for x in (small, big):
        np.testing.assert_allclose(s.run(x), real_run(None, {m.onnx.input.name: x})[0], rtol=1e-5, atol=1e-5)
    assert seen[0] is None and seen[1] is sessions._SHRINK
    assert seen[1].get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    s.idle = lambda: False  # another batch waits: the next run reuses the memory, so it is kept
    s.run(big)
    s.run(small)
    assert seen[2:] == [None, None] and s.owes_shrink
    s.idle = lambda: True  # the burst's last batch is a small one: it still gives the big runs' growth back
    s.run(small)
    s.run(small)
    assert seen[4:] == [sessions._SHRINK, None] and not s.owes_shrink
    off = create_session(path, m.onnx.input.name, m.onnx.output.name, device="cpu", threads=1, spinning=False,
                         arena="off", shrink_above=1)
    assert off.shrink_above is None


# --- CUDA padding on a real session ---------------------------------------------------------
def test_cuda_padding_does_not_change_the_real_rows(tiny_repo):
    path, m = tiny_model(tiny_repo)
    session = REAL_ORT_SESSION(str(path), providers=[CPU])
    run = lambda x: session.run(None, {m.onnx.input.name: x})[0]  # noqa: E731
    images = [prepare(encode(photo((120, 90), seed=i)), m.preprocess, 50_000_000).tensor for i in range(3)]
    alone = np.concatenate([softmax(run(x[None])) for x in images])
    shapes: list[int] = []

    def recorded(x: np.ndarray) -> np.ndarray:
        shapes.append(x.shape[0])
        assert not x[len(images):].any()  # the padding is zeros
        return run(x)

    async def main():
        b = Batcher("tiny", recorded, max_batch=8, max_delay_s=0.2, max_queue=16, pad=True)
        b.start()
        with b.reserve(len(images)) as room:  # one request's images, decoded together
            pending = asyncio.gather(*(room.submit([x]) for x in images))
            await asyncio.sleep(0)
        out = await pending
        await b.stop()
        return out

    results = asyncio.run(main())
    assert shapes == [4]  # 3 images padded up to the next fixed shape
    got = np.stack([r[0].probs for r in results])
    np.testing.assert_allclose(got, alone, rtol=0, atol=1e-6)
    assert not np.allclose(alone[0], alone[1], rtol=0, atol=1e-6)  # the rows are not interchangeable


# --- the batch table of the device actually used --------------------------------------------
def _repo_with_batch_table(tiny_repo: Path, dest: Path) -> Path:
    dest.mkdir()
    (dest / "tiny").symlink_to((tiny_repo / "tiny").resolve(), target_is_directory=True)
    (dest / "batch_sizes.json").write_text(json.dumps({"cpu": {"tiny": 2}, "cuda": {"tiny": 16}}))
    return dest


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_a_model_on_cuda_gets_the_cuda_batch_size_and_padding(gpu_build, tiny_repo, tmp_path, device):
    repo = _repo_with_batch_table(tiny_repo, tmp_path / "repo")

    async def main():
        registry = Registry(Settings(repository=repo, device=device, threads=1))
        await registry.load_all()
        entry = registry.entries["tiny"]
        facts = entry.status, entry.provider, entry.max_batch, entry.batcher.pad, entry.batcher.sizes
        await registry.close(0)
        return facts

    status, provider, max_batch, pad, sizes = asyncio.run(main())
    assert (status, provider) == ("ready", CUDA)
    assert max_batch == 16 and sizes[-1] == 16  # batch_sizes.json's "cuda" table, not its "cpu" one
    assert pad is True


def test_a_model_on_cpu_gets_the_cpu_batch_size_without_padding(cpu_build, tiny_repo, tmp_path):
    repo = _repo_with_batch_table(tiny_repo, tmp_path / "repo")

    async def main():
        registry = Registry(Settings(repository=repo, device="auto", threads=1))
        await registry.load_all()
        entry = registry.entries["tiny"]
        facts = entry.status, entry.provider, entry.max_batch, entry.batcher.pad
        await registry.close(0)
        return facts

    assert asyncio.run(main()) == ("ready", CPU, 2, False)
