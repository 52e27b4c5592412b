"""Every benchmark's results as typed records: one JSON object a line in docs/benchmarks.jsonl, each with its kind
and the id of the run it belongs to. A run appends its records, headed by a Run (`make bench`) or a Bench (every
other `make bench-*`); the report and the targets read the latest run of each benchmark."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class Run:
    """How the run was made: command, machine, the plan's settings, how long it took and what else ran."""
    command: str
    quick: bool
    started: str
    machine: dict[str, Any]  # benchmarks.blocks.machine_info()
    models: list[str]  # raw ORT
    full: list[str]  # the matrix; full[0] is the headline model (peers, perf_analyzer, arena)
    loaded: list[str]  # loaded into the service
    phases: list[str]
    concurrency: list[int]
    window_s: float
    warmup_s: float
    raw_s: float
    repo: str
    threads: int  # the server's intra-op threads
    ort_arena: str
    ort_spinning: str
    burst_clients: int
    burst_s: float
    perf_interval_ms: int
    perf_trials: int
    finished: str = ""
    run_s: float = 0.0
    build_s: float = 0.0
    pytriton_setup_s: float | None = None
    loadavg: list[float] = field(default_factory=list)  # 1-minute load average at the start and the end
    others_cpu_pct: float | None = None  # other processes' CPU during the run, % of one core


@dataclass
class Model:
    """A model of the run, from its manifest; the best batch of the server's session from the raw phase."""
    name: str
    px: int
    macs: int
    params: int | None = None
    best_batch: int | None = None
    best_batch_written: bool = False


@dataclass
class OrtTiming:
    """`session.run` in a loop in the benchmark's process. phase: raw; session: default | server."""
    phase: str
    model: str
    session: str
    batch: int
    img_per_s: float
    ms_p50: float
    cpu_ms_per_img: float
    runs: int


@dataclass
class BatchTable:
    """Best batch sizes written to a repository's batch_sizes.json."""
    path: str
    device: str
    written: dict[str, int]


@dataclass
class LoadWindow:
    """benchmarks.loadgen against one server: N closed-loop clients over one window. body: raw | multipart | v2."""
    server: str
    model: str
    input: str  # model-res | photo
    body: str
    clients: int
    body_bytes: int
    ok: int
    errors: int
    unfinished: int
    img_per_s: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    server_cpu_pct: float | None
    server_cpu_ms_per_img: float | None
    mean_batch: float | None = None
    timing_ms: dict[str, float] = field(default_factory=dict)  # the service's own timing_ms (sampled answers)
    stage_cpu_ms: dict[str, float] = field(default_factory=dict)  # server CPU ms per image by thread stage
    raw_batch: int | None = None  # raw ORT's default session, measured right next to the window
    raw_img_per_s: float | None = None
    raw_ms_p50: float | None = None

    @classmethod
    def of(cls, r: dict, *, server: str, model: str, kind: str, body: str, body_bytes: int, **extra: Any) -> LoadWindow:
        """From benchmarks.loadgen's answer."""
        return cls(server=server, model=model, input=kind, body=body, clients=r["concurrency"], body_bytes=body_bytes,
                   ok=r["ok"], errors=r["errors"], unfinished=r["unfinished"], img_per_s=r["img_per_s"], p50_ms=r["p50_ms"],
                   p95_ms=r["p95_ms"], p99_ms=r["p99_ms"], server_cpu_pct=r.get("server_cpu_pct"),
                   server_cpu_ms_per_img=r.get("server_cpu_ms_per_img"), timing_ms=r.get("server_timing_ms") or {}, **extra)


@dataclass
class Server:
    """A server the windows ran against: its start, its process group's memory after the load, or why it did not run."""
    name: str
    what: str
    ready_s: float | None = None
    rss_kib: int | None = None
    note: str = ""


@dataclass
class ServiceMemory:
    """VmRSS of `effnet serve` with every memory model loaded, at three points (KiB)."""
    models: list[str]
    ready_s: float
    max_batch: dict[str, int | None]
    idle_kib: int
    after_burst_kib: int
    after_load_kib: int
    hwm_kib: int


