"""The main benchmark's results as typed records: one JSON object a line in docs/benchmarks.jsonl, each with its
kind and the id of the run it belongs to (the run's start time). A run appends its records; the report and the
targets read the latest run's."""

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


Record = Run | Model | OrtTiming | BatchTable | LoadWindow | Server | ServiceMemory | PerfRow
KINDS: dict[str, type] = {c.__name__: c for c in (Run, Model, OrtTiming, BatchTable, LoadWindow, Server, ServiceMemory,
                                                  PerfRow)}


def append(path: Path, run_id: str, records: list[Record]) -> None:
    with path.open("a") as f:
        for r in records:
            f.write(json.dumps({"kind": type(r).__name__, "run": run_id, **asdict(r)}) + "\n")


def latest(path: Path) -> list[Record]:
    """The records of the last run in a JSON-lines file. Kinds and fields a run wrote that this code no longer has
    (the phases since dropped: arena, padding, prep) are left out; they stay in the file."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{path} holds no run")
    last = rows[-1]["run"]
    out = []
    for d in rows:
        if d["run"] == last and (kind := KINDS.get(d["kind"])) and d.get("phase", "raw") == "raw":
            names = {f.name for f in fields(kind)}
            out.append(kind(**{k: v for k, v in d.items() if k in names}))
    return out


class Results:
    """One run's records, with the look-ups the report and the targets make."""

    def __init__(self, records: list[Record]) -> None:
        self.records = records
        self.run: Run = next(r for r in records if isinstance(r, Run))
        self.models = {r.name: r for r in records if isinstance(r, Model)}
        self.memory = next((r for r in records if isinstance(r, ServiceMemory)), None)
        self.top_n = max(self.run.concurrency)
        self.head = self.run.full[0]

    def of(self, kind: type) -> list:
        return [r for r in self.records if isinstance(r, kind)]

    def ort(self, phase: str, model: str, session: str, batch: int) -> OrtTiming | None:
        return next((r for r in self.of(OrtTiming) if (r.phase, r.model, r.session, r.batch) == (phase, model, session, batch)),
                    None)

    def window(self, server: str, model: str, kind: str, clients: int, body: str | None = None) -> LoadWindow | None:
        return next((w for w in self.of(LoadWindow) if (w.server, w.model, w.input, w.clients) == (server, model, kind, clients)
                     and body in (None, w.body)), None)

    def service(self, model: str, kind: str, clients: int, body: str = "raw") -> LoadWindow | None:
        return self.window("service", model, kind, clients, body)
