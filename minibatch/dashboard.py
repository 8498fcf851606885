"""The dashboard at `/ui`: server-rendered pages over the same store, for people.

Sign-in takes an API key once. The session cookie holds a random token; the store keeps
its digest with the key's digest (never the key), so a key revoked anywhere ends its
sessions at their next request. Every POST is refused with 403 unless it comes from this
origin (`Sec-Fetch-Site`, `Origin`) and carries the session's form token (at sign-in, the
token of the sign-in page's own cookie). Templates are autoescaped and every untrusted
text (inputs, outputs, errors, response bodies) is clipped. The Content-Security-Policy
allows scripts and styles from this origin only: the one script, `static/ui.js`, polls
`/ui/live` to move the progress bars. Charts are SVG drawn here, with no script.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, NamedTuple, get_args
from urllib.parse import parse_qs, urlencode

import jinja2
import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from . import models
from .api import Api, as_error, decimal_arg, result_lines
from .auth import hash_key
from .errors import Forbidden, InvalidInput, MinibatchError
from .store import ERRORS_SCANNED

SESSION_COOKIE = "mb_session"
SIGN_IN_COOKIE = "mb_sign_in"  # the sign-in form's token, before there is a session
SESSION_S = 12 * 3600.0
PAGE = 50  # rows per page of batches, items and endpoints
DELIVERIES_PAGE = 20
ERROR_GROUPS = 10
CHART_BARS = 60
MIN_SLOTS = 30
FORM_LIMIT = 16 * 1024
CLIP = 300  # characters of an untrusted text shown in a table
CLIP_LONG = 4000  # ... and when opened
LIVE_MAX = 100  # batches one /ui/live request asks about
_BATCH_STATUSES = get_args(models.BatchStatus)
_ITEM_STATUSES = get_args(models.ItemStatus)
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
     b" connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]


class Session(NamedTuple):
    token_hash: bytes
    tenant: str
    csrf: str


def clip(text: Any, limit: int = CLIP) -> str:
    """`text` (a JSON value shown as JSON) cut to `limit` characters."""
    if not isinstance(text, str):
        text = msgspec.json.encode(text).decode()
    return text if len(text) <= limit else text[:limit] + "…"


def when(moment: datetime | float | None) -> str:
    if moment is None:
        return "—"
    if not isinstance(moment, datetime):
        moment = models.to_datetime(moment)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def chart_bars(first: int, width: int, counts: list[int], height: int = 100,
               span: int = 600) -> list[dict[str, Any]]:
    """SVG bars of items ended per second: one per bucket of `width` seconds, in at least
    MIN_SLOTS slots, so a short life is a few bars, not one bar as wide as the chart."""
    top = max(counts, default=0)
    bar = span / max(len(counts), MIN_SLOTS)
    return [{"x": round(i * bar, 2), "w": round(max(bar - 1, 0.5), 2),
             "h": round(height * n / top, 2) if top else 0,
             "y": round(height - (height * n / top if top else 0), 2),
             "rate": round(n / width, 1), "at": when(float(first + i * width))}
            for i, n in enumerate(counts)]


class Dashboard:
    """The routes of `/ui`, bound to the API's Minibatch and authenticator."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.mb = api.mb
        env = jinja2.Environment(loader=jinja2.PackageLoader("minibatch", "templates"),
                                 autoescape=True, undefined=jinja2.StrictUndefined)
        env.filters.update(clip=clip, when=when)
        env.globals.update(CLIP_LONG=CLIP_LONG)
        self.templates = Jinja2Templates(env=env)

    # -- sessions ----------

    async def session(self, request: Request) -> Session | None:
        """The request's session if it is signed in with a key still valid."""
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        token_hash = hash_key(token)
        store = self.mb.store
        found = await store.call(lambda: store.session_get(token_hash, self.mb.now()))
        if found is None:
            return None
        tenant = await self.api.auth.tenant_of(found[0])
        if tenant is None:  # the key was revoked: its sessions end
            await store.call(store.session_delete, token_hash)
            return None
        return Session(token_hash, tenant, found[1])

    def page(self, request: Request, name: str, code: int = 200, **context: Any
             ) -> Response:
        response = self.templates.TemplateResponse(request, name, context, status_code=code)
        response.headers["cache-control"] = "no-store"
        return response

    # -- sign-in and sign-out ----------

    async def login_page(self, request: Request) -> Response:
        return self._login_form(request)

    def _login_form(self, request: Request, error: str | None = None,
                    status: int = 200) -> Response:
        token = secrets.token_urlsafe(24)
        response = self.page(request, "login.html", status, csrf=token, error=error,
                             session=None)
        _set_cookie(request, response, SIGN_IN_COOKIE, token)
        return response

    async def login(self, request: Request) -> Response:
        form = await self._form(request)
        cookie = request.cookies.get(SIGN_IN_COOKIE, "")
        if not cookie or not hmac.compare_digest(cookie, form.get("csrf", "")):
            raise Forbidden("the sign-in form expired or came from another site; try again")
        key_hash = hash_key(form.get("api_key", "").strip())
        if await self.api.auth.tenant_of(key_hash) is None:
            return self._login_form(request, "Unknown or revoked API key.", 401)
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)

        def create() -> None:
            now = self.mb.now()
            self.mb.store.session_create(hash_key(token), key_hash, csrf, now,
                                         now + SESSION_S)

        await self.mb.store.call(create)
        response = RedirectResponse("/ui/batches", status_code=303)
        _set_cookie(request, response, SESSION_COOKIE, token)
        response.delete_cookie(SIGN_IN_COOKIE, path="/ui", httponly=True, samesite="strict")
        return response

    async def logout(self, request: Request, session: Session) -> Response:
        await self.mb.store.call(self.mb.store.session_delete, session.token_hash)
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/ui", httponly=True, samesite="strict")
        return response

    # -- pages ----------

    async def home(self, request: Request) -> Response:
        return RedirectResponse("/ui/batches", status_code=303)

    async def batches(self, request: Request, session: Session) -> Response:
        status = _status_arg(request, "status", _BATCH_STATUSES)
        after = request.query_params.get("after")
        store = self.mb.store
        batches, more = await store.call(store.batches_list, session.tenant, status=status,
                                         limit=PAGE, after=after)
        next_url = _with(request, after=batches[-1].id) if more else None
        return self.page(request, "batches.html", session=session, batches=batches,
                         status=status, statuses=_BATCH_STATUSES, next_url=next_url)

    async def batch(self, request: Request, session: Session) -> Response:
        batch_id, tenant = request.path_params["batch_id"], session.tenant
        deliveries_after = request.query_params.get("deliveries_after")
        store = self.mb.store

        def read() -> tuple:  # everything the page shows: one call
            batch = store.batch_get(batch_id, tenant)  # a 404 before a bad query's 422
            seq = store.batch_seq(batch_id, tenant)
            status = _status_arg(request, "items", _ITEM_STATUSES)
            after = _index_arg(request.query_params.get("after"))
            return (batch, status, store.items_page(batch_id, tenant, status=status,
                                                    limit=PAGE, after=after),
                    store.deliveries_page(seq, limit=DELIVERIES_PAGE, after=deliveries_after),
                    store.batch_throughput(seq, CHART_BARS),
                    store.items_error_groups(seq, ERROR_GROUPS))

        (batch, status, (items, more), (deliveries, more_deliveries), (first, width, counts),
         errors) = await store.call(read)
        return self.page(
            request, "batch.html", session=session, batch=batch, items=items,
            item_status=status, item_statuses=_ITEM_STATUSES,
            next_items=_with(request, after=items[-1].index) if more else None,
            deliveries=deliveries,
            next_deliveries=(_with(request, deliveries_after=deliveries[-1].id)
                             if more_deliveries else None),
            errors=errors, errors_scanned=ERRORS_SCANNED,
            bars=chart_bars(first, width, counts), bar_width=width,
            peak=round(max(counts, default=0) / width, 1),
            terminal=batch.status in models.BATCH_TERMINAL)

    async def results(self, request: Request, session: Session) -> Response:
        batch_id = request.path_params["batch_id"]
        pages = self.mb.result_pages(batch_id, tenant=session.tenant)
        first = await anext(pages, None)  # a 404 is raised here, before streaming starts
        return StreamingResponse(result_lines(first, pages), media_type="application/jsonl",
                                 headers={"content-disposition":
                                          f'attachment; filename="{batch_id}.jsonl"'})

    async def endpoints(self, request: Request, session: Session) -> Response:
        after, store = request.query_params.get("after"), self.mb.store

        def read() -> tuple[list, bool, dict[str, dict[str, Any]]]:  # rows, health: one call
            rows, more = store.endpoints_list(session.tenant, after=after, limit=PAGE)
            return rows, more, {row.id: store.endpoint_health(row.id) for row in rows}

        rows, more, health = await store.call(read)
        return self.page(request, "endpoints.html", session=session, endpoints=rows,
                         health=health,
                         next_url=_with(request, after=rows[-1].id) if more else None)

    async def live(self, request: Request, session: Session) -> Response:
        """The status and counters of the batches a page shows, for ui.js."""
        ids = request.query_params.getlist("id")[:LIVE_MAX]
        found = {}
        for row in await self.mb.store.call(self.mb.store.batch_rows, ids, session.tenant):
            done = row.succeeded + row.failed + row.cancelled + row.expired
            found[row.id] = {
                "status": row.status, "done": done, "total": row.total,
                "metrics": {"queued": row.queued, "running": row.running,
                            "succeeded": row.succeeded, "failed": row.failed,
                            "cancelled": row.cancelled, "expired": row.expired}}
        return JSONResponse({"batches": found}, headers={"cache-control": "no-store"})

    # -- actions ----------

    async def cancel(self, request: Request, session: Session) -> Response:
        batch_id = request.path_params["batch_id"]
        await self.mb.cancel(batch_id, tenant=session.tenant)
        return RedirectResponse(f"/ui/batches/{batch_id}", status_code=303)

    async def redeliver(self, request: Request, session: Session) -> Response:
        delivery = await self.mb.redeliver(request.path_params["delivery_id"],
                                           tenant=session.tenant)
        return RedirectResponse(f"/ui/batches/{delivery.batch_id}#deliveries",
                                status_code=303)

    # -- requests ----------

    async def _form(self, request: Request) -> dict[str, str]:
        """The urlencoded form of a POST from this origin (403 from any other)."""
        if not _same_origin(request):
            raise Forbidden("a state-changing request from another site is refused")
        body = await self.api.read_body(request, FORM_LIMIT)
        try:
            fields = parse_qs(body.decode(), max_num_fields=20)
        except (UnicodeDecodeError, ValueError):
            raise InvalidInput("the form is not urlencoded text", []) from None
        return {name: values[0] for name, values in fields.items()}

    def signed_in(self, handler: Callable[[Request, Session], Awaitable[Response]],
                  post: bool = False) -> Callable[[Request], Awaitable[Response]]:
        """`handler` with the request's session. Without one, a page goes to the
        sign-in page and anything else is refused; a POST must also come from this
        origin with the session's form token."""
        async def route(request: Request) -> Response:
            session = await self.session(request)
            if post:
                form = await self._form(request)
                if session is None or not hmac.compare_digest(session.csrf,
                                                              form.get("csrf", "")):
                    raise Forbidden("the form expired or came from another site; reload"
                                    " the page and try again")
            elif session is None:
                if request.url.path == "/ui/live":
                    return JSONResponse({"error": "signed out"}, status_code=401)
                return RedirectResponse("/ui/login", status_code=303)
            return await handler(request, session)

        return route

    async def on_error(self, request: Request, exc: Exception) -> Response:
        error = as_error(exc)
        return self.page(request, "error.html", error.status, error=error,
                         session=await self.session(request))