@dataclass
class PerfRow:
    """One Triton perf_analyzer run against the service (binary FP32 tensors)."""
    protocol: str
    model: str
    batch: int
    requested_batch: int
    concurrency: int
    request_mb: float
    status: str
    img_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    stable: bool | None = None
    stability_pct: int | None = None
    command: str = ""
    rc: int = 0


# --- the other benchmarks: a Bench heads each run; then its own kinds --------------------------------------------
@dataclass
class Bench:
    """One run of `make bench-NAME`: its command, when, on what, how long, and what it was set to."""
    name: str  # precision | memory | soak | reliability | scaling | quiet | timeline | gpu
    command: str
    date: str
    machine: dict[str, Any]
    seconds: float | None = None
    quick: bool = False
    label: str = ""  # timeline: its block of docs/timeline.md (before, after, ...)
    settings: dict[str, Any] = field(default_factory=dict)
    others_cpu_pct: float | None = None  # other processes' CPU during the run, % of one core

    @property
    def key(self) -> str:
        return f"{self.name}-{self.label}" if self.label else self.name


@dataclass
class Precision:
    """bench-precision: one copy of a model; fp16 and int8 with effnet build's agreement gate against fp32."""
    model: str
    precision: str
    size_bytes: int
    img_per_s: dict[str, float]  # batch -> raw ORT img/s
    agreement: float | None = None
    max_abs_diff: float | None = None  # of the logits
    inputs: int | None = None  # photos x views
    images: int | None = None
    views: int | None = None
    top1: int | None = None  # hits on the labelled photos
    top1_fp32: int | None = None
    labelled: int | None = None
    ships: bool | None = None  # at the default 99% gate


@dataclass
class Footprint:
    """bench-memory: PSS and RSS (bytes) of one kind of process of the service. when: ready | peak | after."""
    workers: int
    when: str
    process: str
    pss: int
    rss: int


@dataclass
class Answers:
    """Status codes of a burst's answers (bench-memory: a burst on one model with `workers`)."""
    workers: int
    model: str
    codes: dict[str, int]


@dataclass
class Soak:
    """bench-memory --soak: RSS (KiB, every process) after warm-up and at the end of a long burst."""
    loaded: list[str]
    models: list[str]  # the burst rotates over them
    minutes: float
    clients: int
    requests: int
    errors: int
    warm_kib: int
    end_kib: int
    hwm_kib: int | None = None  # the peaks (VmHWM) summed


@dataclass
class SoakSample:
    """bench-memory --soak: RSS (KiB) after one segment of the burst."""
    t_s: float
    model: str
    rss_kib: int


@dataclass
class Throughput:
    """bench-scaling: a contender's images per second on one case: the median of its windows."""
    case: str
    model: str
    image: str
    clients: int
    contender: str
    img_per_s: float
    windows: list[float]
    cores: float | None = None  # the CPU the server's processes kept busy (median over its windows; HTTP only)


@dataclass
class Latency:
    """bench-quiet: a contender on one case, the medians over its windows."""
    model: str
    case: str
    clients: int
    contender: str
    p50_ms: float | None
    p99_ms: float | None
    img_per_s: float | None
    windows: list[dict[str, Any]]


@dataclass
class ClosedLoop:
    """bench-reliability's storm: closed-loop clients over one window. window: before | storm | after."""
    window: str
    model: str
    queue: int
    clients: int
    seconds: float
    ok: int
    refused: int
    errors: int
    goodput: float
    p50_ms: float | None
    p99_ms: float | None


@dataclass
class Bursts:
    """bench-reliability: bursts of accepted requests against a small queue; bound = (queue / batch + 2) batch times."""
    queue: int
    max_batch: int
    clients: int
    bursts: int
    accepted: int
    refused: int
    p50_ms: float | None
    p99_ms: float | None
    batch_ms: float
    mean_batch: float
    bound_ms: float
    rps_before: float
    rps_during: float
    rps_after: float


