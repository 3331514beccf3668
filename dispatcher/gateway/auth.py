"""Who may publish events and read status: JWTs checked at the gateway.

A token is signed with HS256 (a shared secret) or RS256 (the platform keeps
the private key, spinyard gets the public key). Claims spinyard reads:

- `exp` (required): expiry, Unix seconds.
- `apps` (required, unless `publish` is present): app names the bearer may
  use; `owner/*` allows every app of an owner, `*` every app.
- `publish` (optional): owners whose apps the bearer may publish, update,
  roll back and remove over HTTP (`PUT /v1/apps/{owner}/{title}`, ...);
  `*` means every owner. A page's token has none, so it cannot publish.
- `session` (optional): binds the token to one session id; events for another
  session are refused.
- `sub`, `aud`, `iss`: the subject is logged; audience and issuer are checked
  when configured.

A platform's backend mints a token per page view (see docs/auth.md);
`spinyard token` does the same from the configured secret.

A page sends its token with every event and stream, so verified tokens are
kept (`auth.token_cache_size`, least recently used dropped first), keyed by
the token's exact text: a token seen again costs a dictionary lookup, not a
signature check. A kept token is still refused the moment it expires (its
`exp`, with the same leeway as a fresh check); the claims it grants are the
ones its signature covered. Tokens that fail are not kept. Keys, audience
and issuer come from the settings, read once: changing any of them means a
restart, which empties the cache.
"""

import fnmatch
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import jwt

from dispatcher.settings import AuthSettings, SettingsError
from schemas import errors as codes
from schemas.names import check_app, check_session


class AuthError(Exception):
    """A request's credentials were missing, invalid, or not enough for what it asked."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _unauthorized(message: str) -> AuthError:
    return AuthError(401, codes.UNAUTHORIZED, message)


def _forbidden(message: str) -> AuthError:
    return AuthError(403, codes.FORBIDDEN, message)


@dataclass(frozen=True)
class Claims:
    subject: str | None
    apps: tuple[str, ...]
    session: str | None
    expires: float
    publish: tuple[str, ...] = ()

    def may_use(self, app: str) -> bool:
        return any(fnmatch.fnmatchcase(app, pattern) for pattern in self.apps)

    def may_publish(self, owner: str) -> bool:
        return owner in self.publish or "*" in self.publish


def _read_key(value: str) -> str:
    if value.lstrip().startswith("-----BEGIN"):
        return value
    return Path(value).read_text()


class Authenticator:
    """Verifies bearer tokens against the configured keys."""

    def __init__(self, settings: AuthSettings):
        self.settings = settings
        self._keys: list[tuple[str, object]] = []
        self._verified: OrderedDict[str, Claims] = OrderedDict()
        if settings.hs256_secret is not None:
            secret = settings.hs256_secret.get_secret_value()
            if len(secret) < 32:
                raise SettingsError("auth.hs256_secret must be at least 32 characters")
            self._keys.append(("HS256", secret))
        if settings.rs256_public_key:
            self._keys.append(("RS256", _read_key(settings.rs256_public_key)))
        if settings.enabled and not self._keys:
            raise SettingsError(
                "authentication is on but no key is set: set SPINYARD_AUTH__HS256_SECRET or "
                "SPINYARD_AUTH__RS256_PUBLIC_KEY (or, on a trusted network only, "
                "SPINYARD_AUTH__ENABLED=false)"
            )

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def verify(self, token: str | None) -> Claims:
        """Decode and check a token.

        Raises:
            AuthError: 401 when missing, malformed, forged, expired or lacking claims.
        """
        if not token:
            raise _unauthorized("a bearer token is required (Authorization header or ?token=)")
        claims = self._verified.get(token)
        if claims is not None:
            if time.time() < claims.expires + self.settings.leeway_s:
                self._verified.move_to_end(token)
                return claims
            del self._verified[token]
            raise _unauthorized("the token has expired")
        claims = self._check(token)
        if self.settings.token_cache_size:
            self._verified[token] = claims
            if len(self._verified) > self.settings.token_cache_size:
                self._verified.popitem(last=False)
        return claims

    def _check(self, token: str) -> Claims:
        """Verify `token`'s signature and claims (no cache)."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise _unauthorized("the token is not a JWT") from None
        algorithm = header.get("alg")
        key = next((k for alg, k in self._keys if alg == algorithm), None)
        if key is None:
            raise _unauthorized(f"tokens signed with {algorithm!r} are not accepted here")
        options = {"require": ["exp"], "verify_aud": self.settings.audience is not None}
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.settings.audience,
                issuer=self.settings.issuer,
                leeway=self.settings.leeway_s,
                options=options,
            )
        except jwt.ExpiredSignatureError:
            raise _unauthorized("the token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise _unauthorized(f"the token is not valid: {exc}") from None
        publish = claims.get("publish", [])
        if not isinstance(publish, list) or not all(isinstance(o, str) for o in publish):
            raise _unauthorized("the token's 'publish' claim must list owners")
        apps = claims.get("apps", [] if publish else None)
        if not isinstance(apps, list) or not all(isinstance(a, str) for a in apps):
            raise _unauthorized("the token has no 'apps' claim listing the apps it may use")
        session = claims.get("session")
        if session is not None and not isinstance(session, str):
            raise _unauthorized("the token's 'session' claim must be a string")
        return Claims(claims.get("sub"), tuple(apps), session, float(claims["exp"]), tuple(publish))

    def authorize(self, claims: Claims, app: str | None, session: str | None = None) -> None:
        """Check that `claims` allow `app` (and `session`, if the token is bound to one).

        Raises:
            AuthError: 403 when the token may not use the app or is bound to another session.
        """
        if app is not None and not claims.may_use(app):
            raise _forbidden(f"this token may not use {app}")
        if claims.session is not None and session is not None and session != claims.session:
            raise _forbidden("this token is bound to another session")

    def authorize_publish(self, claims: Claims, owner: str) -> None:
        """Check that `claims` may publish apps of `owner`.

        Raises:
            AuthError: 403 when the token has no `publish` claim naming `owner` (or `*`).
        """
        if not claims.may_publish(owner):
            if not claims.publish:
                raise _forbidden("this token may not publish apps (it has no 'publish' claim)")
            raise _forbidden(f"this token may not publish apps of {owner!r}")


def mint(
    secret: str,
    apps: list[str],
    *,
    publish: list[str] | None = None,
    session: str | None = None,
    subject: str | None = None,
    ttl_s: float = 3600,
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """An HS256 token for `apps` (and `session`; publishing `publish`), valid `ttl_s` seconds.

    Raises:
        ValueError: an app pattern, an owner or the session id is malformed.
    """
    for app in apps:
        if app != "*" and not app.endswith("/*"):
            check_app(app)
    for owner in publish or []:
        if owner != "*":
            check_app(f"{owner}/x")
    if session is not None:
        check_session(session)
    now = int(time.time())
    claims: dict = {"apps": apps, "iat": now, "exp": now + int(ttl_s)}
    if publish:
        claims["publish"] = publish
    for name, value in (("session", session), ("sub", subject), ("aud", audience), ("iss", issuer)):
        if value is not None:
            claims[name] = value
    return jwt.encode(claims, secret, algorithm="HS256")


def new_secret() -> str:
    """A fresh random HS256 secret."""
    return secrets.token_urlsafe(48)
