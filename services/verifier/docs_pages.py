"""The API docs pages (``/docs``, ``/redoc``) served with no network: their JS, CSS and favicon come from the
installed ``fastapi-offline`` package, never a CDN, and a Content-Security-Policy keeps the pages on the
service (air-gapped clusters are where these services usually run)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_ASSETS = "/docs-static"  # Swagger UI / ReDoc JS, CSS and favicon (behind the key like /docs)
# The docs pages may load only what the service itself serves: ReDoc's sidebar logo (cdn.redoc.ly) and
# Swagger UI's validator badge would otherwise reach out of an air-gapped cluster. Inline script and styles
# are the pages' own bootstrap and the bundles' CSS-in-JS; ReDoc's search runs in a blob: worker.
DOCS_CSP = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def docs_routes(app: FastAPI) -> None:
    """``/docs`` (Swagger UI) and ``/redoc`` with their JS, CSS and favicon from the installed
    ``fastapi-offline`` package, so they render with no network; ``DOCS_CSP`` keeps them on the service."""
    app.mount(DOCS_ASSETS, StaticFiles(packages=[("fastapi_offline", "static")]), name="docs-static")

    def assets(request: Request) -> tuple[str, str]:
        root = request.scope.get("root_path", "")  # behind a path prefix (Ray Serve, a proxy)
        return f"{root}{app.openapi_url}", f"{root}{DOCS_ASSETS}"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        spec, static = assets(request)
        page = get_swagger_ui_html(
            openapi_url=spec,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{static}/swagger-ui-bundle.js",
            swagger_css_url=f"{static}/swagger-ui.css",
            swagger_favicon_url=f"{static}/favicon.png",
            oauth2_redirect_url=None,
            swagger_ui_parameters={"validatorUrl": None},  # no badge from validator.swagger.io
        )
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        spec, static = assets(request)
        page = get_redoc_html(
            openapi_url=spec,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{static}/redoc.standalone.js",
            redoc_favicon_url=f"{static}/favicon.png",
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page