@dataclass
class Probes:
    """bench-reliability: requests timed one at a time. scenario: stalled | v2 flood; when: quiet | held | flood;
    what: live (/health/live) | request (a normal one). hostile: the flood's answers by body."""
    scenario: str
    when: str
    what: str
    n: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    hostile: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class MemoryBurst:
    """bench-reliability: the memory burst's RSS (MB, every process) against the footprint and the budget."""
    model: str
    budget_mb: int
    allowed_mb: int
    loaded_mb: int
    footprint_mb: int
    peak_mb: int
    after_mb: int
    seconds: float
    requests: dict[str, int]
    attempts: dict[str, int]
    final: dict[str, dict[str, int]]
    bad_refusals: int = 0
    warm: dict[str, int] = field(default_factory=dict)  # the full-batch warm-up's answers


@dataclass
class Hops:
    """bench-timeline: one layout's request hop by hop, each hop's median in ms; the client's median untraced."""
    layout: str
    requests: int
    median_ms: dict[str, float]
    untraced_median_ms: float


@dataclass
class GpuRow:
    """bench-gpu: one measurement. path: raw ORT CUDA | TensorRT fp16 | raw ORT CPU | service ...; load: batch B |
    N clients; p50 per call (a batch for raw and gRPC, an image for HTTP); a row that could not run says why."""
    model: str
    path: str
    device: str
    load: str
    img_per_s: float | None = None
    p50_ms: float | None = None
    note: str = ""


Record = Any  # one of KINDS
KINDS: dict[str, type] = {c.__name__: c for c in (Run, Model, OrtTiming, BatchTable, LoadWindow, Server, ServiceMemory, PerfRow,
                                                  Bench, Precision, Footprint, Answers, Soak, SoakSample, Throughput, Latency,
                                                  ClosedLoop, Bursts, Probes, MemoryBurst, Hops, GpuRow)}


def append(path: Path, run_id: str, records: list[Record]) -> None:
    with path.open("a") as f:
        for r in records:
            f.write(json.dumps({"kind": type(r).__name__, "run": run_id, **asdict(r)}) + "\n")


def runs(path: Path) -> dict[str, list[Record]]:
    """The latest run of each benchmark in a JSON-lines file ("run": `make bench`; else Bench.key). Kinds and fields
    a run wrote that this code no longer has (the phases since dropped: arena, padding, prep) are left out."""
    groups: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        if line.strip():
            d = json.loads(line)
            groups.setdefault(d["run"], []).append(d)
    out: dict[str, list[Record]] = {}
    for rows in groups.values():
        recs = []
        for d in rows:
            if (kind := KINDS.get(d["kind"])) and d.get("phase", "raw") == "raw":
                names = {f.name for f in fields(kind)}
                recs.append(kind(**{k: v for k, v in d.items() if k in names}))
        head = next((r for r in recs if isinstance(r, Run | Bench)), None)
        if head is not None:
            out["run" if isinstance(head, Run) else head.key] = recs
    return out


def latest(path: Path, bench: str = "run") -> list[Record]:
    """The records of the latest run of one benchmark."""
    if not (recs := runs(path).get(bench)):
        raise SystemExit(f"{path} holds no run of {bench}")
    return recs


def of(records: list[Record], kind: type) -> list:
    return [r for r in records if isinstance(r, kind)]


class Results:
    """One run's records of `make bench`, with the look-ups the report and the targets make."""

    def __init__(self, records: list[Record]) -> None:
        self.records = records
        self.run: Run = next(r for r in records if isinstance(r, Run))
        self.models = {r.name: r for r in records if isinstance(r, Model)}
        self.memory = next((r for r in records if isinstance(r, ServiceMemory)), None)
        self.top_n = max(self.run.concurrency)
        self.head = self.run.full[0]

    def of(self, kind: type) -> list:
        return of(self.records, kind)

    def ort(self, phase: str, model: str, session: str, batch: int) -> OrtTiming | None:
        return next((r for r in self.of(OrtTiming) if (r.phase, r.model, r.session, r.batch) == (phase, model, session, batch)),
                    None)

    def window(self, server: str, model: str, kind: str, clients: int, body: str | None = None) -> LoadWindow | None:
        return next((w for w in self.of(LoadWindow) if (w.server, w.model, w.input, w.clients) == (server, model, kind, clients)
                     and body in (None, w.body)), None)

    def service(self, model: str, kind: str, clients: int, body: str = "raw") -> LoadWindow | None:
        return self.window("service", model, kind, clients, body)
