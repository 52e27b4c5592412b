"""Memory-hungry clients for test_rel_hostile_load.py, run as a process of their own:

    python memory_burst.py URL warm    full batches of real photos (the models' working memory)
    python memory_burst.py URL burst   24 clients x 3 requests: 18 MB bodies, 49-megapixel 16-bit PNG bombs,
                                       64-part multiparts of 4-megapixel ones; prints {"status": count}

A process of its own so pytest does not keep the hundreds of MB these clients allocate: a big idle heap
in the test process made the next test's timings on this 2-core machine noticeably worse.
"""

from __future__ import annotations

import json
import sys
import threading

import httpx
import numpy as np
from PIL import Image
from reliability_helpers import encode, real_photo


def _png16_bomb(w: int, h: int) -> bytes:
    """A 16-bit grayscale PNG of w x h that compresses to almost nothing."""
    return encode(Image.fromarray(np.full((h, w), 40000, np.uint16)), "PNG", compress_level=9)


def _run(jobs) -> dict[str, int]:
    codes: list[int] = []
    threads = [threading.Thread(target=lambda job=job: codes.extend(job())) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return {str(c): codes.count(c) for c in sorted(set(codes))}


def warm(url: str) -> dict[str, int]:
    photo = encode(real_photo((224, 224)), "JPEG", quality=90)
    files = [("file", (f"{i}.jpg", photo, "image/jpeg")) for i in range(64)]
    return _run([lambda: [httpx.post(url + "/classify", files=files, timeout=60).status_code]] * 3)


def burst(url: str) -> dict[str, int]:
    bomb = _png16_bomb(7000, 7000)  # 49 MP: within the pixel limit, ~600 MB if decoded as float64
    big = b"\xff\xd8" + b"\x00" * (18 * 1024 * 1024)  # an 18 MB "JPEG" that is not one
    small_bomb = _png16_bomb(2000, 2000)
    parts = [("file", (f"{i}.png", small_bomb, "image/png")) for i in range(64)]
    requests = {"big": {"content": big, "headers": {"content-type": "image/jpeg"}},
                "bomb": {"content": bomb, "headers": {"content-type": "image/png"}},
                "parts": {"files": parts}}

    def client(kind: str):
        with httpx.Client(base_url=url, timeout=60) as c:
            return [c.post("/classify", **requests[kind]).status_code for _ in range(3)]

    return _run([lambda k=k: client(k) for k in ["big"] * 16 + ["bomb"] * 4 + ["parts"] * 4])


if __name__ == "__main__":
    url, what = sys.argv[1], sys.argv[2]
    print(json.dumps(warm(url) if what == "warm" else burst(url)))
