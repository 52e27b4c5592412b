"""Which models exist, which of them serve, and why the others do not; loading, reloading, unloading.

A model that cannot be served (missing or corrupt file, checksum mismatch, invalid manifest, ORT refuses
the graph, warm-up fails) is disabled alone with a reason that `/models` and `/health/ready` show; the rest
of the repository keeps serving. Loading runs in the background so `/health/live` answers while big models
load.

A reload builds and warms the new version beside the old one, then swaps the registry's entry in one step:
requests that already hold the old entry finish on it (a request that had not reserved queue room yet
follows `successor` to the new one), new requests get the new one, and the old batcher drains and stops.
A reload whose new files are broken leaves the old version serving and says why: the serving entry keeps
that reason as its `drift` (the files on disk are not what serves), shown beside READY until a reload works.

Readiness (`ready`, EFFNET_STRICT_READINESS) follows the models the operator asked for at start, not whatever
appears in the repository later: see `Registry.ready`.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .batcher import Batcher
from .queue_room import QueueRoom
from ..core.config import Settings, read_batch_table
from ..core.errors import ControlError, Unavailable, VersionStopped
from .facade import index_state, loaded_manifest
from .manifest import MANIFEST_FILE, NAME_PATTERN, Manifest, ManifestError, load_manifest, verify_onnx
from .observe import Observer
from .sessions import BatchProfile, ModelSession, SessionError, create_session, resolve_device, spin_for

log = logging.getLogger("effnet.registry")

Status = Literal["loading", "ready", "unavailable"]


UNLOADED = "unloaded"  # the reason of a model stopped on request (not a failure: readiness ignores it)

_revisions = itertools.count(1)


class NoSuchModel(ControlError):
    """A load or unload named a model the repository does not have: nothing is recorded for it (no entry,
    no lock, no metric series), so the names a client tries cannot grow the registry."""


@dataclass
class ModelEntry:
    name: str
    folder: Path
    status: Status = "loading"
    reason: str | None = None
    manifest: Manifest | None = None
    session: ModelSession | None = None
    batcher: Batcher | None = None
    max_batch: int | None = None
    successor: ModelEntry | None = None  # set when a reload replaced this entry
    declared: str | None = None  # the version its manifest declares, once the manifest is read (loaded or not)
    drift: str | None = None  # serving, but the files on disk failed to load as its successor: why
    # Which entry and manifest a copy of it (a worker's view) is of, growing with each: a reload of a corrected
    # manifest beside the same ONNX file keeps the version but changes labels or preprocessing (link/server.py).
    revision: int = field(default_factory=lambda: next(_revisions))

    @property
    def spec(self) -> Manifest:
        """The manifest of a version that loaded (an entry a call holds has one)."""
        return loaded_manifest(self.name, self.manifest)

    @property
    def room(self) -> QueueRoom:
        """Its batcher's queue room; an entry unloaded meanwhile (no batcher) is refused as unavailable."""
        if self.batcher is None:
            raise Unavailable(f"model {self.name} is not loaded")
        return self.batcher.room

    @property
    def provider(self) -> str | None:
        return self.session.provider if self.session else None

    @property
    def version(self) -> str | None:
        """Changes whenever the model's ONNX file changes: the first 12 hex digits of its sha256."""
        return self.manifest.onnx.sha256[:12] if self.manifest is not None else None

    def fail(self, reason: str) -> None:
        self.status, self.reason = "unavailable", reason
        self.session = None
        # "could not be loaded", not "unavailable": a failed reload's candidate fails while the old version serves.
        log.error("model %s could not be loaded: %s", self.name, reason)


def drift_reason(serving: ModelEntry, candidate: ModelEntry) -> str:
    """Why the files on disk are not what serves: the candidate that failed (the version its manifest
    declares, when it could be read) and why, and which version serves instead."""
    which = f"candidate {candidate.declared}" if candidate.declared else "candidate on disk"
    return f"version {serving.version} serves; the files on disk failed to load ({which}): {candidate.reason}"


def model_folders(root: Path) -> list[str]:
    """Every complete model folder in the repository. Hidden folders are the build's temporary ones (it
    renames a folder into place only once complete); a folder without a manifest is not a model."""
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_FILE).is_file()
    )


def discover(settings: Settings) -> list[str]:
    """The configured names, or every complete model folder in the repository."""
    if settings.models:
        return list(dict.fromkeys(settings.models))
    return model_folders(settings.repository)


def valid_name(name: str) -> bool:
    # fullmatch: with re.match, "$" also matches before a trailing newline ("zz\n" would pass).
    return bool(re.fullmatch(NAME_PATTERN, name)) and len(name) <= 64


