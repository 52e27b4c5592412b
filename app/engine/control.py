"""Model control, Triton's way (`EFFNET_MODEL_CONTROL`, as `--model-control-mode`):

* `none` (default): every model is loaded at start; the repository is not watched; load/unload requests are
  refused (503), so a fixed deployment cannot be changed from outside.
* `explicit`: `EFFNET_MODELS` (or every folder) is loaded at start; afterwards only load/unload requests
  change what serves.
* `poll`: everything is loaded at start, then the repository is scanned every `EFFNET_POLL_S`: a new model
  folder is loaded, a folder whose manifest changed (a rebuild: new ONNX sha256) is reloaded, a removed one
  is unloaded. Load/unload requests are refused, as Triton does. The build writes a model into a hidden
  folder and renames it into place only once complete, so a scan never sees half a model.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from app.engine.manifest import MANIFEST_FILE
from app.engine.metrics import Metrics
from app.engine.registry import UNLOADED, ControlError, Registry, model_folders

log = logging.getLogger("effnet.control")


class ControlRefused(ControlError):
    """Load/unload is not allowed in this control mode."""


class ModelControl:
    def __init__(self, registry: Registry, metrics: Metrics, mode: str, poll_s: float) -> None:
        self.registry, self.metrics, self.mode, self.poll_s = registry, metrics, mode, poll_s
        self._task: asyncio.Task | None = None
        self._seen: dict[str, str] = {}  # folder -> fingerprint of its manifest when last looked at

    @property
    def api_allowed(self) -> bool:
        return self.mode == "explicit"

    def _refuse_unless_explicit(self) -> None:
        if not self.api_allowed:
            raise ControlRefused(
                f"explicit model load / unload is not allowed with EFFNET_MODEL_CONTROL={self.mode}"
                + (" (the repository is polled)" if self.mode == "poll" else "; set it to explicit"))

    async def load(self, name: str) -> None:
        self._refuse_unless_explicit()
        await self._load(name)

    async def unload(self, name: str) -> None:
        self._refuse_unless_explicit()
        await self._unload(name)

    async def _load(self, name: str) -> None:
        try:
            await self.registry.load(name)
        except ControlError:
            self.metrics.model_loads.labels(name, "failed").inc()
            raise
        self.metrics.model_loads.labels(name, "ok").inc()

    async def _unload(self, name: str) -> None:
        await self.registry.unload(name)
        self.metrics.model_unloads.labels(name).inc()

    # --- poll ----------------------------------------------------------------------------
    def start(self) -> None:
        if self.mode == "poll" and self._task is None:
            self._seen = self._scan()
            self._task = asyncio.get_running_loop().create_task(self._poll(), name="poll-repository")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def _scan(self) -> dict[str, str]:
        root = self.registry.settings.repository
        return {name: _fingerprint(root / name) for name in model_folders(root)}

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.sync()
            except Exception:  # noqa: BLE001 - the watcher must outlive one bad scan
                log.exception("repository poll failed")

    async def sync(self) -> None:
        """One poll: load what appeared, reload what changed, unload what went away."""
        now = await asyncio.to_thread(self._scan)
        entries = self.registry.entries
        for name, fp in now.items():
            known = entries.get(name)
            if known is None or self._seen.get(name) != fp or known.reason == UNLOADED:
                log.info("repository: %s %s", "loading" if known is None else "reloading", name)
                try:
                    await self._load(name)
                except ControlError as exc:
                    log.error("repository: %s", exc)
        for name in set(entries) - set(now):
            if entries[name].reason != UNLOADED:
                log.info("repository: %s is gone; unloading", name)
                await self._unload(name)
        self._seen = now


def _fingerprint(folder: Path) -> str:
    """What changes when a model is rebuilt: its manifest (which names the ONNX file's sha256)."""
    try:
        st = (folder / MANIFEST_FILE).stat()
    except OSError:
        return ""
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
