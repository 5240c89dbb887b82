"""The web page at `/`: a prompt box and the list of videos, as static files shipped in the package. The page
is a client of the same `/v1` routes as the OpenAI SDK, with the same keys; it holds no data itself, so it is
served without a key (it asks for one when the API does)."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles

from wanserve.config import Settings

_STATIC = files("wanserve.api") / "static"


def page_headers(settings: Settings) -> dict[str, str]:
    """Scripts, styles and calls from this origin only, and never inside another site's frame (the page has
    cancel and delete buttons). Downloads redirected to presigned S3 URLs play from the bucket's origin."""
    media = "'self' blob:" + (" https: http:" if settings.storage_redirect else "")
    policy = (
        "default-src 'self'; script-src 'self'; style-src 'self'; "
        f"img-src {media} data:; media-src {media}; connect-src {media}; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
    return {
        "content-security-policy": policy,
        "x-frame-options": "DENY",
        "referrer-policy": "no-referrer",
        # Revalidated on every load, so an upgraded server never runs with a cached older page.
        "cache-control": "no-cache",
    }


def install(app: FastAPI, settings: Settings) -> None:
    headers = page_headers(settings)
    index = str(_STATIC / "index.html")
    page = APIRouter(include_in_schema=False)

    @page.api_route("/", methods=["GET", "HEAD"])
    def web_page() -> FileResponse:
        return FileResponse(index, media_type="text/html; charset=utf-8", headers=headers)

    app.include_router(page)
    app.mount("/static", _Revalidated(directory=str(_STATIC)), name="static")


class _Revalidated(StaticFiles):
    """The page's files, revalidated on every load (a 304 while unchanged), as the page is: an upgraded server
    must not run its new page with last week's script."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["cache-control"] = "no-cache"
        return response
