"""The worker <-> engine link in one process: a real EngineServer over a real DataPlane (fake ONNX models, real
ORT sessions) and real RemotePlanes, as two worker processes would hold them, each with its own shared-memory
arena. What the link must keep: answers equal to the single-process ones, batches that mix workers, queue
room and calls given back when a worker leaves, 503s (not hangs) once the engine is gone, and no arena space
held after an answer."""

from __future__ import annotations

import asyncio
import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from effnet_serve.core.config import Settings
from effnet_serve.core.errors import BadRequest, ClientGone, ImageError, Overloaded, Unavailable, UnknownModel
from effnet_serve.engine.link import shm
from effnet_serve.engine.link.client import RemotePlane
from effnet_serve.engine.link.server import EngineServer
from effnet_serve.engine.memory import MemoryBudget, SharedBudget, SharedUploadCount, SlotTable, UploadCount
from effnet_serve.engine.runtime import running_plane
from serving_helpers import encode, photo, settle, write_model


def settings_for(repo: Path, **kw) -> Settings:
    base = dict(repository=repo, models=["fake"], default_model="fake", grpc_port=0, threads=1, decode_workers=1,
                access_log=False)
    return Settings(**{**base, **kw})


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    write_model(tmp_path / "repo", "fake", crop=32, resize=36)
    return tmp_path / "repo"


@contextlib.asynccontextmanager
async def engine_with_workers(settings: Settings, sock_dir: Path, workers: int = 2):
    async with running_plane(settings, decode_workers=1) as plane:
        while not plane.registry.loaded:
            await asyncio.sleep(0.01)
        server = EngineServer(plane, str(sock_dir / "engine.sock"))
        await server.start()
        clients: list[RemotePlane] = []
        arenas: list[shm.Arena] = []
        try:
            for i in range(workers):
                arena = shm.Arena(f"effnet-shm-test{os.getpid()}-{id(server)}-{i}", 4 << 20)
                arenas.append(arena)
                c = RemotePlane(settings, str(sock_dir / "engine.sock"), arena, ThreadPoolExecutor(1),
                                MemoryBudget(256 << 20), UploadCount(settings.max_uploads))
                await c.connect()
                clients.append(c)
            yield plane, server, clients
        finally:
            for c in clients:
                await c.close()
            await server.close()
            for a in arenas:
                a.close()


async def _classify(client, data: list[bytes], name: str = "fake"):
    async with client.open(client.find(name)) as call:
        return await call.images(data)


