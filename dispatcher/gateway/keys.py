"""What the gateway's aiohttp app holds, by typed key: set once in `app.make_app`, read by
the route modules (`events`, `app`)."""

from collections.abc import Callable

from aiohttp import web
from nats.aio.client import Client
from nats.js import JetStreamContext

from dispatcher.backends.secrets import SecretStore
from dispatcher.gateway import Metrics
from dispatcher.gateway.proxy import Proxy
from dispatcher.gateway.security import Guard
from dispatcher.gateway.specs import SpecCache
from dispatcher.gateway.sse import StatusStreams
from dispatcher.settings import GatewaySettings
from handlers.ports import Backend
from handlers.state import State

SETTINGS = web.AppKey("settings", GatewaySettings)
JS = web.AppKey("js", JetStreamContext)
NC = web.AppKey("nc", Client)
STATE = web.AppKey("state", State)
SPECS = web.AppKey("specs", SpecCache)  # app specs, watched (see `specs`)
BACKEND = web.AppKey("backend", Backend | None)  # type: ignore[arg-type]
AUTH = web.AppKey("auth", Callable | None)  # type: ignore[arg-type]
METRICS = web.AppKey("metrics", Metrics)
STREAMS = web.AppKey("streams", StatusStreams)
PROXY = web.AppKey("proxy", Proxy)
GUARD = web.AppKey("guard", Guard | None)  # type: ignore[arg-type]
SECRETS = web.AppKey("secrets", SecretStore | None)  # type: ignore[arg-type]  # app secrets
API = web.AppKey("openapi", dict)  # the OpenAPI document, built once the routes are added
