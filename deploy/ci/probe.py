"""HTTP probes for deploy/ci/test-docker.sh (standard library only; proxies ignored).

    probe.py ready URL [TIMEOUT_S]             wait until GET URL answers 200
    probe.py classify BASE MODEL IMAGE [TOP_K] POST IMAGE to BASE/classify, check the answer
    probe.py prom BASE EXPR [TIMEOUT_S]        wait until a Prometheus query returns data
    probe.py jpeg PATH                         write a real photo-like JPEG (needs Pillow)

Exit status 0 on success; the reason for a failure goes to stderr.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 10):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with OPENER.open(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def ready(url: str, timeout: float = 120) -> int:
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        try:
            status, body = http("GET", url, timeout=5)
            if status == 200:
                print(body.decode(errors="replace")[:300])
                return 0
            last = f"{status} {body[:200]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(1)
    print(f"{url} not ready after {timeout:.0f}s: {last}", file=sys.stderr)
    return 1


def classify(base: str, model: str, image: str, top_k: int = 3) -> int:
    with open(image, "rb") as f:
        data = f.read()
    status, body = http("POST", f"{base}/classify?model={urllib.parse.quote(model)}&top_k={top_k}", data,
                        {"Content-Type": "image/jpeg"}, timeout=60)
    if status != 200:
        print(f"POST /classify answered {status}: {body[:500]!r}", file=sys.stderr)
        return 1
    answer = json.loads(body)
    results = answer.get("results") or [{}]
    predictions = results[0].get("predictions") or []
    ok = (answer.get("model") == model and len(results) == 1 and len(predictions) == top_k
          and all({"index", "label", "score"} <= set(p) for p in predictions)
          and [p["score"] for p in predictions] == sorted((p["score"] for p in predictions), reverse=True)
          and "total" in results[0].get("timing_ms", {}))
    print(json.dumps(answer)[:400])
    if not ok:
        print("unexpected /classify answer", file=sys.stderr)
        return 1
    return 0


def prom(base: str, expr: str, timeout: float = 60) -> int:
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        try:
            status, body = http("GET", f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
            if status == 200:
                result = json.loads(body)["data"]["result"]
                if result:
                    print(json.dumps(result)[:400])
                    return 0
                last = "empty result"
            else:
                last = f"{status} {body[:200]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(1)
    print(f"Prometheus query {expr!r} returned no data after {timeout:.0f}s: {last}", file=sys.stderr)
    return 1


def jpeg(path: str) -> int:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (640, 480), (90, 140, 200))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 330, 640, 480), fill=(60, 120, 50))
    draw.ellipse((240, 150, 420, 330), fill=(230, 200, 40), outline=(40, 30, 20), width=6)
    img.save(path, "JPEG", quality=90)
    return 0


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "ready":
        return ready(args[0], float(args[1]) if len(args) > 1 else 120)
    if cmd == "classify":
        return classify(args[0], args[1], args[2], int(args[3]) if len(args) > 3 else 3)
    if cmd == "prom":
        return prom(args[0], args[1], float(args[2]) if len(args) > 2 else 60)
    if cmd == "jpeg":
        return jpeg(args[0])
    print(f"unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