def _same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another site or origin."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    return origin is None or origin == own


def _set_cookie(request: Request, response: Response, name: str, value: str) -> None:
    response.set_cookie(name, value, path="/ui", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")


def _status_arg(request: Request, name: str, statuses: tuple[str, ...]) -> str | None:
    status = request.query_params.get(name) or None
    if status is not None and status not in statuses:
        raise InvalidInput(f"unknown status {status!r}; one of {', '.join(statuses)}", [])
    return status


def _index_arg(text: str | None) -> int:
    """An items page's `after` (an item's index); -1 for the first page."""
    index = -1 if text is None else decimal_arg(text)
    if index is None:
        raise InvalidInput(f"unknown cursor {text!r}", [])
    return index


def _with(request: Request, **changes: Any) -> str:
    """This page's URL with some query values changed."""
    query = {**request.query_params, **{k: str(v) for k, v in changes.items()}}
    return f"{request.url.path}?{urlencode(query)}"


def with_security_headers(app: Any) -> Any:
    """The app, with the CSP and friends on every response."""
    async def secured(scope: dict, receive: Any, send: Any) -> None:
        async def send_secured(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await app(scope, receive, send_secured)

    return secured


def create_app(api: Api) -> Any:
    """The dashboard as an app of its own, to mount at /ui."""
    ui = Dashboard(api)
    routes = [
        Route("/", ui.home),
        Route("/login", ui.login_page, methods=["GET"]),
        Route("/login", ui.login, methods=["POST"]),
        Route("/logout", ui.signed_in(ui.logout, post=True), methods=["POST"]),
        Route("/batches", ui.signed_in(ui.batches)),
        Route("/batches/{batch_id}", ui.signed_in(ui.batch)),
        Route("/batches/{batch_id}/results", ui.signed_in(ui.results)),
        Route("/batches/{batch_id}/cancel", ui.signed_in(ui.cancel, post=True),
              methods=["POST"]),
        Route("/deliveries/{delivery_id}/redeliver", ui.signed_in(ui.redeliver, post=True),
              methods=["POST"]),
        Route("/endpoints", ui.signed_in(ui.endpoints)),
        Route("/live", ui.signed_in(ui.live)),
        Mount("/static", app=StaticFiles(packages=[("minibatch", "static")])),
    ]
    return with_security_headers(Starlette(routes=routes, exception_handlers={
        MinibatchError: ui.on_error, HTTPException: ui.on_error}))