def test_answers_through_the_link_equal_those_in_one_process(repo, tmp_path):
    jpeg = encode(photo((120, 90), seed=3))

    async def main():
        async with engine_with_workers(settings_for(repo), tmp_path) as (plane, _, (w0, _w1)):
            remote = (await _classify(w0, [jpeg]))[0]
            async with plane.open(plane.find("fake")) as call:
                local = (await call.images([jpeg]))[0]
            assert remote.version == local.version and remote.model == "fake"
            np.testing.assert_allclose(remote.logits, local.logits, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(remote.probs, local.probs, rtol=1e-6, atol=1e-7)
            assert [p.index for p in remote.top(5)] == [p.index for p in local.top(5)]
            assert remote.decode_s > 0 and remote.inference_s > 0 and remote.batch_size == 1
            assert w0.arena.used == 0  # every byte of the request's space came back

    asyncio.run(main())


def test_a_batch_mixes_requests_from_two_workers(repo, tmp_path):
    """With EFFNET_BATCH_WAIT=always and a long delay, one batch of 2 can only form from both workers' images."""
    s = settings_for(repo, max_batch=2, batch_wait="always", max_delay_ms=3000)
    jpegs = [encode(photo((64, 64), seed=i)) for i in range(2)]

    async def main():
        async with engine_with_workers(s, tmp_path) as (plane, _, (w0, w1)):
            a, b = await asyncio.gather(_classify(w0, [jpegs[0]]), _classify(w1, [jpegs[1]]))
            assert a[0].batch_size == 2 and b[0].batch_size == 2
            batches = plane.metrics.batch_size.labels("fake")
            await settle(lambda: batches._sum.get() > 0)  # recorded once the loop hears of the run, after the answers
            await asyncio.sleep(0.05)
            assert batches._sum.get() == 2  # one run of two images, not two of one

    asyncio.run(main())


def test_tensors_cross_the_link_and_are_checked_by_the_engine(repo, tmp_path):
    async def main():
        async with engine_with_workers(settings_for(repo, max_queue=4), tmp_path) as (plane, _, (w0, _w1)):
            x = np.random.default_rng(0).standard_normal((3, 32, 32)).astype(np.float32)
            async with w0.open(w0.find("fake")) as call:
                out = await call.tensors([x, x * 2])
            async with plane.open(plane.find("fake")) as call:
                ref = await call.tensors([x, x * 2])
            np.testing.assert_allclose(np.stack([r.logits for r in out]), np.stack([r.logits for r in ref]), rtol=1e-6)
            with pytest.raises(BadRequest, match="at most 4 images"):  # the engine's own count check
                async with w0.open(w0.find("fake")) as call:
                    await call.tensors([x] * 5)
            with pytest.raises(UnknownModel):
                w0.find("nope")
            assert w0.arena.used == 0
            await settle(lambda: plane.inflight["fake"] == 0)

    asyncio.run(main())


def test_a_full_queue_is_refused_through_the_link_with_retry_after(repo, tmp_path):
    s = settings_for(repo, max_queue=2, admission_wait_ms=50)

    async def main():
        async with engine_with_workers(s, tmp_path) as (plane, _, (w0, _w1)):
            held = plane.registry.entries["fake"].batcher.reserve(2)  # as two images still decoding would
            try:
                with pytest.raises(Overloaded) as err:
                    await _classify(w0, [encode(photo((40, 40)))])
                assert int(err.value.headers["Retry-After"]) >= 1
            finally:
                held.release()
            await _classify(w0, [encode(photo((40, 40)))])  # room again
            await settle(lambda: plane.inflight["fake"] == 0)
            text = (await w0.metrics_text()).decode()
            assert 'effnet_requests_total{model="fake",status="503"}' in text
            assert 'effnet_requests_total{model="fake",status="200"} 1.0' in text

    asyncio.run(main())


def test_a_worker_that_goes_away_gives_back_what_it_held(repo, tmp_path):
    """A worker dies holding an admitted request with reserved room: the engine releases the room, ends the
    call as 499, and the other worker is untouched."""

    async def main():
        async with engine_with_workers(settings_for(repo, max_queue=3), tmp_path) as (plane, server, (w0, w1)):
            w0.admit_alone = False  # open and reserve apart, so that it can die between two of them
            call = w0.open(w0.find("fake"))
            await call.__aenter__()
            await w0._call("reserve", call.tid, 3, call.view.revision)  # all of the queue, and then it dies
            room = plane.registry.entries["fake"].batcher.room
            assert room.reserved == 3
            w0._link.abort()  # as a SIGKILL would leave the socket
            await settle(lambda: room.reserved == 0 and len(server.sessions) == 1)
            assert plane.inflight["fake"] == 0
            assert plane.metrics.requests.labels("fake", "499")._value.get() == 1
            results = await _classify(w1, [encode(photo((50, 50)))] * 3)  # the whole queue is free again
            assert len(results) == 3

    asyncio.run(main())


def test_when_the_engine_is_gone_workers_answer_503_and_are_not_ready(repo, tmp_path):
    async def main():
        async with engine_with_workers(settings_for(repo), tmp_path) as (_, server, (w0, _w1)):
            assert w0.readiness().ready
            view = w0.find("fake")
            await server.close()  # every link drops, as when the engine process dies
            await settle(lambda: w0.lost)
            assert w0.lost and not w0.readiness().ready and w0.draining
            with pytest.raises(Unavailable) as err:
                async with w0.open(view) as call:
                    await call.images([encode(photo((40, 40)))])
            assert err.value.status == 503 and err.value.headers["Retry-After"] == "1"

    asyncio.run(main())


def test_a_link_lost_between_admission_and_submit_leaves_no_arena_space_held(repo, tmp_path):
    """The worker writes the tensors into its arena before it sends the submit; when that send finds the link
    gone, the space goes back at once (nobody will read it, and the worker goes on serving its 503s)."""
    async def main():
        async with engine_with_workers(settings_for(repo), tmp_path) as (_, _server, (w0, _w1)):
            x = np.ones((3, 32, 32), np.float32)
            with pytest.raises(Unavailable):
                async with w0.open(w0.find("fake")) as call:
                    await call._admitted(*call._admit(1), 1)  # the engine admitted it
                    w0._on_lost(None)  # then the link drops
                    await call._submit([x], None)
            assert w0.arena.used == 0

    asyncio.run(main())

def test_arena_space_is_first_fit_and_merges_back(tmp_path):
    arena = shm.Arena(f"effnet-shm-test{os.getpid()}-alloc", 1 << 16)
    try:
        a = arena.alloc(1000)
        b = arena.alloc(1000)
        c = arena.alloc(1000)
        assert (a, b, c) == (0, 1024, 2048)  # 64-byte aligned
        arena.free(b, 1000)
        assert arena.alloc(500) == 1024  # the hole is reused
        arena.free(1024, 500)
        arena.free(a, 1000)
        arena.free(c, 1000)
        assert arena.used == 0 and arena._free == [(0, 1 << 16)]  # merged into one block again
        with pytest.raises(shm.ArenaFull):
            arena.alloc((1 << 16) + 1)
        x = arena.array(arena.alloc(12), (3,))
        x[:] = [1, 2, 3]
        assert list(np.ndarray((3,), np.float32, arena.shm.buf, 0)) == [1, 2, 3]
        del x  # an array of the arena holds its mapping (shm.float32_view): close() would leave it mapped
    finally:
        arena.close()
    assert not Path("/dev/shm", arena.name).exists()


def test_a_request_abandoned_while_queued_is_dropped_before_inference(repo, tmp_path):
    """The client goes away while its image waits for a batch: the engine drops it unrun (counted as skipped,
    the call as 499), and the worker gets its arena space back only once the engine has answered."""
    s = settings_for(repo, max_batch=4, batch_wait="always", max_delay_ms=1000)

    async def main():
        async with engine_with_workers(s, tmp_path) as (plane, _, (w0, _w1)):
            task = asyncio.create_task(_classify(w0, [encode(photo((40, 40)))]))
            batcher = plane.registry.entries["fake"].batcher
            await settle(lambda: batcher.queued == 1)  # decoded, submitted, waiting for company
            assert w0.arena.used > 0
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            skipped = plane.metrics.images_skipped.labels("fake", "client_gone")
            # Dropped when the batcher next looks at its queue (at the end of the delay).
            await settle(lambda: w0.arena.used == 0 and plane.inflight["fake"] == 0 and skipped._value.get() == 1)
            assert plane.metrics.requests.labels("fake", "499")._value.get() == 1
            assert plane.metrics.batch_size.labels("fake")._sum.get() == 0  # nothing ran

    asyncio.run(main())


def test_every_verb_of_the_facade_answers_through_the_link(repo, tmp_path):
    """Model control, the repository index, routing figures and metrics, asked by a worker: the same answers
    the engine's own plane gives, and a load is visible to the asking worker as soon as it is answered."""
    from effnet_serve.policies.routing import classify_auto

    write_model(repo, "fake2", crop=48, resize=52, seed=1)
    s = settings_for(repo, model_control="explicit", allow_open_control=True)

    async def main():
        async with engine_with_workers(s, tmp_path) as (plane, _, (w0, w1)):
            assert await w0.index() == await plane.index()
            assert not w0.knows("fake2")
            await w0.load("fake2")
            assert w0.find("fake2").serving and w0.find("fake2").manifest.preprocess.crop == 48
            await settle(lambda: w1.knows("fake2"))  # the other worker hears of it from the next push
            results, decision = await classify_auto(w1, 1000.0, _reader([encode(photo((60, 60)))]),
                                                    asyncio.get_running_loop().time())
            assert decision.chosen in ("fake", "fake2") and results[0].model == decision.chosen
            for _ in range(200):  # the engine records the routing sample just after the answer left (answers.py)
                info = await w1.route_info()
                if info[decision.chosen].samples:
                    break
                await asyncio.sleep(0.01)
            assert set(info) == {"fake", "fake2"} and info[decision.chosen].samples == 1
            await w1.unload("fake2")
            assert w1.find("fake2").status == "unavailable" and w1.find("fake2").reason == "unloaded"
            text = (await w0.metrics_text()).decode()
            assert 'effnet_model_loads_total{model="fake2",outcome="ok"} 1.0' in text
            assert 'effnet_auto_routed_total{budget_missed="false",model="%s"} 1.0' % decision.chosen in text

    asyncio.run(main())


def _reader(data: list[bytes]):
    async def read() -> list[bytes]:
        return data
    return read


def test_workers_share_one_memory_budget_and_a_dead_workers_share_is_cleared(tmp_path):
    """Two workers' budgets over one shared array: together they cannot pass the limit (a request one
    process would take is not refused for being over a worker's slice), and clearing a slot frees it."""
    import multiprocessing as mp

    from effnet_serve.core.errors import OverBudget

    slots = SlotTable(mp.get_context("spawn"), 2, str(tmp_path / "budget.lock"))
    a, b = SharedBudget(100, slots, 0), SharedBudget(100, slots, 1)
    a.take(90, "x")  # more than half: one worker may hold nearly all of it
    with pytest.raises(OverBudget):
        b.take(20, "y")
    b.take(10, "y")
    assert a.used == b.used == 100
    a.give(40)
    b.take(40, "y")
    assert list(slots.values) == [50, 50]
    SharedBudget.clear(slots, 0)  # worker 0 died holding 50
    b.take(50, "y")
    assert list(slots.values) == [0, 100] and b.peak == 100


def test_workers_share_one_upload_count_and_a_dead_workers_uploads_are_cleared(tmp_path):
    """EFFNET_MAX_UPLOADS means the service's uploads in progress, not each worker's: two workers' counts over
    one shared array refuse the upload past the limit wherever it lands, and a cleared slot frees its share."""
    import multiprocessing as mp

    slots = SlotTable(mp.get_context("spawn"), 2, str(tmp_path / "uploads.lock"))
    a, b = SharedUploadCount(3, slots, 0), SharedUploadCount(3, slots, 1)
    assert a.try_take() and a.try_take() and b.try_take()
    assert not b.try_take() and not a.try_take()  # 3 in progress across both workers
    assert a.used == b.used == 3 and list(slots.values) == [2, 1]
    b.give()
    assert a.try_take() and list(slots.values) == [3, 0]
    SharedUploadCount.clear(slots, 0)  # worker 0 died mid-upload three times over
    assert b.try_take() and b.used == 1


def test_images_a_worker_decoded_are_recorded_as_in_one_process(repo, tmp_path):
    """The engine records what a worker tells it about each image: its decode and preprocess times on
    /metrics, and decode + preprocess + inference as the routing sample, exactly as images() would. The
    inference thread answers first (answers.py), so the engine's loop records them a moment later."""

    async def main():
        async with engine_with_workers(settings_for(repo), tmp_path) as (plane, _, (w0, _w1)):
            (r,) = await _classify(w0, [encode(photo((120, 80), seed=4))])
            decode = plane.metrics.stage_duration.labels("fake", "decode")
            pre = plane.metrics.stage_duration.labels("fake", "preprocess")
            await settle(lambda: len(plane.stats.fresh("fake")) == 1)
            assert decode._sum.get() == pytest.approx(r.decode_s) and r.decode_s > 0
            assert pre._sum.get() == pytest.approx(r.preprocess_s) and r.preprocess_s > 0
            assert plane.stats.fresh("fake") == pytest.approx([r.decode_s + r.preprocess_s + r.inference_s])
            x = np.zeros((3, 32, 32), np.float32)
            async with w0.open(w0.find("fake")) as call:
                await call.tensors([x])  # ready tensors: nothing decoded, nothing recorded
            assert decode._sum.get() == pytest.approx(r.decode_s) and len(plane.stats.fresh("fake")) == 1

    asyncio.run(main())


def test_a_lone_request_asks_for_both_stages_at_once_and_is_recorded_as_any_other(repo, tmp_path):
    """Nothing else in flight in the worker: open and reserve go as one message (admit), the decode meanwhile. The
    answer equals the three-step one, the call is counted (200), and nothing is left held: no ticket, no room,
    no arena space. A bad image is counted too (400), after the admission."""
    jpeg = encode(photo((120, 90), seed=5))

    async def main():
        async with engine_with_workers(settings_for(repo), tmp_path) as (plane, server, (w0, w1)):
            sent: list[str] = []
            put = w0._link.put
            w0._link.put = lambda m: (sent.append(m[2]) if m[0] == "call" else None, put(m))[1]
            (one,) = await _classify(w0, [jpeg])
            assert sent == ["admit", "submit"]  # two round trips, the first beside the decode
            w1.admit_alone = False
            (three,) = await _classify(w1, [jpeg])
            np.testing.assert_allclose(one.probs, three.probs, rtol=1e-6)
            batcher = plane.registry.entries["fake"].batcher
            session = next(s for s in server.sessions if s.arena == w0.arena.name)
            await settle(lambda: plane.metrics.requests.labels("fake", "200")._value.get() == 2)
            await settle(lambda: not session.tickets)
            assert plane.inflight["fake"] == 0 and batcher.room.reserved == 0
            assert w0.arena.used == 0 and w0.in_flight == 0
            with pytest.raises(ImageError) as bad:
                await _classify(w0, [b"not an image"])
            assert bad.value.status == 400
            await settle(lambda: plane.metrics.requests.labels("fake", "400")._value.get() == 1)
            await settle(lambda: not session.tickets and batcher.room.reserved == 0)
            assert plane.inflight["fake"] == 0

    asyncio.run(main())


def test_a_lone_request_refused_by_the_engine_answers_the_refusal_not_its_decode(repo, tmp_path):
    """A full queue refuses a lone request (503 with Retry-After) though its body, decoded meanwhile, is no image:
    the engine's stage one comes first, as it does on the three-step path."""
    s = settings_for(repo, max_queue=2, admission_wait_ms=50)

    async def main():
        async with engine_with_workers(s, tmp_path) as (plane, server, (w0, w1)):
            room = plane.registry.entries["fake"].batcher.room
            with room.reserve(2):  # the whole queue, held
                with pytest.raises(Overloaded) as full:
                    await _classify(w0, [b"not an image at all"])
            assert full.value.status == 503 and int(full.value.headers["Retry-After"]) >= 1
            await settle(lambda: plane.inflight["fake"] == 0)
            assert plane.metrics.requests.labels("fake", "400")._value.get() == 0

    asyncio.run(main())


def test_a_lone_request_whose_client_leaves_is_let_go_by_the_engine(repo, tmp_path):
    """Cancelled while its image waits in the engine for a batch: the engine drops it before inference, counts it
    as 499, and the worker's arena space comes back."""
    s = settings_for(repo, max_batch=4, batch_wait="always", max_delay_ms=1000)

    async def main():
        async with engine_with_workers(s, tmp_path) as (plane, server, (w0, _w1)):
            task = asyncio.ensure_future(_classify(w0, [encode(photo((40, 40)))]))
            batcher = plane.registry.entries["fake"].batcher
            await settle(lambda: batcher.depth == 1)  # queued, waiting for a batch that will not fill
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await settle(lambda: plane.metrics.requests.labels("fake", "499")._value.get() == 1)
            await settle(lambda: w0.arena.used == 0)
            assert plane.inflight["fake"] == 0 and batcher.room.reserved == 0

    asyncio.run(main())


def test_a_lone_request_whose_client_leaves_before_its_body_is_read_is_counted_as_499(repo, tmp_path):
    """A lone request asks the engine for admission only once its body is read (the decode runs beside that
    question). Its client leaving before that is a 499 all the same, as the call one process opens before
    reading the body is counted; a model name the engine does not have makes no series."""

    async def main():
        async with engine_with_workers(settings_for(repo), tmp_path) as (plane, server, (w0, _w1)):
            for gone in (ClientGone("the client went away"), asyncio.CancelledError()):
                with pytest.raises(type(gone)):
                    async with w0.open(w0.find("fake")):
                        raise gone  # the body's read failed: the client went away
            await settle(lambda: plane.metrics.requests.labels("fake", "499")._value.get() == 2)
            w0._tell("note_client_left", "no-such-model", 0.1)
            (done,) = await _classify(w0, [encode(photo((40, 40)))])  # after the tell on the same link
            assert done.model == "fake"
            text = (await w0.metrics_text()).decode()
            assert "no-such-model" not in text
            assert 'effnet_requests_total{model="fake",status="499"} 2.0' in text
            assert plane.inflight["fake"] == 0

    asyncio.run(main())


def test_a_worker_that_decoded_for_another_version_decodes_again_for_the_one_that_runs(repo, tmp_path):
    """The engine runs another version than the worker's view, prepared differently (another crop): the answer
    comes from the version that ran, on the image prepared for it, counted once."""

    async def main():
        async with engine_with_workers(settings_for(repo), tmp_path) as (plane, server, (w0, _w1)):
            view = w0.find("fake")
            from dataclasses import replace
            old = view.manifest.model_copy(update={"preprocess": view.manifest.preprocess.model_copy(update={"crop": 16, "resize": 18})})
            w0._views["fake"] = replace(view, version="an-older-one", revision=-1, manifest=old)
            (r,) = await _classify(w0, [encode(photo((50, 50)))])
            assert r.version == view.version
            await settle(lambda: plane.metrics.requests.labels("fake", "200")._value.get() == 1)
            assert plane.inflight["fake"] == 0

    asyncio.run(main())


def test_a_refused_reservation_says_when_to_come_back_as_in_one_process(repo, tmp_path):
    """Stage two refused (three steps: room when opened, none for the images): Retry-After is the time the full
    queue takes to drain, as in one process, not the refusal's default of 1 s (the engine's call records the
    refusal only when the worker closes it, after the worker has answered its client)."""
    s = settings_for(repo, max_queue=4, admission_wait_ms=50)
    x = np.zeros((3, 32, 32), np.float32)

    async def main():
        async with engine_with_workers(s, tmp_path) as (plane, _, (w0, _w1)):
            w0.admit_alone = False
            batcher = plane.registry.entries["fake"].batcher
            batcher.per_image_s = 0.6  # 4 images take 2.4 s: come back in 3
            told = {}
            with batcher.reserve(3):  # open finds room; two images do not fit
                for who, p in (("one process", plane), ("worker", w0)):
                    with pytest.raises(Overloaded) as err:
                        async with p.open(p.find("fake")) as call:
                            await call.tensors([x, x])
                    told[who] = err.value.headers["Retry-After"]
            await settle(lambda: plane.inflight["fake"] == 0)
            return told

    told = asyncio.run(main())
    assert told == {"one process": "3", "worker": "3"}


@pytest.mark.parametrize("alone", [True, False])
def test_a_reload_of_a_corrected_manifest_beside_the_same_onnx_file_reaches_the_workers(repo, tmp_path, alone):
    """Labels and normalisation are the manifest's: a reload of a corrected manifest beside the same ONNX file
    keeps the version (its sha256) and changes the answers. A worker serves what one process serves: at once (the
    engine's answer to admission says which load the call runs on) and in its copy of the state (pushed)."""
    import json
    jpeg = encode(photo((60, 60), seed=7))

    async def main():
        async with engine_with_workers(settings_for(repo), tmp_path) as (plane, server, (w0, w1)):
            for w in (w0, w1):
                w.admit_alone = alone
            (before,) = await _classify(w0, [jpeg])
            path = repo / "fake" / "manifest.json"
            m = json.loads(path.read_text())
            m["labels"] = [f"renamed {i}" for i in range(len(m["labels"]))]
            m["preprocess"]["mean"] = [0.0, 0.0, 0.0]
            path.write_text(json.dumps(m))
            await plane.registry.load("fake")  # a reload, as a load request or a poll would make it
            async with plane.open(plane.find("fake")) as call:
                (local,) = await call.images([jpeg])
            assert local.version == before.version and local.labels[0] == "renamed 0"
            assert not np.allclose(local.logits, before.logits, rtol=1e-3)  # another mean: other answers
            (now,) = await _classify(w1, [jpeg])  # maybe before the next state push
            await settle(lambda: all(w.find("fake").manifest.labels[0] == "renamed 0" for w in (w0, w1)), 3.0)
            (later,) = await _classify(w0, [jpeg])
            for r in (now, later):
                assert r.version == local.version and r.labels[0] == "renamed 0"
                np.testing.assert_allclose(r.logits, local.logits, rtol=1e-5, atol=1e-5)

    asyncio.run(main())


def test_a_lone_request_on_a_view_from_before_the_model_loaded_is_served(repo, tmp_path):
    """The worker's state still says the model is loading (no manifest: the engine pushes its state every 50 ms)
    while the engine serves it already: a lone request is admitted and answered, as on the three-step path, not
    refused with "model fake is not loaded" by an early decode that had nothing to decode for."""

    async def main():
        async with engine_with_workers(settings_for(repo), tmp_path) as (plane, server, (w0, _w1)):
            from dataclasses import replace
            view = w0.find("fake")
            # as the state said while it loaded: the copy of an earlier revision, without a manifest
            w0._views["fake"] = replace(view, status="loading", version=None, manifest=None, max_batch=None,
                                        batch_sizes=None, provider=None, revision=-1)
            (r,) = await _classify(w0, [encode(photo((50, 50)))])
            assert r.version == view.version and r.labels == view.manifest.labels
            await settle(lambda: plane.metrics.requests.labels("fake", "200")._value.get() == 1)
            assert plane.inflight["fake"] == 0 and w0.arena.used == 0

    asyncio.run(main())
