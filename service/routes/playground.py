"""GET /playground: one page to see what a tokenizer does to an image (pick a file, choose a model and
a resize mode, see the reconstruction, the token grid as a heat map, bits per pixel and PSNR).

The page and its script and style are served open, like /docs; everything it shows comes from the
public routes it calls from the browser (`GET /v1/models`, `POST /v1/encode`, `POST /v1/decode`), and
those need the API key when keys are configured (the page has a field for it). Nothing is fetched
from anywhere but this server.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter, Response

router = APIRouter(include_in_schema=False)
STATIC = Path(__file__).resolve().parent.parent / "static"
# The files the page is made of: name -> media type. A fixed set: no path from the request reaches the disk.
_ASSETS = {
    "playground.html": "text/html; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
# The page runs only its own script and style, talks only to this origin and shows images it made itself.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@cache
def _read(name: str) -> bytes:
    return (STATIC / name).read_bytes()


def _asset(name: str) -> Response:
    return Response(
        _read(name),
        media_type=_ASSETS[name],
        headers={"Cache-Control": "no-cache", "Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff"},
    )


@router.get("/playground")
async def playground() -> Response:
    return _asset("playground.html")


@router.get("/playground/playground.js")
async def playground_js() -> Response:
    return _asset("playground.js")


@router.get("/playground/playground.css")
async def playground_css() -> Response:
    return _asset("playground.css")
