"""The review page: a static HTML/JS/CSS shell at ``/review`` that reads the review API.

The shell holds no data, so it is served without a key; the page asks for the admin key once,
keeps it in ``sessionStorage`` and sends it as the bearer token of its API calls. Like the API,
the page exists only when an admin key is configured (:func:`server.review.require_admin`
answers 404 otherwise). A strict Content-Security-Policy allows only these same-origin files:
record text is untrusted model output, and even if it ever reached the DOM as markup, no inline
script or handler would run. Everything is local (no CDN, no fonts): the page works offline.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {"review.js": "text/javascript", "review.css": "text/css"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def review_enabled(request: Request) -> None:
    """404 (as for an unknown URL) unless an admin key is configured."""
    if not request.app.state.settings.admin_key:
        raise HTTPException(404)


page_router = APIRouter(include_in_schema=False, dependencies=[Depends(review_enabled)])


@page_router.get("/review")
def review_page() -> FileResponse:
    """The page shell."""
    return FileResponse(STATIC / "review.html", media_type="text/html", headers=HEADERS)


@page_router.get("/review/static/{name}")
def review_asset(name: str) -> FileResponse:
    """The page's script and style sheet (nothing else under ``static/`` is served)."""
    if name not in ASSETS:
        raise HTTPException(404)
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=HEADERS)
