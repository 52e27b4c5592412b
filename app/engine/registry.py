"""Which models exist, which of them serve, and why the others do not.

A model that cannot be served (missing or corrupt file, checksum mismatch, invalid
manifest, ORT refuses the graph, warm-up fails) is disabled alone with a reason that
`/models` and `/health/ready` show; the rest of the repository keeps serving.
Loading runs in the background so `/health/live` answers while big models load.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from app.engine.batcher import Batcher, Hooks
from app.core.config import Settings, read_batch_table
from app.engine.manifest import MANIFEST_FILE, NAME_PATTERN, Manifest, ManifestError, load_manifest, verify_onnx
from app.engine.sessions import ModelSession, SessionError, create_session, resolve_device

log = logging.getLogger("effnet.registry")

Status = Literal["loading", "ready", "unavailable"]


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

    @property
    def provider(self) -> str | None:
        return self.session.provider if self.session else None

    def fail(self, reason: str) -> None:
        self.status, self.reason = "unavailable", reason
        self.session = None
        log.error("model %s unavailable: %s", self.name, reason)


def discover(settings: Settings) -> list[str]:
    """The configured names, or every complete model folder in the repository."""
    if settings.models:
        return list(dict.fromkeys(settings.models))
    root = settings.repository
    if not root.is_dir():
        return []
    # Hidden folders are the build's temporary ones; a folder without a manifest is not a model.
    return sorted(
        p.name for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_FILE).is_file()
    )


class Registry:
    def __init__(self, settings: Settings, hooks_for: Callable[[str], Hooks] | None = None) -> None:
        self.settings = settings
        self.hooks_for = hooks_for or (lambda name: Hooks())
        self.entries: dict[str, ModelEntry] = {
            name: ModelEntry(name, settings.repository / name) for name in discover(settings)
        }
        self.loaded = False  # every entry reached ready or unavailable
        self.on_ready: Callable[[ModelEntry], None] = lambda entry: None

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
        return {n: (e.reason or e.status) for n, e in self.entries.items() if e.status != "ready"}

    @property
    def ready(self) -> bool:
        """Ready to take traffic. Strict (EFFNET_STRICT_READINESS, default, as Triton's --strict-readiness):
        every configured model serves. Not strict: loading is over and at least one model serves, so a pod
        whose other models serve still gets traffic while one stays broken."""
        if not self.entries:
            return False
        if self.settings.strict_readiness:
            return not self.not_ready()
        return self.loaded and any(e.status == "ready" for e in self.entries.values())

    # --- loading ---------------------------------------------------------------------
    def _load_blocking(self, entry: ModelEntry, tables: dict[str, dict[str, int]]) -> None:
        if not re.match(NAME_PATTERN, entry.name) or len(entry.name) > 64:
            raise ManifestError("not a valid model name")
        if not entry.folder.is_dir():
            raise ManifestError(f"no folder {entry.name!r} in the repository")
        manifest = load_manifest(entry.folder)
        if manifest.name != entry.name:
            raise ManifestError(f"manifest name {manifest.name!r} does not match its folder")
        onnx_path = verify_onnx(entry.folder, manifest)
        device = resolve_device(self.settings.device)
        entry.manifest = manifest
        entry.session = create_session(
            onnx_path, manifest.onnx.input.name, manifest.onnx.output.name,
            device=device, threads=self.settings.threads, spinning=self.settings.ort_spinning,
        )
        # The batch table of the device that actually runs the graph (auto may pick CUDA, CUDA may fall back).
        device = entry.session.device
        if device not in tables:
            tables[device] = read_batch_table(self.settings.repository, device)
        entry.max_batch = self.settings.max_batch_for(entry.name, device, tables[device])

    async def load_all(self) -> None:
        """Load, warm and start every entry, one at a time (memory and cores are shared)."""
        tables: dict[str, dict[str, int]] = {}  # batch_sizes.json per device, read once each
        for entry in self.entries.values():
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
                    hooks=self.hooks_for(entry.name),
                )
                stage = "warm-up"
                await asyncio.to_thread(batcher.warm_up, (3, crop, crop))
                batcher.start()
                entry.batcher = batcher
                entry.status = "ready"
                self.on_ready(entry)
                log.info("model %s ready on %s, max batch %d", entry.name, entry.provider, entry.max_batch)
            except (ManifestError, SessionError) as exc:
                entry.fail(str(exc))
            except Exception as exc:  # noqa: BLE001 - e.g. warm-up crashed: this model only
                # The exception's class and text are internals (ORT's messages name files and
                # nodes): they go to the log; /models and /health/ready get the stage only.
                log.error("model %s: %s failed: %s: %s", entry.name, stage, type(exc).__name__, exc)
                entry.fail("the warm-up run failed" if stage == "warm-up" else "failed to load (see the server log)")
        self.loaded = True

    async def close(self, drain_s: float) -> None:
        """Stop every model at once: their drains overlap, so several busy models still fit in drain_s."""
        await asyncio.gather(*(e.batcher.stop(drain_s) for e in self.entries.values() if e.batcher is not None))
