"""ONNX Runtime session creation: provider choice and the thread budget.

Threads. Every model runs at most one batch at a time (its batcher owns a single inference
thread), so the question is only how wide each run may go:

* Each session gets `EFFNET_THREADS` intra-op threads (default: the cores). A single hot
  model - the common case - then uses the whole machine. Dividing the budget statically
  (THREADS / models) would leave one busy B0 on 1 of 2 cores while seven idle models
  hold the rest.
* Spinning is off by default (`EFFNET_ORT_SPINNING=false`). Measured on this 2-core box,
  ORT's workers spin ~30 ms after every run; in a server that time belongs to the decode
  pool preparing the next batch, and with several sessions loaded each one's spinners
  would compete. The cost is ~20% at batch 1 in a tight loop, where nothing else needs
  the CPU; turn it on for a single-model, latency-first deployment.
* With spinning off an idle session's pool sleeps, so eight loaded models cost eight
  parked pools, not eight busy ones. When several models are busy at once they share the
  cores through the OS scheduler, which for compute-bound kernels costs little throughput.
* inter-op = 1, sequential execution: EfficientNet is a chain; parallel branches buy nothing.

Memory. One CPU arena for the whole process, shared by every session (ORT's environment allocator,
`session.use_env_allocators`), with memory patterns on. ORT's own default, an arena per session, is the
fastest (B0 batch 8: switching arenas off cost 32-47% of raw throughput here) but each session's arena keeps
the peak of every shape it ran, for good: with b0..b7 loaded that was 2.0 GiB of 2.9 GiB RSS. The shared
arena gives the default's speed (0.99x in the same run) while models take turns with one pool of blocks;
it grows by what is requested, not by doubling. `EFFNET_ORT_ARENA=per-session|off` restores the others.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger("effnet.sessions")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class SessionError(Exception):
    """The model cannot run here; the message is shown as the model's unavailable reason."""


# ORT's exception class names are internals; /models and /health/ready show what they mean.
# The full ORT message goes to the server log.
_ORT_FAILURES = {
    "InvalidProtobuf": "not a valid ONNX file",
    "InvalidGraph": "the ONNX graph is invalid",
    "NotImplemented": "the graph uses an operator or type this onnxruntime does not implement",
    "NoSuchFile": "the file cannot be opened",
    "EPFail": "the execution provider failed to initialise",
}


@dataclass
class ModelSession:
    session: ort.InferenceSession
    input_name: str
    output_name: str
    provider: str  # the provider that actually runs the graph
    device: str  # "cpu" or "cuda"

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]


def resolve_device(requested: str) -> str:
    available = ort.get_available_providers()
    if requested == "cuda":
        if CUDA not in available:
            raise SessionError("EFFNET_DEVICE=cuda but onnxruntime has no CUDAExecutionProvider (install the gpu extra)")
        return "cuda"
    if requested == "auto" and CUDA in available:
        return "cuda"
    return "cpu"


_ENV_ARENA_LOCK = threading.Lock()
_env_arena = False


def ensure_shared_arena() -> None:
    """Register the process-wide CPU arena once, before the first session that uses it."""
    global _env_arena
    with _ENV_ARENA_LOCK:
        if _env_arena:
            return
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        # max_mem 0 (unbounded), arena_extend_strategy 1 (kSameAsRequested), chunk sizes default.
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
        _env_arena = True


def session_options(threads: int, spinning: bool, arena: str = "shared") -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.enable_cpu_mem_arena = arena != "off"
    so.enable_mem_pattern = arena != "off"
    if arena == "shared":
        ensure_shared_arena()
        so.add_session_config_entry("session.use_env_allocators", "1")
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: warnings about unused initialisers are noise here
    return so


def create_session(path: Path, input_name: str, output_name: str, *, device: str, threads: int, spinning: bool,
                   arena: str = "shared") -> ModelSession:
    providers: list = [CPU]
    if device == "cuda":
        # Arena growth by request size, not by doubling: bounded GPU memory with fixed shapes.
        providers = [(CUDA, {"arena_extend_strategy": "kSameAsRequested"}), CPU]
    try:
        session = ort.InferenceSession(str(path), sess_options=session_options(threads, spinning, arena), providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for bad files
        log.error("onnxruntime cannot load %s: %s: %s", path, type(exc).__name__, exc)
        what = _ORT_FAILURES.get(type(exc).__name__, "onnxruntime refused the graph")
        raise SessionError(f"onnxruntime cannot load the model: {what}") from None
    inputs = {i.name for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    if input_name not in inputs or output_name not in outputs:
        raise SessionError(f"the ONNX graph has inputs {sorted(inputs)} and outputs {sorted(outputs)}, not the manifest's")
    provider = session.get_providers()[0]
    return ModelSession(session, input_name, output_name, provider, "cuda" if provider == CUDA else "cpu")
