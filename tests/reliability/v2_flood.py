"""Hostile /v2 clients for test_rel_hostile_load.py, run as a process of their own:

    python v2_flood.py URL SECONDS   ->   prints {"200": n, "400": n, ...}

Six threads send, in turn, bodies that are expensive to parse: 20 MB of zero-length BYTES elements (and
the same gzipped to 20 kB), a 2.4 MB JSON FP32 tensor (and its deflate), and truncated elements. A fresh
process, so the load does not depend on what earlier tests left in pytest's (its heap, its threads), and
six threads under one GIL, so it stays the same size from run to run.
"""

from __future__ import annotations

import gzip
import json
import struct
import sys
import threading
import time
import zlib

import httpx


def _v2(header: dict, binary: bytes = b"") -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + binary, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def hostile_bodies() -> list[tuple[bytes, dict[str, str]]]:
    zeros = b"\x00\x00\x00\x00" * (5 * 1024 * 1024)  # 5 M zero-length BYTES elements: 20 MB
    bytes_flood, h1 = _v2({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                       "parameters": {"binary_data_size": len(zeros)}}]}, zeros)
    floats = ",".join(["0.5"] * (3 * 224 * 224))
    json_fp32 = ('{"inputs":[{"name":"images","datatype":"FP32","shape":[4,3,224,224],"data":['
                 + ",".join([floats] * 4) + "]}]}").encode()
    return [
        (bytes_flood, h1),
        (gzip.compress(bytes_flood, 9), {**h1, "Content-Encoding": "gzip"}),
        (json_fp32, {"Content-Type": "application/json"}),
        (zlib.compress(json_fp32), {"Content-Type": "application/json", "Content-Encoding": "deflate"}),
        (struct.pack("<I", 10) * 3, {**h1}),
    ]


def main(url: str, seconds: float, clients: int = 6) -> dict[str, int]:
    hostile = hostile_bodies()
    t_end = time.monotonic() + seconds
    statuses: list[int] = []

    def client(first: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            k = first
            while time.monotonic() < t_end:
                body, headers = hostile[k % len(hostile)]
                statuses.append(c.post("/v2/models/b0/infer", content=body, headers=headers).status_code)
                k += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {str(code): statuses.count(code) for code in sorted(set(statuses))}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], float(sys.argv[2]))))
