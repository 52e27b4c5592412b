"""Service configuration, all from EFFNET_* environment variables (pydantic-settings)."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from . import limits

log = logging.getLogger("effnet.config")

# Default max batch per device when nothing more specific is configured. On 2 CPU cores
# batching helps small models (B0: 206 -> 286 img/s from batch 1 to 8) and hurts big ones,
# so 8 is a ceiling the per-model table lowers; on a GPU bigger batches are almost free.
DEFAULT_MAX_BATCH = {"cpu": 8, "cuda": 32}
BATCH_SIZES_FILE = "batch_sizes.json"
_OVERRIDE_PREFIX = "EFFNET_MAX_BATCH_"


def _cores() -> int:
    return limits.cores()


def env_key(model: str) -> str:
    """`phi-0.5` -> `PHI_0_5`: model names may hold `.` and `-`, environment names may not."""
    return re.sub(r"[^A-Z0-9]", "_", model.upper())


def _split(value: Any) -> Any:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class Settings(BaseSettings):
    # An empty variable (EFFNET_THREADS= in a compose file) means "use the default", not "invalid".
    model_config = SettingsConfigDict(env_prefix="EFFNET_", extra="ignore", env_ignore_empty=True)

    repository: Path = Path("models")
    # Empty = every model folder found in the repository.
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    default_model: str = "b0"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # As Triton's --model-control-mode (app/engine/control.py): none, explicit (load/unload requests), poll.
    model_control: Literal["none", "explicit", "poll"] = "none"
    # explicit without EFFNET_API_KEY lets anyone who reaches the port load and unload models: refused at start
    # unless this says the network in front is trusted (see _control_needs_a_key).
    allow_open_control: bool = False
    poll_s: float = Field(default=5.0, gt=0)

    max_batch: int | None = Field(default=None, ge=1, le=1024)
    # Filled from EFFNET_MAX_BATCH_<NAME> variables (see _collect_overrides); keys are env_key(name).
    max_batch_overrides: dict[str, int] = Field(default_factory=dict)
    max_delay_ms: float = Field(default=5.0, ge=0, le=10_000)
    # "incoming": spend the delay only while admitted requests are still decoding (an idle model
    # answers a lone request at once); "always": every partial batch waits the full delay.
    batch_wait: Literal["incoming", "always"] = "incoming"
    # Per model: images queued or held for requests being decoded. The real admission bound.
    max_queue: int = Field(default=256, ge=1)
    # How long a request may wait for queue room before 503; unset = the queue's drain time (1..2 s) at the model's
    # recent speed: a retry storm throttles itself (waiters are woken newest first, so admitted ones barely wait).
    admission_wait_ms: float | None = Field(default=None, ge=0, le=60_000)
    # Requests still sending their body, across models: generous, so slow uploads cannot lock others out.
    max_uploads: int = Field(default=1024, ge=1)
    # uvicorn's bound on connections with a request in progress (+ tasks); beyond it new requests get 503 at
    # once. Connections between requests are bounded apart, as many again per process (app/api/http_protocol.py).
    max_connections: int = Field(default=2048, ge=1)
    # A request's line and headers: at most this big (431 beyond) and in within HEADER_TIMEOUT_S (408).
    max_header_kb: float = Field(default=32.0, gt=0)
    header_timeout_s: float = Field(default=10.0, gt=0)
    # How long a connection may stay idle between requests (uvicorn's timeout_keep_alive).
    keepalive_s: float = Field(default=5.0, gt=0)
    max_body_mb: float = Field(default=20.0, gt=0)
    # The whole body must arrive within this, and after the first second at least MIN_UPLOAD_KBPS.
    body_timeout_s: float = Field(default=15.0, gt=0)
    min_upload_kbps: float = Field(default=16.0, ge=0)
    # An oversized upload is read and thrown away up to this much so the client can read its 413
    # (urllib and requests send the whole body before reading an answer); beyond it the connection closes.
    max_discard_mb: float = Field(default=128.0, ge=0)
    # Bytes of bodies and decoded pixels in flight, across requests; default: a quarter of the container's
    # memory limit (cgroup), at least 256 MB. Beyond it: 503 + Retry-After.
    max_inflight_mb: float = Field(default_factory=limits.default_inflight_mb, gt=0)
    max_image_pixels: int = Field(default=50_000_000, ge=1)
    # Decoded pixels per request, all its images together (a JPEG counts at its draft scale); beyond: 413.
    # Two images at the per-image cap: a 64-part upload of small flat PNGs cannot ask for 3 gigapixels.
    max_request_pixels: int = Field(default=100_000_000, ge=1)
    # The JSON part of a V2 inference request: parsing it holds the GIL, so it is kept small; tensors
    # beyond it go as binary data (tritonclient's default).
    max_json_mb: float = Field(default=4.0, gt=0)
    # Big V2 JSON bodies wait for the one JSON worker process (app/api/v2/json_worker.py): at most this many at
    # once (a 4 MB body parses in under 0.5 s, so the last waits a few seconds), each at most TIMEOUT_S; 503 beyond.
    json_worker_queue: int = Field(default=8, ge=1)
    json_worker_timeout_s: float = Field(default=5.0, gt=0)
    # Requests that waited longer are dropped before inference (503); a client's X-Request-Timeout-Ms
    # (or Envoy's x-envoy-expected-rq-timeout-ms) can only shorten it.
    request_timeout_s: float = Field(default=30.0, gt=0)
    drain_s: float = Field(default=20.0, ge=0)
    # Which models /health/ready waits for (app/engine/registry.py Registry.ready; the README's model control).
    # Unset (default): the models asked for at start (EFFNET_MODELS, or every folder there then) must serve; one
    # that appears later and fails never makes a serving server unready. true (Triton's --strict-readiness):
    # every model in the repository, later ones too. false: loading is over and at least one model serves.
    strict_readiness: bool | None = None
    # One access-log line per request (method, path, model, status, images, ms, request id).
    access_log: bool = True
    # The V2 protocol over gRPC (app/api/grpc), beside HTTP; 0 turns it off.
    grpc_port: int = Field(default=8001, ge=0, le=65535)
    # gRPC's own bind address; unset: the HTTP host. gRPC has no per-route exemptions, so an operator may
    # want it on a private interface while HTTP faces the load balancer.
    grpc_host: str | None = None
    # gRPC streams (calls) one connection may hold open at once; more are refused (grpc.max_concurrent_streams).
    grpc_max_streams: int = Field(default=100, ge=1, le=65536)
    # A gRPC connection with no call for this long is closed; any connection is closed at this age (clients reconnect).
    grpc_idle_s: float = Field(default=300.0, gt=0)
    grpc_max_age_s: float = Field(default=1800.0, gt=0)
    # TLS for both protocols (PEM files); both or neither. Unset: plaintext (terminate TLS in front).
    tls_cert: Path | None = None
    tls_key: Path | None = None

    # Total intra-op thread budget for ONNX Runtime; see sessions.py for how it is spent.
    threads: int = Field(default_factory=_cores, ge=1)
    # ORT's threads spinning for work (app/engine/sessions.py): "auto" spins within runs ("run") for models of
    # 100M MACs and up, not at all for smaller ones; "off"; "run"; "on" (ORT's default: also between runs).
    ort_spinning: Literal["auto", "off", "run", "on"] = "auto"
    # ORT's CPU memory arena: one shared by all sessions (default; see app/engine/sessions.py), one per
    # session (ORT's default: fastest, but every session keeps its peak), or none.
    ort_arena: Literal["shared", "per-session", "off"] = "shared"
    # A CPU run whose input is at least this big gives back what the arena grew for it (sessions.py); 0: never.
    ort_shrink_mb: float = Field(default=8.0, ge=0)
    # On a GPU, TensorRT (fp16) ahead of CUDA when onnxruntime-gpu has it; its engines take minutes to
    # build, so they are cached here (mount a volume there to keep them across restarts).
    tensorrt: bool = True
    tensorrt_cache: Path = Path.home() / ".cache" / "effnet" / "tensorrt"
    # Front-end worker processes (HTTP, gRPC, bodies, decode) over one engine process that owns the models
    # (app/supervisor.py); default: the CPU quota. 1: everything in one process.
    workers: int = Field(default_factory=_cores, ge=1, le=256)
    # Shared memory per worker for the tensors it hands the engine (EFFNET_WORKERS > 1); /dev/shm must hold
    # workers x this (Docker's default /dev/shm is 64 MB: set shm_size).
    shm_mb: int = Field(default=256, ge=8, le=65536)
    # Decode + preprocess pool. Pillow releases the GIL while decoding and resizing.
    decode_workers: int = Field(default_factory=_cores, ge=1)

    api_key: SecretStr | None = None
    # Path prefixes reachable without the API key.
    api_key_exempt: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["/health", "/v2/health", "/metrics"])
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)  # empty = CORS off
    # The page at / for a person (app/api/ui.py): photos in, answers and the accuracy-vs-MACs chart out; false turns
    # it off (/ answers 404). /docs (Swagger UI, served from installed files) stays on either way.
    ui: bool = True

    # model=auto (app/policies/routing.py): the latency budget when the request gives no budget_ms.
    default_budget_ms: float = Field(default=100.0, gt=0)
    # model=cascade (app/policies/cascade.py): the cascade it means, cheapest first, and the top-1
    # probability under which an image is passed on to the next model.
    default_cascade: Annotated[list[str], NoDecode] = Field(default_factory=list)
    cascade_threshold: float = Field(default=0.6, ge=0, le=1)

    @field_validator("models", "api_key_exempt", "cors_origins", "default_cascade", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:
        return _split(v)

    @field_validator("ort_spinning", mode="before")
    @classmethod
    def _spinning_bool(cls, v: Any) -> Any:
        # true/false as before: ORT's own spinning, or none.
        if isinstance(v, bool):
            return "on" if v else "off"
        if isinstance(v, str) and v.lower() in ("true", "1", "yes", "false", "0", "no"):
            return "on" if v.lower() in ("true", "1", "yes") else "off"
        return v

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, v: Any) -> Any:
        return None if v == "" else v

    @model_validator(mode="after")
    def _tls_pair(self) -> "Settings":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("EFFNET_TLS_CERT and EFFNET_TLS_KEY go together: set both or neither")
        return self

    @model_validator(mode="after")
    def _control_needs_a_key(self) -> "Settings":
        # The load/unload routes as app/api/security.py's exemption matching sees them ("/" exempts everything).
        route = "/v2/repository/models/m/load"
        open_route = any(route == p.rstrip("/") or route.startswith(p.rstrip("/") + "/")
                         for p in self.api_key_exempt if p)
        if self.model_control == "explicit" and (self.api_key is None or open_route) and not self.allow_open_control:
            why = "EFFNET_API_KEY is not set" if self.api_key is None else "EFFNET_API_KEY_EXEMPT covers /v2/repository"
            raise ValueError(
                f"EFFNET_MODEL_CONTROL=explicit lets any client load and unload models, and {why}: set "
                "EFFNET_API_KEY (and keep /v2/repository out of EFFNET_API_KEY_EXEMPT), or set "
                "EFFNET_ALLOW_OPEN_CONTROL=true if only trusted clients can reach the port")
        return self

    @model_validator(mode="after")
    def _collect_overrides(self) -> "Settings":
        # pydantic-settings cannot express "every variable with this prefix", so read them here.
        found: dict[str, int] = {}
        for key, value in os.environ.items():
            if key.upper().startswith(_OVERRIDE_PREFIX) and key.upper() != "EFFNET_MAX_BATCH_OVERRIDES":
                try:
                    n = int(value)
                except ValueError:
                    raise ValueError(f"{key} must be an integer") from None
                if n < 1:
                    raise ValueError(f"{key} must be >= 1")
                found[key.upper()[len(_OVERRIDE_PREFIX):]] = n
        self.max_batch_overrides = {**found, **{env_key(k): v for k, v in self.max_batch_overrides.items()}}
        return self

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def max_header_bytes(self) -> int:
        return int(self.max_header_kb * 1024)

    @property
    def max_json_bytes(self) -> int:
        return int(self.max_json_mb * 1024 * 1024)

    @property
    def max_discard_bytes(self) -> int:
        return int(self.max_discard_mb * 1024 * 1024)

    @property
    def max_inflight_bytes(self) -> int:
        return int(self.max_inflight_mb * 1024 * 1024)

    def max_batch_for(self, model: str, device: str, table: dict[str, int] | None = None) -> int:
        """Most specific wins: EFFNET_MAX_BATCH_<NAME> > batch_sizes.json > EFFNET_MAX_BATCH > device default."""
        key = env_key(model)
        if key in self.max_batch_overrides:
            return self.max_batch_overrides[key]
        if table and model in table:
            return table[model]
        if self.max_batch is not None:
            return self.max_batch
        return DEFAULT_MAX_BATCH.get(device, 8)


def read_batch_table(repository: Path, device: str) -> dict[str, int]:
    """`batch_sizes.json` in the repository root, written by the benchmark.

    Either flat ({"b0": 8, "b4": 1}) or per device ({"cpu": {...}, "cuda": {...}}), since the
    best size is a property of the device as much as of the model. A bad file is ignored
    with a warning: it is a tuning hint, not something worth refusing to start over.
    """
    path = repository / BATCH_SIZES_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get(device), dict):
            data = data[device]
        if not isinstance(data, dict):
            raise ValueError("not an object")
        return {str(k): int(v) for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool) and v >= 1}
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return {}


def write_batch_table(repository: Path, device: str, sizes: dict[str, int]) -> dict:
    """Merge `sizes` (model -> best batch on `device`) into the repository's batch_sizes.json and return the
    whole table. Entries for other models and other devices are kept; a flat table from before is taken as
    this device's, and an unreadable one is replaced."""
    path = repository / BATCH_SIZES_FILE
    data: dict = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {}
    if not isinstance(data, dict):
        data = {}
    if data and not all(isinstance(v, dict) for v in data.values()):
        data = {device: {k: v for k, v in data.items() if isinstance(v, int)},
                **{k: v for k, v in data.items() if isinstance(v, dict)}}
    data.setdefault(device, {}).update(sizes)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)  # a server starting meanwhile reads the old table or the new one, never half of one
    return data
