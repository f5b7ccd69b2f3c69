"""/docs (Swagger UI) and /redoc from assets this server serves itself.

FastAPI's own pages load swagger-ui and ReDoc from a CDN, so they stay blank on a host without the
internet. The `fastapi-offline` package ships those files (swagger-ui-dist 5 bundle and CSS, the
ReDoc 2 standalone bundle, a favicon); they are mounted at /docs/static and the pages point there.
Build the app with `docs_url=None, redoc_url=None` and call `install(app)`.

`install` also completes the OpenAPI document: routes that read their body by hand (encode, decode)
name their request models in `openapi_extra` by `$ref`, and FastAPI lists in `components` only the
models it sees in signatures, which left those references dangling (Swagger UI showed a resolver
error, ReDoc did not render at all). Missing components are filled in from `service.schemas`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from .. import schemas

ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
STATIC_URL = "/docs/static"
# No online validator badge (Swagger UI would fetch it from validator.swagger.io for non-local hosts).
SWAGGER_PARAMETERS = {"validatorUrl": None}
COMPONENTS = "#/components/schemas/"
# The pages may load images, fonts and data only from this server: ReDoc's sidebar shows a logo from
# its CDN (an <img> that hides itself when it fails), which the browser then never requests.
CSP = "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; frame-ancestors 'self'"


def install(app: FastAPI) -> None:
    """Mount the assets and add GET /docs and GET /redoc (both left out of the OpenAPI schema)."""
    complete_components(app)
    app.mount(STATIC_URL, StaticFiles(directory=ASSETS), name="docs-static")
    router = APIRouter(include_in_schema=False)
    title = app.title

    def base(request: Request) -> tuple[str, str]:
        root = request.scope.get("root_path", "").rstrip("/")
        return root + STATIC_URL, root + (app.openapi_url or "/openapi.json")

    @router.get("/docs")
    async def swagger_ui(request: Request) -> HTMLResponse:
        static, openapi = base(request)
        page = get_swagger_ui_html(
            openapi_url=openapi,
            title=f"{title} - Swagger UI",
            swagger_js_url=f"{static}/swagger-ui-bundle.js",
            swagger_css_url=f"{static}/swagger-ui.css",
            swagger_favicon_url=f"{static}/favicon.png",
            oauth2_redirect_url=None,
            swagger_ui_parameters=SWAGGER_PARAMETERS | (app.swagger_ui_parameters or {}),
        )
        page.headers["Content-Security-Policy"] = CSP
        return page

    @router.get("/redoc")
    async def redoc(request: Request) -> HTMLResponse:
        static, openapi = base(request)
        page = get_redoc_html(
            openapi_url=openapi,
            title=f"{title} - ReDoc",
            redoc_js_url=f"{static}/redoc.standalone.js",
            redoc_favicon_url=f"{static}/favicon.png",
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = CSP
        return page

    app.include_router(router)


def complete_components(app: FastAPI) -> None:
    """Wrap `app.openapi` so that every `#/components/schemas/<Name>` the document references exists:
    a missing one that names a model in `service.schemas` is added (with the models it uses)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        document = generate()  # FastAPI's, cached on the app; completed in place (idempotent)
        found = document.setdefault("components", {}).setdefault("schemas", {})
        missing = {ref.removeprefix(COMPONENTS) for ref in _refs(document) if ref.startswith(COMPONENTS)} - found.keys()
        for name in sorted(missing):
            model = getattr(schemas, name, None)
            if isinstance(model, type) and issubclass(model, BaseModel):
                schema = model.model_json_schema(ref_template=COMPONENTS + "{model}")
                for sub, sub_schema in schema.pop("$defs", {}).items():
                    found.setdefault(sub, sub_schema)
                found[name] = schema
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)
