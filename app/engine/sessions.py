"""ONNX Runtime session creation: provider choice and the thread budget.

Threads. Every model runs at most one batch at a time (its batcher owns a single inference
thread), so the question is only how wide each run may go:

* Each session gets `EFFNET_THREADS` intra-op threads (default: the cores). A single hot
  model - the common case - then uses the whole machine. Dividing the budget statically
  (THREADS / models) would leave one busy B0 on 1 of 2 cores while seven idle models
  hold the rest.
* Spinning (`EFFNET_ORT_SPINNING`, default `auto`). ORT's workers can spin waiting for work, rather than
  sleep on a futex and be woken at each parallel section of a run. Its default (`on`) also spins for ~30 ms
  after every run, which takes the cores the front end and the decode pool need: measured here it raised
  b0's 1-client p99 (16.5 -> 21.5 ms) and cost a tiny model 21% of its throughput at 64 clients, and two
  full test runs out of three saw the engine fail to exit within 30 s of SIGTERM under a hostile flood.
  `run` spins within a run and parks the threads the moment it returns (ORT's session.force_spinning_stop):
  raw b0 at batch 1 runs in 7.0 ms against 9.2 with spinning off, as fast as `on`; through the service
  (quiet machine, 2 workers, alternating 6 s windows) b0's 1-client median went from 11.7 to 10.1 ms with
  the same p99 (14.9 against 14.7), 32 clients stayed at 121 against 120 img/s, and in one process 10.9 ->
  9.2 ms. A tiny model still lost 9% at 64 clients: its runs are a sliver of each request, so its spinners
  only take cores. `auto` therefore gives `run` to models of SPIN_MIN_MACS (100M) and up, `off` below.
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

Big runs give their memory back. ORT records a shape's memory pattern on its first run and from the second
on takes it as one contiguous block, which the arena cannot carve out of the chunks it holds, so it grows by
the whole block and keeps it: b0..b7 at batch 8 went from 4.4 GiB after warm-up to 7.7 GiB after one burst of
photos (b5..b7 alone +3.3 GiB). A CPU run whose input is at least EFFNET_ORT_SHRINK_MB (default 8: b3 and up
at full batches, never b0..b2) makes the session owe a shrink, and its first run after which no batch
waits asks ORT to shrink the arena when it ends (run option `memory.enable_memory_arena_shrinkage`): the
last batch of a burst gives the memory back, however small it is, and warm-up leaves none behind. Not
every run: faulting the pages in again each time cost b4 15% of its throughput at 32 clients. Below the
threshold, where runs are short and their memory small, nothing changes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger("effnet.sessions")

CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
CPU = "CPUExecutionProvider"
# Where each GPU provider wants its inputs and outputs (the device IOBinding allocates them on).
BUFFER_DEVICE = {TENSORRT: "cuda", CUDA: "cuda"}


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
    bound: "BoundBuffers | None" = None  # on a GPU: inputs and outputs in device buffers of their own
    shrink_above: int | None = None  # input bytes from which a CPU run grows the arena enough to give back...
    idle: Callable[[], bool] = lambda: True  # ...once no other batch waits (the registry asks the batcher)
    owes_shrink: bool = False  # a big run since the last shrink

    def run(self, x: np.ndarray) -> np.ndarray:
        if self.bound is not None:
            return self.bound.run(x)
        if self.shrink_above is not None and x.nbytes >= self.shrink_above:
            self.owes_shrink = True
        if self.owes_shrink and self.idle():  # the burst's last batch, however small: the growth goes back
            self.owes_shrink = False
            return self.session.run([self.output_name], {self.input_name: x}, _SHRINK)[0]
        return self.session.run([self.output_name], {self.input_name: x})[0]


def _shrinking() -> ort.RunOptions:
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


_SHRINK = _shrinking()  # read-only once made: shared by every session's runs


class BoundBuffers:
    """IOBinding over buffers on the device that runs the graph, one input and one output per batch shape,
    made the first time that shape runs (on CUDA the batcher pads to a few sizes, and warm-up runs each).
    A run copies the batch into its input buffer and the logits out of its output buffer: nothing is
    allocated per run, and ORT's own copies around Run() (pageable host memory in, a fresh output out)
    are gone. One run at a time per session, as the batcher runs them."""

    def __init__(self, session: ort.InferenceSession, input_name: str, output_name: str, device: str) -> None:
        self.session, self.input_name, self.output_name = session, input_name, output_name
        self.device = device  # ORT's name for it: "cuda" or "cpu"
        self._slots: dict[tuple[int, ...], tuple[ort.OrtValue, ort.OrtValue, ort.IOBinding]] = {}

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        slot = self._slots.get(x.shape)
        if slot is None:
            slot = self._slots[x.shape] = self._slot(x)
        inp, out, binding = slot
        inp.update_inplace(x)
        self.session.run_with_iobinding(binding)
        # On the GPU numpy() copies to the host; on the CPU it is a view of a buffer the next run reuses.
        return out.numpy() if self.device != "cpu" else out.numpy().copy()

    def _slot(self, x: np.ndarray) -> tuple[ort.OrtValue, ort.OrtValue, ort.IOBinding]:
        # The output's shape from one ordinary run: the graph may leave its class axis symbolic.
        shape = self.session.run([self.output_name], {self.input_name: x})[0].shape
        inp = ort.OrtValue.ortvalue_from_shape_and_type(x.shape, np.float32, self.device, 0)
        out = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, self.device, 0)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, inp)
        binding.bind_ortvalue_output(self.output_name, out)
        return inp, out, binding


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


# EFFNET_ORT_SPINNING=auto spins within runs for models at least this big (b0 and every variant above it, the
# Lites too): their runs are long enough that waking parked threads at each parallel section costs more than
# it saves. A smaller model's run is a fraction of its request; its spinners only take cores from the front end.
SPIN_MIN_MACS = 100_000_000


def spin_for(setting: str, macs: int) -> str:
    """The spinning one model's session gets from EFFNET_ORT_SPINNING (auto: by the model's size)."""
    if setting == "auto":
        return "run" if macs >= SPIN_MIN_MACS else "off"
    return setting


def spin_mode(spinning: bool | str) -> str:
    """EFFNET_ORT_SPINNING as one of "off", "run" (spin within a run only) or "on"; booleans as before."""
    if isinstance(spinning, bool):
        return "on" if spinning else "off"
    if spinning not in ("off", "run", "on"):  # "auto" is decided per model first (spin_for)
        raise ValueError(f"spinning must be off, run or on, not {spinning!r}")
    return spinning


def session_options(threads: int, spinning: bool | str, arena: str = "shared") -> ort.SessionOptions:
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
    mode = spin_mode(spinning)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0" if mode == "off" else "1")
    if mode == "run":  # spin while a run's parallel sections hand work over; park the threads when it returns
        so.add_session_config_entry("session.force_spinning_stop", "1")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: warnings about unused initialisers are noise here
    return so


@dataclass(frozen=True)
class BatchProfile:
    """The input shapes a model will run: one TensorRT engine covers them all (without a profile, TensorRT
    builds an engine per batch size the warm-up runs, minutes each for a big model)."""

    input_name: str
    chw: tuple[int, int, int]
    max_batch: int

    def options(self) -> dict[str, str]:
        c, h, w = self.chw
        shape = lambda n: f"{self.input_name}:{n}x{c}x{h}x{w}"  # noqa: E731
        return {"trt_profile_min_shapes": shape(1), "trt_profile_opt_shapes": shape(self.max_batch),
                "trt_profile_max_shapes": shape(self.max_batch)}


def providers_for(device: str, available: list[str], tensorrt_cache: Path | None,
                  profile: BatchProfile | None = None) -> list:
    """What to ask ORT for, best first. On a GPU: TensorRT (fp16, its engines cached on disk, since building
    one takes minutes) when this onnxruntime has it and EFFNET_TENSORRT is on (tensorrt_cache set), then
    CUDA; the CPU always last, for any node the others do not take."""
    if device != "cuda":
        return [CPU]
    # Arena growth by request size, not by doubling: bounded GPU memory with fixed shapes.
    providers: list = [(CUDA, {"arena_extend_strategy": "kSameAsRequested"}), CPU]
    if tensorrt_cache is not None and TENSORRT in available:
        providers.insert(0, (TENSORRT, {
            "trt_fp16_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(tensorrt_cache),
            **(profile.options() if profile is not None else {}),
        }))
    return providers


def create_session(path: Path, input_name: str, output_name: str, *, device: str, threads: int, spinning: bool | str,
                   arena: str = "shared", tensorrt_cache: Path | None = None,
                   profile: BatchProfile | None = None, shrink_above: int | None = None) -> ModelSession:
    if tensorrt_cache is not None and device == "cuda" and TENSORRT in ort.get_available_providers():
        try:
            tensorrt_cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("no TensorRT engine cache at %s (%s): running on CUDA without TensorRT", tensorrt_cache, exc)
            tensorrt_cache = None
    providers = providers_for(device, ort.get_available_providers(), tensorrt_cache, profile)
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
    if provider not in BUFFER_DEVICE:
        shrink = shrink_above if arena != "off" else None  # without an arena there is nothing to shrink
        return ModelSession(session, input_name, output_name, provider, "cpu", shrink_above=shrink)
    return ModelSession(session, input_name, output_name, provider, "cuda",
                        BoundBuffers(session, input_name, output_name, BUFFER_DEVICE[provider]))