class Registry:
    def __init__(self, settings: Settings, observer: Observer | None = None) -> None:
        self.settings = settings
        self.observer = observer or Observer()
        self.entries: dict[str, ModelEntry] = {
            name: ModelEntry(name, settings.repository / name) for name in discover(settings)
        }
        self.loaded = False  # every entry reached ready or unavailable
        # What the operator asked for at start (EFFNET_MODELS, or every folder then): what readiness waits for.
        self.asked: tuple[str, ...] = tuple(self.entries)
        self._locks: dict[str, asyncio.Lock] = {}
        self._retiring: set[asyncio.Task] = set()  # old versions draining after a swap

    # --- queries ---------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.entries)

    @property
    def default_model(self) -> str | None:
        if self.settings.default_model in self.entries:
            return self.settings.default_model
        ready = [n for n, e in self.entries.items() if e.status == "ready"]
        return ready[0] if ready else next(iter(self.entries), None)

    def not_ready(self) -> dict[str, str]:
        """Models that should serve and do not, with why (a model unloaded on request is not among them)."""
        return {n: (e.reason or e.status) for n, e in self.entries.items()
                if e.status != "ready" and e.reason != UNLOADED}

    @property
    def ready(self) -> bool:
        """Ready to take traffic: at least one model serves, and (EFFNET_STRICT_READINESS)
        * unset (default): loading is over and every model asked for at start serves. A model that appears
          later and fails does not count: the same bad folder on a shared volume would otherwise take every
          replica out of rotation at once. A reload that fails keeps the old version, so it keeps serving.
        * true (Triton's --strict-readiness): every model in the repository serves, later ones too.
        * false: loading is over (the broken ones are listed beside "ready").
        A model unloaded on request (or whose folder went away) never counts."""
        if not any(e.status == "ready" for e in self.entries.values()):
            return False
        strict, missing = self.settings.strict_readiness, self.not_ready()
        if strict:  # every model in the repository
            return not missing
        if strict is None:  # the models asked for at start
            return self.loaded and not missing.keys() & set(self.asked)
        return self.loaded

    # --- loading ---------------------------------------------------------------------
    def _load_blocking(self, entry: ModelEntry, tables: dict[str, dict[str, int]]) -> None:
        if not valid_name(entry.name):
            raise ManifestError("not a valid model name")
        if not entry.folder.is_dir():
            raise ManifestError(f"no folder {entry.name!r} in the repository")
        manifest = load_manifest(entry.folder)
        entry.declared = manifest.onnx.sha256[:12]
        if manifest.name != entry.name:
            raise ManifestError(f"manifest name {manifest.name!r} does not match its folder")
        onnx_path = verify_onnx(entry.folder, manifest)
        device = resolve_device(self.settings.device)
        entry.manifest = manifest
        entry.revision = next(_revisions)  # another manifest: a worker's copy of the entry before this is stale
        crop = manifest.preprocess.crop
        profile = BatchProfile(manifest.onnx.input.name, (3, crop, crop), self._max_batch(entry.name, "cuda", tables))
        entry.session = create_session(
            onnx_path, manifest.onnx.input.name, manifest.onnx.output.name,
            device=device, threads=self.settings.threads, spinning=spin_for(self.settings.ort_spinning, manifest.macs),
            arena=self.settings.ort_arena,
            tensorrt_cache=self.settings.tensorrt_cache if self.settings.tensorrt else None, profile=profile,
            shrink_above=int(self.settings.ort_shrink_mb * (1 << 20)) if self.settings.ort_shrink_mb else None,
        )
        # The batch table of the device that actually runs the graph (auto may pick CUDA, CUDA may fall back).
        entry.max_batch = self._max_batch(entry.name, entry.session.device, tables)

    def _max_batch(self, name: str, device: str, tables: dict[str, dict[str, int]]) -> int:
        if device not in tables:
            tables[device] = read_batch_table(self.settings.repository, device)
        return self.settings.max_batch_for(name, device, tables[device])

    async def _bring_up(self, entry: ModelEntry, tables: dict[str, dict[str, int]]) -> None:
        """Load, warm and start one entry; on failure it is marked unavailable with a reason."""
        stage = "load"
        try:
            await asyncio.to_thread(self._load_blocking, entry, tables)
            assert entry.session is not None and entry.manifest is not None and entry.max_batch
            crop = entry.manifest.preprocess.crop
            batcher = Batcher(
                name=entry.name,
                run=entry.session.run,
                max_batch=entry.max_batch,
                max_delay_s=self.settings.max_delay_ms / 1000.0,
                wait_always=self.settings.batch_wait == "always",
                max_queue=self.settings.max_queue,
                timeout_s=self.settings.request_timeout_s,
                pad=entry.session.device == "cuda",
                observer=self.observer.batches(entry.name),
            )
            entry.session.idle = lambda: batcher.depth == 0  # big runs shrink the arena only when none waits
            stage = "warm-up"
            await asyncio.to_thread(batcher.warm_up, (3, crop, crop))
            batcher.start()
            entry.batcher = batcher
            entry.status = "ready"
            log.info("model %s (version %s) ready on %s, max batch %d", entry.name, entry.version, entry.provider,
                     entry.max_batch)
        except (ManifestError, SessionError) as exc:
            entry.fail(str(exc))
        except Exception as exc:  # noqa: BLE001 - e.g. warm-up crashed: this model only
            # The exception's class and text are internals (ORT's messages name files and
            # nodes): they go to the log; /models and /health/ready get the stage only.
            log.error("model %s: %s failed: %s: %s", entry.name, stage, type(exc).__name__, exc)
            entry.fail("the warm-up run failed" if stage == "warm-up" else "failed to load (see the server log)")

    async def load_all(self) -> None:
        """Load, warm and start every entry, one at a time (memory and cores are shared)."""
        tables: dict[str, dict[str, int]] = {}  # batch_sizes.json per device, read once each
        for entry in list(self.entries.values()):
            async with self._lock(entry.name):
                if self.entries.get(entry.name) is not entry:  # loaded or replaced meanwhile (model control)
                    continue
                await self._bring_up(entry, tables)
                if entry.status == "ready":
                    self._serving(entry)
        self.loaded = True

    def _serving(self, entry: ModelEntry) -> None:
        if entry.manifest is not None:
            self.observer.model_serving(entry.name, entry.manifest, entry.provider or "")

    # --- model control -----------------------------------------------------------------
    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def load(self, name: str) -> ModelEntry:
        """Load `name` from its folder, or reload it: the new version is warmed beside the old one and swapped
        in at once. Raises ControlError (the old version, if any, keeps serving)."""
        if not valid_name(name):
            raise ControlError("not a valid model name")
        folder = self.settings.repository / name
        # Entries exist only for the models asked for at start and folders on disk, which clients cannot create.
        if name not in self.entries and not folder.is_dir():
            raise NoSuchModel(f"no model {name!r} in the repository")
        async with self._lock(name):
            old = self.entries.get(name)
            new = ModelEntry(name, folder)
            if old is None:
                self.entries[name] = new  # visible as LOADING while it loads
            await self._bring_up(new, {})
            if new.status != "ready":
                if old is None or old.status != "ready":
                    self.entries[name] = new
                    raise ControlError(f"model {name!r} could not be loaded: {new.reason}")
                old.drift = drift_reason(old, new)
                raise ControlError(f"model {name!r} could not be loaded: {new.reason}; the previous version keeps serving")
            self.entries[name] = new
            if old is not None and old is not new:
                old.successor = new
                self._retire(old)
            self._serving(new)
            return new

    async def unload(self, name: str) -> None:
        """Stop serving `name` once its queued work is done; it stays listed as unavailable ("unloaded")."""
        if name not in self.entries:  # before the lock: an unknown name leaves nothing behind
            raise NoSuchModel(f"model {name!r} is not loaded")
        async with self._lock(name):
            entry = self.entries.get(name)
            if entry is None:
                raise ControlError(f"model {name!r} is not loaded")
            entry.status, entry.reason = "unavailable", UNLOADED
            batcher, entry.batcher = entry.batcher, None
            self.observer.model_stopped(name)
            if batcher is not None:
                await batcher.stop(self.settings.drain_s, lambda: VersionStopped(
                    f"model {name!r} was unloaded before this request ran", retry_after=30, reason=UNLOADED))
            entry.session = None

    def _retire(self, old: ModelEntry) -> None:
        """Let the replaced version finish what it holds, then stop it, in the background."""
        if old.batcher is None:
            return
        # Its waiters for room go on to the successor (DataPlane.moved_on); what is still queued when the drain
        # ends is refused with this, a retry reaching the new version.
        stopped = functools.partial(VersionStopped, f"model {old.name!r} was reloaded and the version this request "
                                    f"was queued on stopped before running it (EFFNET_DRAIN_S); retry", retry_after=1)
        task = asyncio.get_running_loop().create_task(old.batcher.stop(self.settings.drain_s, stopped),
                                                      name=f"retire-{old.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def index(self) -> list[dict[str, str]]:
        """Every model folder in the repository and every model known, as the V2 repository extension lists
        them: name, and for those loaded or tried, version, state (READY, UNAVAILABLE, LOADING) and reason."""
        out = []
        for name in sorted(set(model_folders(self.settings.repository)) | set(self.entries)):
            e = self.entries.get(name)
            row: dict[str, str] = {"name": name}
            if e is not None:
                if e.version:
                    row["version"] = e.version
                row["state"] = index_state(e.status)
                reason = e.reason or e.drift
                if reason:
                    row["reason"] = reason
            out.append(row)
        return out

    async def close(self, drain_s: float) -> None:
        """Stop every model at once: their drains overlap, so several busy models still fit in drain_s."""
        await asyncio.gather(*(e.batcher.stop(drain_s) for e in self.entries.values() if e.batcher is not None),
                             *self._retiring)
