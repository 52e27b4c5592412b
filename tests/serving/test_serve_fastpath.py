"""The /classify fast path (app/api/classify.py ClassifyFastPath) answers exactly as FastAPI's route does.

`top_k=3` takes the fast path and `top_k=03` (a value only FastAPI's validation accepts) takes the route:
the same request both ways must give the same answer, the same error, the same headers."""

from __future__ import annotations

import httpx
import pytest

from effnet_serve.api.classify import ClassifyFastPath
from effnet_serve.core.config import Settings
from serving_helpers import encode, live_server, photo


@pytest.mark.parametrize(("query", "fast"), [
    (b"", True), (b"model=fake", True), (b"model=fake&top_k=3", True), (b"top_k=1000", True),
    (b"top_k=03", False), (b"top_k=0", False), (b"top_k=1001", False), (b"model=auto", False),
    (b"model=cascade:fake,fake2", False), (b"model=fake&model=fake", False), (b"budget_ms=5", False),
    (b"model=", False), (b"x=1", False),
])
def test_which_requests_take_the_fast_path(query, fast):
    scope = {"type": "http", "method": "POST", "path": "/classify", "query_string": query}
    assert (ClassifyFastPath.simple(scope) is not None) == fast
    assert ClassifyFastPath.simple({**scope, "method": "GET"}) is None
    assert ClassifyFastPath.simple({**scope, "path": "/classify/"}) is None


def _strip_timing(body: dict) -> dict:
    body.pop("timing_ms", None)
    for r in body.get("results", []):
        r.pop("timing_ms", None)
    return body


def test_the_fast_path_and_fastapis_route_answer_alike(fake_repo):
    jpeg = encode(photo((90, 70), seed=2))
    files = {"file": ("a.jpg", jpeg, "image/jpeg")}
    with live_server(Settings(repository=fake_repo, models=["fake"], default_model="fake")) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        fast = c.post("/classify?model=fake&top_k=3", files=files)
        route = c.post("/classify?model=fake&top_k=03", files=files)
        assert fast.status_code == route.status_code == 200
        assert _strip_timing(fast.json()) == _strip_timing(route.json())
        for h in ("content-type", "x-effnet-model-version"):
            assert fast.headers[h] == route.headers[h]
        assert fast.headers["x-request-id"] != route.headers["x-request-id"]  # both passed the tracing middleware

        for q in ("model=nope", "model=fake"):  # an unknown model; a body that is not an image
            a = c.post(f"/classify?{q}&top_k=2", content=b"not an image", headers={"content-type": "image/jpeg"})
            b = c.post(f"/classify?{q}&top_k=02", content=b"not an image", headers={"content-type": "image/jpeg"})
            assert a.status_code == b.status_code and a.status_code in (400, 404, 415)
            assert a.json() == b.json()
        wrong_type = c.post("/classify?top_k=2", content=b"x", headers={"content-type": "text/plain"})
        assert wrong_type.status_code == 415 and wrong_type.json()["error"]["code"]
