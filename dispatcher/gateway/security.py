"""The gateway's guard: bearer tokens, embed origins, frame-ancestors, dev tokens.

- Every event and status request needs a token that may use the app (and,
  if bound to a session, that session); for a job the app is read from the
  run's record.
- A browser event whose `Origin` is not among the app's `embed_origins`
  (`'self'` meaning the gateway itself) is refused, so other sites cannot
  drive an app with a token they scraped.
- Proxied app responses and the per-app embed page carry
  `Content-Security-Policy: frame-ancestors <embed_origins>`, so only those
  sites can frame them.
- Publishing (`PUT`, `DELETE`, rollback and reading specs and revisions
  under `/v1/apps/{owner}/{title}`) needs a publisher token whose `publish`
  claim names the owner (`publisher`); a page's token has none.
- `GET /v1/dev/token` mints tokens for anyone; it exists only when
  `auth.dev_token_endpoint` is on, which only `spinyard up` does.
"""

import asyncio
import html

from aiohttp import web
from yarl import URL

from dispatcher.gateway import SESSION, GatewayError
from dispatcher.gateway.auth import Authenticator, AuthError, mint
from dispatcher.gateway.specs import SpecCache
from dispatcher.settings import AuthSettings
from handlers.jobs import Job
from handlers.state import State
from schemas import codec
from schemas import errors as codes
from schemas.answers import DevToken
from schemas.names import JOB_ID_RE, check_app, check_session
from schemas.spec import AppSpec

JOB_RECORD_WAIT_S = 3.0  # how long a just-requested run may take to be recorded


def bearer_token(request: web.Request) -> str | None:
    """The token from `Authorization: Bearer` or, for EventSource, `?token=`."""
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.query.get("token")


