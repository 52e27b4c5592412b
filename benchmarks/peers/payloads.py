"""Request bodies that carry the same JPEG bytes to every peer, for `benchmarks/loadgen.py`.

    python -m benchmarks.peers.payloads multipart photo.jpg /tmp/photo.multipart
    python -m benchmarks.peers.payloads v2 photo.jpg /tmp/photo.v2 [--input images]

Each prints the loadgen options that go with the written body file (`--content-type`, and
for V2 the `--header`): the body is built once, so the generator only replays bytes.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

BOUNDARY = "effnetbenchboundary7MA4YWxkTrZu0gW"  # fixed, so that the body file is reproducible


def multipart_body(jpeg_bytes: bytes, field: str = "file", filename: str = "image.jpg",
                   boundary: str = BOUNDARY) -> tuple[bytes, str]:
    """One file part in a multipart/form-data body -> (body, Content-Type header value)."""
    if boundary.encode() in jpeg_bytes:
        raise ValueError("the boundary occurs in the image bytes; pick another")
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode("latin-1")
    return head + jpeg_bytes + f"\r\n--{boundary}--\r\n".encode("latin-1"), f"multipart/form-data; boundary={boundary}"


def v2_binary_body(jpeg_bytes: bytes, input_name: str = "images", output_name: str | None = None,
                   shape: tuple[int, ...] = (1, 1)) -> tuple[bytes, str, dict[str, str]]:
    """A KServe V2 / Triton binary-tensor infer request with one BYTES element (the encoded image).

    Body = JSON header + the input's raw data: each BYTES element is a 4-byte little-endian
    length followed by its bytes. `Inference-Header-Content-Length` tells the server where the
    JSON ends. The output (all outputs when `output_name` is None) comes back as JSON, so the
    answer stays small and readable. -> (body, Content-Type, extra headers).
    """
    raw = struct.pack("<I", len(jpeg_bytes)) + jpeg_bytes
    header: dict = {"inputs": [{"name": input_name, "shape": list(shape), "datatype": "BYTES",
                                "parameters": {"binary_data_size": len(raw)}}]}
    if output_name is not None:
        header["outputs"] = [{"name": output_name, "parameters": {"binary_data": False}}]
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + raw, "application/octet-stream", {"Inference-Header-Content-Length": str(len(head))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers.payloads")
    p.add_argument("kind", choices=["multipart", "v2"])
    p.add_argument("image", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--field", default="file", help="multipart field name")
    p.add_argument("--input", default="images", help="V2 input name")
    p.add_argument("--output", default=None, help="V2 output name to request (default: all)")
    args = p.parse_args(argv)
    data = args.image.read_bytes()
    if args.kind == "multipart":
        body, ctype = multipart_body(data, args.field)
        headers: dict[str, str] = {}
    else:
        body, ctype, headers = v2_binary_body(data, args.input, args.output)
    args.out.write_bytes(body)
    opts = [f"--body {args.out}", f"--content-type '{ctype}'"] + [f"--header '{k}:{v}'" for k, v in headers.items()]
    print(" ".join(opts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
