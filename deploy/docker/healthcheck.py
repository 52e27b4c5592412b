"""Container health check: exit 0 only when GET /health/ready answers 200.

Standard library only (no curl in the image). Ignores any proxy settings: the check
always talks to the server in this container. When the server serves TLS
(EFFNET_TLS_CERT set), the check speaks HTTPS without verifying the certificate: it
only asks the process beside it whether it is ready, over loopback, and the
certificate names the service, not 127.0.0.1.
"""

import os
import ssl
import sys
import urllib.request


def url(env=os.environ) -> str:
    if env.get("EFFNET_HEALTHCHECK_URL"):
        return env["EFFNET_HEALTHCHECK_URL"]
    scheme = "https" if env.get("EFFNET_TLS_CERT") else "http"
    return f"{scheme}://127.0.0.1:8000/health/ready"


def check(target: str, timeout: float) -> bool:
    handlers = [urllib.request.ProxyHandler({})]
    if target.startswith("https:"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        handlers.append(urllib.request.HTTPSHandler(context=context))
    with urllib.request.build_opener(*handlers).open(target, timeout=timeout) as response:
        return response.status == 200


if __name__ == "__main__":
    try:
        ok = check(url(), float(os.environ.get("EFFNET_HEALTHCHECK_TIMEOUT_S", "3")))
    except Exception as exc:  # noqa: BLE001 - any failure means "not healthy"
        print(f"not ready: {exc}", file=sys.stderr)
        ok = False
    sys.exit(0 if ok else 1)