class Guard:
    """Checks requests against tokens and app specs."""

    def __init__(self, settings: AuthSettings, state: State, public_url: str):
        self.settings = settings
        self.authenticator = Authenticator(settings)
        self.state = state
        self.own_origin = str(URL(public_url).origin())
        # Until the gateway gives it its watched cache (`use_specs`), specs are read each time.
        self.specs = SpecCache(state.apps, size=0, max_age_s=1.0)

    def use_specs(self, specs: SpecCache) -> None:
        """Read app specs from the gateway's cache (see `specs`)."""
        self.specs = specs

    async def spec(self, app: str) -> AppSpec | None:
        return await self.specs.get(app)

    def allowed_origins(self, spec: AppSpec | None) -> list[str]:
        origins = spec.embed_origins if spec and spec.embed_origins else ["'self'"]
        return [self.own_origin if o == "'self'" else o.rstrip("/") for o in origins]

    async def frame_ancestors(self, app: str) -> str:
        """The CSP header value for pages of `app`."""
        spec = await self.spec(app)
        origins = spec.embed_origins if spec and spec.embed_origins else ["'self'"]
        return "frame-ancestors " + " ".join(origins)

    async def hook(self, request: web.Request, app: str | None, job_id: str | None) -> None:
        """The gateway's auth hook: raises `AuthError`/`GatewayError` to refuse.

        The token is checked before anything is looked up, so a caller without
        one learns nothing (not even whether a run exists). A run is allowed if
        the token may use its app and, when bound to a session, is that run's.
        """
        claims = None
        if self.authenticator.enabled:
            claims = self.authenticator.verify(bearer_token(request))
        session = request.get(SESSION)
        if app is None and job_id is not None:
            app, session = await self._job_owner(job_id)
        origin = request.headers.get("Origin")
        if request.method == "POST" and origin and app is not None:
            spec = await self.spec(app)
            if spec is not None and origin.rstrip("/") not in self.allowed_origins(spec):
                raise GatewayError(403, codes.FORBIDDEN, f"pages on {origin} may not embed {app}")
        if claims is not None:
            self.authenticator.authorize(claims, app, session)

    def publisher(self, request: web.Request, owner: str) -> str | None:
        """Check the request's publisher token for `owner`; its subject (None if it has none,
        or if authentication is off: then anyone may publish, as anyone may send events).

        Raises:
            AuthError: 401 without a valid token, 403 if it may not publish `owner`'s apps.
        """
        if not self.authenticator.enabled:
            return None
        claims = self.authenticator.verify(bearer_token(request))
        self.authenticator.authorize_publish(claims, owner)
        return claims.subject

    async def _job_owner(self, job_id: str) -> tuple[str, str | None]:
        """The app and session of a run, waiting briefly for a run just requested.

        The gateway answers a run request before the handler has recorded it, and
        a page asks for the run's status at once; so an unknown id is watched for
        up to `JOB_RECORD_WAIT_S` before it is a 404.
        """
        entry = await self.state.jobs.read(job_id)
        if entry is not None:
            return entry.value.app, entry.value.session
        if JOB_ID_RE.match(job_id):
            watcher = await self.state.jobs.kv.watch(job_id)
            try:
                async with asyncio.timeout(JOB_RECORD_WAIT_S):
                    async for update in watcher:
                        if update is not None and update.value:
                            job = codec.decode(Job, update.value)
                            return job.app, job.session
            except TimeoutError:
                pass
            finally:
                await watcher.stop()
        raise GatewayError(404, codes.NOT_FOUND, f"no run with id {job_id!r}")

    async def dev_token(self, request: web.Request) -> web.Response:
        """`GET /v1/dev/token?app=owner/title&session=s` (dev only): a short-lived token."""
        secret = self.settings.hs256_secret
        if secret is None:
            raise GatewayError(404, codes.NOT_FOUND, "dev tokens need an HS256 secret")
        apps = request.query.getall("app", []) or ["*"]
        session = request.query.get("session")
        try:
            token = mint(
                secret.get_secret_value(),
                apps,
                session=session,
                ttl_s=3600,
                subject="dev",
                audience=self.settings.audience,
                issuer=self.settings.issuer,
            )
        except ValueError as exc:
            raise GatewayError(422, codes.BAD_REQUEST, str(exc)) from exc
        return web.json_response(DevToken(token=token, expires_in=3600).model_dump(mode="json"))

    async def embed_page(self, request: web.Request) -> web.Response:
        """`GET /embed/{owner}/{title}`: a page holding just the app, framable by its origins."""
        name = f"{request.match_info['owner']}/{request.match_info['title']}"
        try:
            check_app(name)
            session = request.query.get("session")
            if session is not None:
                check_session(session)
        except ValueError as exc:
            raise GatewayError(404, codes.UNKNOWN_APP, str(exc)) from exc
        if await self.spec(name) is None:
            raise GatewayError(404, codes.UNKNOWN_APP, f"no app named {name!r}")
        token = request.query.get("token", "")
        page = EMBED_PAGE.format(
            app=html.escape(name),
            token=html.escape(token, quote=True),
            session=html.escape(session or "", quote=True),
        )
        response = web.Response(text=page, content_type="text/html")
        response.headers["Content-Security-Policy"] = await self.frame_ancestors(name)
        # The page's URL carries the token: never send it on as a Referer.
        response.headers["Referrer-Policy"] = "no-referrer"
        return response


EMBED_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{app}</title>
<style>html,body{{margin:0;height:100%}}div{{height:100%}}</style></head>
<body><div data-spinyard-app="{app}" data-height="100%" data-token="{token}"
 data-session="{session}"></div>
<script src="/embed.js"></script></body></html>
"""


def install(app: web.Application, guard: Guard) -> None:
    """Add the guard's own routes to the gateway."""
    app.router.add_get("/embed/{owner}/{title}", guard.embed_page)
    if guard.settings.dev_token_endpoint:
        app.router.add_get("/v1/dev/token", guard.dev_token)


__all__ = ["AuthError", "Guard", "bearer_token", "install"]
