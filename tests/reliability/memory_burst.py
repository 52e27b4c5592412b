"""Memory-hungry clients for test_rel_hostile_load.py and benchmarks/reliability.py, in a process of their own:

    python memory_burst.py URL warm                   full batches of real photos (the models' working memory)
    python memory_burst.py URL burst DEADLINE_S [N]   22 clients x N requests (default 3), each retried after
                                                      a 503 as its Retry-After says, until answered or
                                                      DEADLINE_S is spent

The burst's requests are all valid images, each sized to fit the server's memory budget on its own
(256 MB: server_settings below), so a correct server answers every one of them 200 in the end:
* big:   a 2450x2450 RGB PNG of noise: an 18 MB body, and 80 MB of the budget to decode;
* bomb:  a 4000x4000 16-bit PNG that compresses to 40 kB and takes 183 MB of the budget to decode;
* parts: 64-part multiparts of 1000x1000 16-bit PNGs (12 MB each to decode, 64 queue slots).
Together they do not fit: the server refuses what would overflow the budget (503 + Retry-After) and the
clients come back when told, as a polite client would. Prints
    {"kinds": {kind: {"final": {status: n}, "attempts": {status: n}}}, "bad_refusals": [...], "seconds": s}
where `final` is each request's last answer and `bad_refusals` lists every 503 without a usable
Retry-After or without the JSON error shape.

A process of its own so pytest does not keep the hundreds of MB these clients allocate: a big idle heap
in the test process made the next test's timings on this 2-core machine noticeably worse.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import httpx
import numpy as np
from PIL import Image
from reliability_helpers import check_error, encode, real_photo

CLIENTS = {"big": 16, "bomb": 4, "parts": 2}
REQUESTS_PER_CLIENT = 3
BUDGET_MB = 256
QUEUE = 256  # room for both multiparts (64 images each, admitted whole or not at all) and the rest


def server_settings() -> dict[str, str]:
    """The EFFNET_* settings the burst is sized for (besides the repository and the model).

    The upload rate floor is off: it is a slow-client defence (test_rel_hostile.py) and, with 16 clients
    sending 18 MB on a saturated machine, the server itself reads below it (a 408 that says nothing here)."""
    return {"EFFNET_MAX_INFLIGHT_MB": str(BUDGET_MB), "EFFNET_MAX_BODY_MB": "20", "EFFNET_MAX_QUEUE": str(QUEUE),
            "EFFNET_MAX_IMAGE_PIXELS": "50000000", "EFFNET_MIN_UPLOAD_KBPS": "0", "EFFNET_BODY_TIMEOUT_S": "120"}


def _png16_bomb(w: int, h: int) -> bytes:
    """A 16-bit grayscale PNG of w x h that compresses to almost nothing."""
    return encode(Image.fromarray(np.full((h, w), 40000, np.uint16)), "PNG", compress_level=9)


def _noise_png(side: int) -> bytes:
    """An RGB PNG of noise: incompressible, so the body is as big as the pixels (side^2 x 3 bytes)."""
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "PNG", compress_level=1)


def burst_requests() -> dict[str, dict]:
    parts = _png16_bomb(1000, 1000)
    return {"big": {"content": _noise_png(2450), "headers": {"content-type": "image/png"}},
            "bomb": {"content": _png16_bomb(4000, 4000), "headers": {"content-type": "image/png"}},
            "parts": {"files": [("file", (f"{i}.png", parts, "image/png")) for i in range(64)]}}


def warm(url: str) -> dict[str, int]:
    photo = encode(real_photo((224, 224)), "JPEG", quality=90)
    files = [("file", (f"{i}.jpg", photo, "image/jpeg")) for i in range(64)]  # the most parts a request may have
    # One after the other: the models see full batches, and the queue is never what refuses them.
    codes = [httpx.post(url + "/classify", files=files, timeout=120).status_code for _ in range(3)]
    return {str(c): codes.count(c) for c in sorted(set(codes))}


def burst(url: str, deadline_s: float, per_client: int = REQUESTS_PER_CLIENT) -> dict:
    requests = burst_requests()
    t_start = time.monotonic()
    t_end = t_start + deadline_s
    lock = threading.Lock()
    kinds = {k: {"final": {}, "attempts": {}} for k in requests}
    bad_refusals: list[str] = []

    def count(table: dict, key: str) -> None:
        table[key] = table.get(key, 0) + 1

    def one(c: httpx.Client, kind: str) -> None:
        """One request to its final answer: resent after each 503 once its Retry-After has passed."""
        while True:
            try:
                r = c.post("/classify", **requests[kind])
                status, retry_after = str(r.status_code), r.headers.get("retry-after", "")
            except httpx.TransportError as exc:  # a dropped connection is an answer too: a wrong one
                r, status, retry_after = None, type(exc).__name__, ""
            with lock:
                count(kinds[kind]["attempts"], status)
            if status != "503":
                break
            try:
                check_error(r.status_code, r.headers, r.content)
                wait = int(retry_after)
            except (AssertionError, ValueError) as exc:
                with lock:
                    bad_refusals.append(f"{kind}: {exc}: {r.headers} {r.content[:200]!r}")
                break
            if time.monotonic() + wait > t_end:
                break
            time.sleep(wait)
        with lock:
            count(kinds[kind]["final"], status)

    def client(kind: str) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            for _ in range(per_client):
                one(c, kind)

    threads = [threading.Thread(target=client, args=(k,)) for k, n in CLIENTS.items() for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"kinds": kinds, "bad_refusals": bad_refusals, "seconds": round(time.monotonic() - t_start, 1)}


if __name__ == "__main__":
    url, what = sys.argv[1], sys.argv[2]
    print(json.dumps(warm(url) if what == "warm" else burst(url, float(sys.argv[3]), *map(int, sys.argv[4:5]))))
