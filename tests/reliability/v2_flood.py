"""Hostile /v2 clients for test_rel_hostile_load.py and benchmarks/reliability.py, in a process of their own:

    python v2_flood.py URL   ->   prints "flooding" once the first answer is in; floods until its stdin
                                  closes, then prints {body: {"200": n, "400": n, ...}}

Six threads send, in turn, bodies that are expensive to parse: 20 MB of zero-length BYTES elements (and
the same gzipped to 20 kB), a 2.4 MB JSON FP32 tensor (and its deflate), and truncated elements. The
caller decides how long it lasts (closing stdin), so the flood surrounds whatever the caller does
meanwhile, however fast or slow the machine is. A fresh process, so the load does not depend on what
earlier tests left in pytest's (its heap, its threads), and six threads under one GIL, so it stays the
same size from run to run.
"""

from __future__ import annotations

import gzip
import json
import struct
import sys
import threading
import zlib

import httpx


def _v2(header: dict, binary: bytes = b"") -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + binary, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def hostile_bodies() -> dict[str, tuple[bytes, dict[str, str]]]:
    zeros = b"\x00\x00\x00\x00" * (5 * 1024 * 1024)  # 5 M zero-length BYTES elements: 20 MB
    bytes_flood, h1 = _v2({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                       "parameters": {"binary_data_size": len(zeros)}}]}, zeros)
    floats = ",".join(["0.5"] * (3 * 224 * 224))
    json_fp32 = ('{"inputs":[{"name":"images","datatype":"FP32","shape":[4,3,224,224],"data":['
                 + ",".join([floats] * 4) + "]}]}").encode()
    return {
        "bytes_20mb": (bytes_flood, h1),
        "bytes_gzip_bomb": (gzip.compress(bytes_flood, 9), {**h1, "Content-Encoding": "gzip"}),
        "json_fp32": (json_fp32, {"Content-Type": "application/json"}),
        "json_fp32_deflate": (zlib.compress(json_fp32), {"Content-Type": "application/json", "Content-Encoding": "deflate"}),
        "truncated_elements": (struct.pack("<I", 10) * 3, {**h1}),
    }


def main(url: str, clients: int = 6) -> dict[str, dict[str, int]]:
    hostile = list(hostile_bodies().items())
    stop, first = threading.Event(), threading.Event()
    answers: list[tuple[str, str]] = []  # (body, status or the transport error)

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while not stop.is_set():
                name, (body, headers) = hostile[k % len(hostile)]
                try:
                    status = str(c.post("/v2/models/b0/infer", content=body, headers=headers).status_code)
                except httpx.TransportError as exc:
                    status = type(exc).__name__
                answers.append((name, status))
                first.set()
                k += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    # Generous: a first answer takes well under a second here; only a server that never answers waits it out.
    print("flooding" if first.wait(300) else "no answer in 300 s", flush=True)
    sys.stdin.read()  # until the caller closes it
    stop.set()
    for t in threads:
        t.join()
    out: dict[str, dict[str, int]] = {name: {} for name, _ in hostile}
    for name, status in answers:
        out[name][status] = out[name].get(status, 0) + 1
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
