"""The web page and the API docs: ``/`` serves index.html (its modules and style are static files); ``/docs``
(Swagger UI) and ``/redoc`` load their assets from central itself, from the ``fastapi-offline`` package, so
they work in a plant without internet."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

STATIC = Path(__file__).resolve().parents[2] / "static"
DOCS_ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
TITLE = "tokenline central"
# The docs pages may load nothing from elsewhere (ReDoc's sidebar links a logo on its CDN): offline by policy.
OFFLINE = {"Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                                      "style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                                      "worker-src 'self' blob:; connect-src 'self'"}

router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@router.get("/docs")
def swagger_ui() -> HTMLResponse:
    page = get_swagger_ui_html(openapi_url="/openapi.json", title=f"{TITLE} - API", oauth2_redirect_url=None,
                               swagger_js_url="/static/docs/swagger-ui-bundle.js",
                               swagger_css_url="/static/docs/swagger-ui.css",
                               swagger_favicon_url="/static/docs/favicon.png",
                               swagger_ui_parameters={"persistAuthorization": True})
    page.headers.update(OFFLINE)
    return page


@router.get("/redoc")
def redoc() -> HTMLResponse:
    page = get_redoc_html(openapi_url="/openapi.json", title=f"{TITLE} - API reference",
                          redoc_js_url="/static/docs/redoc.standalone.js", redoc_favicon_url="/static/docs/favicon.png",
                          with_google_fonts=False)
    page.headers.update(OFFLINE)
    return page
