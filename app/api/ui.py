"""The page at / for a person, and /docs (Swagger UI) that works with no network.

Both are plain files. The page (HTML, CSS, JS and an inline-free SVG chart drawn by the script) is this
project's own, in app/api/static/. Swagger UI's bundle and stylesheet are the ones the fastapi-swagger
package installs (its `resources` package, which follows swagger-ui-dist's releases); the script that starts
Swagger UI is ours, so nothing on either page is fetched from another host, the favicon included.

Every answer here carries a Content-Security-Policy that lets a page load from and talk to the service
only; it has no 'unsafe-inline', so no script or style sits inside the HTML. Images may also be data: URIs
(Swagger UI's icons live in its CSS that way) and blob: URLs (the page previews the photos it is given,
which never leave the browser except to /classify). The routes are public even when EFFNET_API_KEY is
set (app/api/app.py): they hold no data, and the calls the pages make carry the key a person types.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

STATIC = Path(__file__).parent / "static"
CSP = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag) so a new release's page is never mixed with an old script
}
HTML = "text/html; charset=utf-8"
JS = "text/javascript; charset=utf-8"
CSS = "text/css; charset=utf-8"
SVG = "image/svg+xml"

# Where the page (/ui/...) and /docs (/docs/...) are: public path prefixes for the API key, plus "/" itself.
UI_PREFIX, DOCS_PREFIX = "/ui", "/docs"


def swagger_ui_files() -> Path:
    """The folder of Swagger UI's swagger-ui-bundle.js and swagger-ui.css (installed by fastapi-swagger)."""
    return Path(str(files("fastapi_swagger.resources")))


def _site(path: str, html: str, prefix: str, assets: dict[str, tuple[Path, str]]) -> APIRouter:
    """One page at `path` (the file `html`) and its files under `prefix`/, each by its name in `assets`."""
    router = APIRouter(include_in_schema=False)

    @router.get(path, name=f"page {path}")
    async def page() -> FileResponse:
        return FileResponse(STATIC / html, media_type=HTML, headers=HEADERS)

    @router.get(prefix + "/{name}", name=f"files {prefix}")
    async def page_file(name: str) -> FileResponse:
        found = assets.get(name)
        if found is None:
            raise HTTPException(404, f"no such file: {name}")
        return FileResponse(found[0], media_type=found[1], headers=HEADERS)

    return router


def page_router() -> APIRouter:
    """/ and its files (EFFNET_UI=false leaves this router out)."""
    return _site("/", "index.html", UI_PREFIX, {
        name: (STATIC / name, media) for name, media in (("ui.js", JS), ("ui.css", CSS), ("favicon.svg", SVG))})


def docs_router() -> APIRouter:
    """/docs: Swagger UI over /openapi.json, from installed files."""
    swagger = swagger_ui_files()
    return _site(DOCS_PREFIX, "docs.html", DOCS_PREFIX, {
        "swagger-ui-bundle.js": (swagger / "swagger-ui-bundle.js", JS),
        "swagger-ui.css": (swagger / "swagger-ui.css", CSS),
        "docs.js": (STATIC / "docs.js", JS),
        "docs.css": (STATIC / "docs.css", CSS),
        "favicon.svg": (STATIC / "favicon.svg", SVG),
    })
