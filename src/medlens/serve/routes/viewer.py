"""The browser viewer: ``GET /`` (the page), ``POST /login`` (a session cookie for a valid key), ``POST /logout``.

The session cookie holds a random token (``auth.Auth``), never the key: httponly, SameSite=strict, Secure
under TLS. The viewer's files are served from ``/static`` (mounted by ``create_app``).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from medlens.serve.auth import SESSION_COOKIE, SESSION_TTL_S, session_token
from medlens.serve.context import Ctx

STATIC = Path(__file__).resolve().parents[1] / "static"

router = APIRouter()


def page(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def viewer():
    return HTMLResponse(page("index.html"))


@router.post("/login", include_in_schema=False)
async def login(request: Request, ctx: Ctx):
    form = await request.form()
    key = str(form.get("key", ""))
    if not ctx.auth.valid(key):
        return HTMLResponse(page("401.html"), status_code=401)
    resp = RedirectResponse("/", status_code=303)
    # a random session token (the key stays in the browser's form, never in a cookie or on disk)
    resp.set_cookie(SESSION_COOKIE, ctx.auth.new_session(key), max_age=SESSION_TTL_S, httponly=True,
                    samesite="strict", secure=ctx.settings.tls, path="/")
    return resp


@router.post("/logout", include_in_schema=False)
async def logout(request: Request, ctx: Ctx):
    ctx.auth.end_session(session_token(request.headers))
    resp = RedirectResponse("/", status_code=303)
    resp.delete_cookie(SESSION_COOKIE, httponly=True, samesite="strict", secure=ctx.settings.tls, path="/")
    return resp
