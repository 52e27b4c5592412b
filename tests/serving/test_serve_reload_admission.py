"""A reload that swaps a model while requests wait for queue room in the old version: they have nothing queued
there yet, so they follow the successor (registry.py's promise) instead of failing with the old queue's
"the server is shutting down" (503) when the old batcher stops. Both stages: a request waiting for room to
exist (stage one, `open`), and one admitted that waits for room for its images (stage two). The engine's verbs
for worker processes go through the same Call."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from effnet_serve.core.config import Settings
from effnet_serve.core.errors import Unavailable
from effnet_serve.engine.runtime import running_plane
from serving_helpers import settle, write_model


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    write_model(tmp_path / "repo", "fake", crop=32, resize=36)
    return tmp_path / "repo"


def settings_for(repo: Path, **kw) -> Settings:
    base = dict(repository=repo, models=["fake"], default_model="fake", grpc_port=0, threads=1, decode_workers=1,
                access_log=False)
    return Settings(**{**base, **kw})


def test_requests_waiting_for_room_when_a_reload_swaps_the_model_are_served_by_the_new_version(repo):
    s = settings_for(repo, max_queue=2, admission_wait_ms=20_000, drain_s=5.0)
    x = np.random.default_rng(0).standard_normal((3, 32, 32)).astype(np.float32)

    async def main():
        async with running_plane(s, decode_workers=1) as plane:
            await settle(lambda: plane.registry.loaded)
            old = plane.registry.entries["fake"]
            held = [old.batcher.reserve(1)]  # an image still being decoded, say
            opened, go = asyncio.Event(), asyncio.Event()

            async def stage_two():
                async with plane.open(plane.find("fake")) as call:  # room exists: admitted at once
                    opened.set()
                    await go.wait()
                    return await call.tensors([x])  # the queue is full by now: waits for room

            async def stage_one():
                async with plane.open(plane.find("fake")) as call:  # the queue is full: waits for room
                    return await call.tensors([x])

            two = asyncio.ensure_future(stage_two())
            await opened.wait()
            held.append(old.batcher.reserve(1))  # full
            go.set()
            one = asyncio.ensure_future(stage_one())
            await settle(lambda: old.batcher.room.waiting == 2)
            new = await plane.registry.load("fake")  # a reload: the same files, a new entry
            assert new is not old and old.successor is new
            outcomes = await asyncio.wait_for(asyncio.gather(one, two, return_exceptions=True), 10)
            for h in held:
                h.release()
            return outcomes, new.batcher.batches_run

    outcomes, new_runs = asyncio.run(main())
    for o in outcomes:
        assert not isinstance(o, BaseException), f"refused by the reload: {o!r}"
        assert o[0].version is not None
    assert new_runs >= 1  # the new version ran them


def test_an_unload_still_refuses_the_requests_waiting_for_room(repo):
    """Nothing to follow: they are refused (503), not left waiting, and told the model was unloaded."""
    s = settings_for(repo, max_queue=1, admission_wait_ms=20_000, drain_s=0.5)
    x = np.zeros((3, 32, 32), np.float32)

    async def main():
        async with running_plane(s, decode_workers=1) as plane:
            await settle(lambda: plane.registry.loaded)
            old = plane.registry.entries["fake"]
            held = old.batcher.reserve(1)

            async def waiting():
                async with plane.open(plane.find("fake")) as call:
                    return await call.tensors([x])

            task = asyncio.ensure_future(waiting())
            await settle(lambda: old.batcher.room.waiting == 1)
            unload = asyncio.ensure_future(plane.registry.unload("fake"))
            outcome = (await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10))[0]
            held.release()
            await unload
            return outcome

    outcome = asyncio.run(main())
    # The model's unavailability and why, not the server's shutdown (the server goes on)
    assert isinstance(outcome, Unavailable) and outcome.status == 503 and outcome.code == "model_unavailable"
    assert str(outcome) == "model 'fake' was unloaded before this request ran"
    assert outcome.reject_reason == "unavailable" and outcome.body()["error"]["reason"] == "unloaded"
    assert outcome.headers["Retry-After"] == "30"


def test_the_gate_waiting_for_room_when_a_reload_swaps_the_model_lets_the_request_in_on_the_new_version(repo):
    """The same in the admission gate (app/api/gate.py, DataPlane.refusal), where an HTTP request in one process
    waits its turn before it opens its call."""
    s = settings_for(repo, max_queue=1, admission_wait_ms=20_000, drain_s=5.0)

    async def main():
        async with running_plane(s, decode_workers=1) as plane:
            await settle(lambda: plane.registry.loaded)
            old = plane.registry.entries["fake"]
            held = old.batcher.reserve(1)  # full
            waiting = asyncio.ensure_future(plane.refusal(plane.find("fake")))
            await settle(lambda: old.batcher.room.waiting == 1)
            new = await plane.registry.load("fake")
            try:
                return await asyncio.wait_for(waiting, 10), new
            finally:
                held.release()

    refusal, new = asyncio.run(main())
    assert refusal is None, f"refused by the reload: {refusal!r}"
    assert new.successor is None
