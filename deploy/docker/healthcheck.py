"""Container health check: exit 0 only when GET /health/ready answers 200.

Standard library only (no curl in the image). Ignores any proxy settings: the check
always talks to the server in this container.
"""

import os
import sys
import urllib.request

url = os.environ.get("EFFNET_HEALTHCHECK_URL", "http://127.0.0.1:8000/health/ready")
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(url, timeout=float(os.environ.get("EFFNET_HEALTHCHECK_TIMEOUT_S", "3"))) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception as exc:  # noqa: BLE001 - any failure means "not healthy"
    print(f"not ready: {exc}", file=sys.stderr)
    sys.exit(1)
