"""Model control, Triton's way (`EFFNET_MODEL_CONTROL`, as `--model-control-mode`):

* `none` (default): every model is loaded at start; the repository is not watched; load/unload requests are
  refused (503), so a fixed deployment cannot be changed from outside.
* `explicit`: `EFFNET_MODELS` (or every folder) is loaded at start; afterwards only load/unload requests
  change what serves.
* `poll`: everything is loaded at start, then the repository is scanned every `EFFNET_POLL_S`: a new model
  folder is loaded, a folder any of whose files changed is reloaded, a removed one is unloaded. Load/unload
  requests are refused, as Triton does. The build writes a model into a hidden folder and renames it into
  place only once complete, so a scan never sees half a model; a file changed in place (cp, rsync, a volume
  sync) is seen too: a folder's fingerprint is every file in it (manifest, ONNX, anything beside them).

A failed load or reload is tried again only when the folder's files change again, so it is logged once,
not on every poll. A failed reload of a serving model leaves the old version serving with the reason as
its drift (registry.py), counted in `effnet_model_reload_failures_total` and flagged by
`effnet_model_disk_drift` until a reload works.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ControlError, ControlRefused
from .manifest import sha256_file
from .observe import Observer
from .registry import UNLOADED, NoSuchModel, Registry, model_folders

log = logging.getLogger("effnet.control")


class ModelControl:
    def __init__(self, registry: Registry, observer: Observer, mode: str, poll_s: float) -> None:
        self.registry, self.observer, self.mode, self.poll_s = registry, observer, mode, poll_s
        self._task: asyncio.Task | None = None
        self._seen: dict[str, Fingerprint] = {}  # folder -> its files when last looked at

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
        except NoSuchModel:
            raise  # a name the repository does not have: no series for it (clients choose these names)
        except ControlError:
            entry = self.registry.entries.get(name)
            self.observer.load_finished(name, ok=False, drift=entry is not None and bool(entry.drift))
            raise
        self.observer.load_finished(name, ok=True, drift=False)

    async def _unload(self, name: str) -> None:
        await self.registry.unload(name)
        self.observer.model_unloaded(name)

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

    def _scan(self) -> dict[str, Fingerprint]:
        root = self.registry.settings.repository
        return {name: fingerprint(root / name, self._seen.get(name, {})) for name in model_folders(root)}

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
            if known is None or changed(self._seen.get(name), fp) or known.reason == UNLOADED:
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


@dataclass(frozen=True)
class Stamp:
    """One file as the poll saw it. `stat` is its size and mtime, and its inode and ctime, which no copy
    tool can set back (`cp -p` and `rsync -t` restore the mtime). The sha256 is computed only when the stat
    changed (hashing a big ONNX file on every poll would cost seconds of disk); None: not hashed yet."""

    stat: tuple[int, int, int, int]
    sha256: str | None = None


Fingerprint = dict[str, Stamp]  # file name -> stamp, for every file of a model folder


def fingerprint(folder: Path, before: Fingerprint) -> Fingerprint:
    """Every regular file of the folder (what a model version is made of: manifest, ONNX, anything it names);
    a file whose size and mtime are as before keeps its stamp, any other is hashed."""
    out: Fingerprint = {}
    try:
        files = [p for p in folder.iterdir() if not p.name.startswith(".")]
    except OSError:
        return out  # the folder went away mid-scan: the next scan says so
    for path in files:
        try:
            if not path.is_file():
                continue
            st = path.stat()
            stat = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
            old = before.get(path.name)
            if old is not None and old.stat == stat:
                out[path.name] = old
            else:
                out[path.name] = Stamp(stat, sha256_file(path) if old is not None else None)
        except OSError:
            continue  # removed between listing and reading: as if it was never there
    return out


def changed(before: Fingerprint | None, now: Fingerprint) -> bool:
    """Whether a folder's content changed: a file appeared or went, or one's stat changed and its content
    with it (a `touch`, or a copy of the same bytes, is not a change). A file not hashed before cannot be
    compared by content, so any change of its stat counts."""
    if before is None or before.keys() != now.keys():
        return True
    for name, stamp in now.items():
        old = before[name]
        if old.stat != stamp.stat and (old.sha256 is None or old.sha256 != stamp.sha256):
            return True
    return False
