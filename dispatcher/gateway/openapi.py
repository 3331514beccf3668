"""The gateway's OpenAPI 3.1 document, served at `GET /v1/openapi.json`.

Schemas come from the pydantic models of the public contract (`schemas/`),
so the document cannot drift from what the gateway validates and answers.
It lists exactly the routes the app has registered: each needs an entry in
`OPERATIONS`, and a route without one fails `make_app` (and its tests)
rather than going undocumented. aiohttp answers HEAD on every GET route;
the document lists the GETs.
"""

import re
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from schemas.answers import (
    Accepted,
    AppSummary,
    DevToken,
    Health,
    Published,
    PublishedSpec,
    RevisionList,
    Rollback,
    SecretNames,
    SecretSet,
)
from schemas.errors import ErrorBody
from schemas.events import INPUTS_MAX_DEPTH, Heartbeat, PageLoad, RunCancel, RunRequest
from schemas.names import INSTANCE_ID_PATTERN, JOB_ID_PATTERN, SECRET_NAME_PATTERN, json_pattern
from schemas.status import AppStatus, JobStatus

OPENAPI_VERSION = "3.1.0"
BROWSER_EVENTS: tuple[type[BaseModel], ...] = (PageLoad, Heartbeat, RunRequest, RunCancel)
# What a "*" route (the app proxy) is listed with.
PROXY_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_TOKEN = json_pattern(r"[a-z0-9][a-z0-9_-]{0,62}")
PATH_PARAMS: dict[str, dict[str, Any]] = {
    "owner": {"type": "string", "pattern": _TOKEN},
    "title": {"type": "string", "pattern": _TOKEN},
    "job_id": {"type": "string", "pattern": json_pattern(JOB_ID_PATTERN)},
    "instance_id": {"type": "string", "pattern": json_pattern(INSTANCE_ID_PATTERN)},
    "name": {
        "type": "string",
        "pattern": json_pattern(SECRET_NAME_PATTERN),
        "description": "the secret's name: an environment variable's, not SPINYARD_*",
    },
    "tail": {"type": "string", "description": "the rest of the app's path; may hold '/'"},
}
_PARAM = re.compile(r"\{(\w+)\}")


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(*statuses: int) -> dict[str, Any]:
    """Error answers, each with the error body; `default` covers any other failure."""
    out: dict[str, Any] = {
        str(s): {"description": ERROR_TEXT[s], "content": _json(_ref("ErrorBody"))}
        for s in statuses
    }
    out["default"] = {"description": "any other error", "content": _json(_ref("ErrorBody"))}
    return out


ERROR_TEXT = {
    400: "bad_encoding (the body is not JSON/msgpack, or not plain data) or bad_request",
    401: "unauthorized: token missing, malformed, forged or expired",
    403: "forbidden: the token or the page's Origin may not use this app (publishing: the "
    "token has no `publish` claim naming the owner)",
    404: "unknown_app / not_found",
    413: "too_large: the body, or a run's inputs",
    422: "invalid_event / invalid_spec (naming the field), invalid_secret or wrong_kind",
    502: "unavailable: the app instance did not answer",
    503: "unavailable: the event bus is not reachable",
}
EVENT_BODY = {
    "oneOf": [_ref(m.__name__) for m in BROWSER_EVENTS],
    "discriminator": {
        "propertyName": "type",
        "mapping": {
            m.model_fields["type"].default: f"#/components/schemas/{m.__name__}"
            for m in BROWSER_EVENTS
        },
    },
}
STATUS_CONTENT = {
    "text/event-stream": {
        "schema": {
            "type": "string",
            "description": "with `Accept: text/event-stream` on GET: `event: status` messages, "
            "`data` the status as JSON, the current one first",
        }
    }
}
SESSION_QUERY = {
    "name": "session",
    "in": "query",
    "required": False,
    "description": "the viewer's session; required for per_session apps",
    "schema": {"type": "string"},
}


def _static(summary: str, content_type: str) -> dict[str, Any]:
    ok = {"description": summary, "content": {content_type: {"schema": {"type": "string"}}}}
    return {"summary": summary, "responses": {"200": ok, **_errors()}}


OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/events"): {
        "summary": "Publish one event",
        "description": "JSON, or msgpack with `Content-Type: application/msgpack`. The body "
        "must be plain data (no msgpack bin or extension types, no lone surrogates, finite "
        f"numbers); `inputs` may nest {INPUTS_MAX_DEPTH} levels. `time` is set by the gateway. "
        "A refused event publishes nothing.",
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": EVENT_BODY}}
            | {"application/msgpack": {"schema": EVENT_BODY}},
        },
        "responses": {
            "202": {"description": "published", "content": _json(_ref("Accepted"))},
            **_errors(400, 401, 403, 404, 413, 422, 503),
        },
    },
    ("GET", "/v1/apps"): {
        "summary": "The registered apps",
        "responses": {
            "200": {
                "description": "apps by name",
                "content": _json({"type": "array", "items": _ref("AppSummary")}),
            },
            **_errors(503),
        },
    },
    ("PUT", "/v1/apps/{owner}/{title}"): {
        "summary": "Publish an app: create it or update its spec (publisher token)",
        "description": "JSON, or YAML with `Content-Type: application/yaml`; `name` must be "
        "the path's or absent. A spec equal to the current revision's (same digest) answers "
        "200 with that revision and writes nothing; a refused spec writes nothing.",
        "security": [{"bearer": []}],
        "requestBody": {
            "required": True,
            "content": _json({"type": "object", "description": "an app spec (docs/app-spec.md)"})
            | {"application/yaml": {"schema": {"type": "string"}}},
        },
        "responses": {
            "201": {"description": "created", "content": _json(_ref("Published"))},
            "200": {"description": "updated, or unchanged", "content": _json(_ref("Published"))},
            **_errors(400, 401, 403, 404, 413, 422, 503),
        },
    },
    ("GET", "/v1/apps/{owner}/{title}"): {
        "summary": "An app's current spec and revision (publisher token)",
        "security": [{"bearer": []}],
        "responses": {
            "200": {"description": "the current spec", "content": _json(_ref("PublishedSpec"))},
            **_errors(401, 403, 404, 503),
        },
    },
    ("DELETE", "/v1/apps/{owner}/{title}"): {
        "summary": "Remove an app; its instances are stopped (publisher token)",
        "security": [{"bearer": []}],
        "responses": {"204": {"description": "removed"}, **_errors(401, 403, 404, 503)},
    },
    ("GET", "/v1/apps/{owner}/{title}/revisions"): {
        "summary": "An app's published revisions, oldest first (publisher token)",
        "security": [{"bearer": []}],
        "responses": {
            "200": {"description": "the revisions kept", "content": _json(_ref("RevisionList"))},
            **_errors(401, 403, 404, 503),
        },
    },
    ("POST", "/v1/apps/{owner}/{title}/rollback"): {
        "summary": "Make an earlier revision's spec current again, as a new revision",
        "security": [{"bearer": []}],
        "requestBody": {"required": True, "content": _json(_ref("Rollback"))},
        "responses": {
            "200": {"description": "rolled back", "content": _json(_ref("Published"))},
            **_errors(401, 403, 404, 422, 503),
        },
    },
    ("GET", "/v1/apps/{owner}/{title}/secrets"): {
        "summary": "The names of an app's secrets, never their values (publisher token)",
        "security": [{"bearer": []}],
        "responses": {
            "200": {"description": "the names, sorted", "content": _json(_ref("SecretNames"))},
            **_errors(401, 403, 404, 503),
        },
    },
    ("PUT", "/v1/apps/{owner}/{title}/secrets/{name}"): {
        "summary": "Set one of an app's secrets (publisher token)",
        "description": "The body is the value, as it is: UTF-8 text, not empty, no NUL. It "
        "reaches the environment of the app's instances and runs whose spec names it, and "
        "is never answered, logged or put on the event bus.",
        "security": [{"bearer": []}],
        "requestBody": {
            "required": True,
            "content": {"text/plain": {"schema": {"type": "string"}}}
            | {"application/octet-stream": {"schema": {"type": "string"}}},
        },
        "responses": {
            "201": {"description": "a new secret", "content": _json(_ref("SecretSet"))},
            "200": {"description": "its value replaced", "content": _json(_ref("SecretSet"))},
            **_errors(401, 403, 404, 413, 422, 503),
        },
    },
    ("DELETE", "/v1/apps/{owner}/{title}/secrets/{name}"): {
        "summary": "Remove one of an app's secrets (publisher token)",
        "security": [{"bearer": []}],
        "responses": {"204": {"description": "removed"}, **_errors(401, 403, 404, 422, 503)},
    },
    ("GET", "/v1/apps/{owner}/{title}/status"): {
        "summary": "An app's status: JSON, or a Server-Sent Events stream",
        "parameters": [SESSION_QUERY],
        "responses": {
            "200": {
                "description": "the current status",
                "content": _json(_ref("AppStatus")) | STATUS_CONTENT,
            },
            **_errors(400, 401, 403, 404, 503),
        },
    },
    ("GET", "/v1/jobs/{job_id}/status"): {
        "summary": "A run's status: JSON, or a Server-Sent Events stream",
        "responses": {
            "200": {
                "description": "the current status",
                "content": _json(_ref("JobStatus")) | STATUS_CONTENT,
            },
            **_errors(400, 401, 403, 404, 503),
        },
    },
    ("GET", "/v1/jobs/{job_id}"): {
        "summary": "A run's current status",
        "responses": {
            "200": {"description": "the current status", "content": _json(_ref("JobStatus"))},
            **_errors(400, 401, 403, 404, 503),
        },
    },
    ("GET", "/apps/{owner}/{title}"): {
        "summary": "On to the shared app's ready instance",
        "responses": {"302": {"description": "to the instance's URL"}, **_errors(404)},
    },
    ("GET", "/apps/{owner}/{title}/"): {
        "summary": "On to the shared app's ready instance",
        "responses": {"302": {"description": "to the instance's URL"}, **_errors(404)},
    },
    ("*", "/apps/{owner}/{title}/{instance_id}"): {
        "summary": "The app instance itself (local backend: reverse proxy, HTTP and WebSocket)",
        "responses": {"200": {"description": "whatever the app answers"}, **_errors(404, 502)},
    },
    ("*", "/apps/{owner}/{title}/{instance_id}/{tail}"): {
        "summary": "The app instance itself (local backend: reverse proxy, HTTP and WebSocket)",
        "responses": {"200": {"description": "whatever the app answers"}, **_errors(404, 502)},
    },
    ("GET", "/embed/{owner}/{title}"): {
        "summary": "A page holding just the app, framable by its embed origins",
        "parameters": [
            SESSION_QUERY,
            {"name": "token", "in": "query", "required": False, "schema": {"type": "string"}},
        ],
        "responses": {
            "200": {"description": "the page", "content": {"text/html": {"schema": {}}}},
            **_errors(404),
        },
    },
    ("GET", "/v1/dev/token"): {
        "summary": "A short-lived token (development only: auth.dev_token_endpoint)",
        "parameters": [
            {"name": "app", "in": "query", "required": False, "schema": {"type": "string"}},
            {"name": "session", "in": "query", "required": False, "schema": {"type": "string"}},
        ],
        "responses": {
            "200": {"description": "a token", "content": _json(_ref("DevToken"))},
            **_errors(404, 422),
        },
    },
    ("GET", "/embed.js"): _static("The embed snippet", "text/javascript"),
    ("GET", "/demo"): _static("The demo page", "text/html"),
    ("GET", "/favicon.ico"): _static("The icon (SVG, whatever the name)", "image/svg+xml"),
    ("GET", "/favicon.svg"): _static("The icon", "image/svg+xml"),
    ("GET", "/"): {
        "summary": "On to the demo page",
        "responses": {"302": {"description": "to /demo"}, **_errors()},
    },
    ("GET", "/healthz"): {
        "summary": "Health: whether the gateway reaches NATS",
        "responses": {
            "200": {"description": "healthy", "content": _json(_ref("Health"))},
            "503": {"description": "NATS is not reachable", "content": _json(_ref("Health"))},
            **_errors(),
        },
    },
    ("GET", "/metrics"): _static("Prometheus metrics", "text/plain"),
    ("GET", "/v1/openapi.json"): {
        "summary": "This document",
        "responses": {
            "200": {"description": "OpenAPI 3.1", "content": _json({"type": "object"})},
            **_errors(),
        },
    },
}


def components() -> dict[str, Any]:
    """The models' JSON Schemas, by name; browser events must name their `type`."""
    requests = [(m, "validation") for m in (*BROWSER_EVENTS, Rollback)]
    answers = [(m, "serialization") for m in (Accepted, AppSummary, AppStatus, JobStatus)]
    answers += [(m, "serialization") for m in (ErrorBody, Health, DevToken)]
    answers += [(m, "serialization") for m in (Published, PublishedSpec, RevisionList)]
    answers += [(m, "serialization") for m in (SecretSet, SecretNames)]
    _, top = models_json_schema(requests + answers, ref_template="#/components/schemas/{model}")
    schemas = top["$defs"]
    for model in BROWSER_EVENTS:
        schema = schemas[model.__name__]
        schema["required"] = ["type", *schema.get("required", [])]
    return schemas


def _operation(method: str, path: str, spec: dict[str, Any]) -> dict[str, Any]:
    params = [
        {"name": name, "in": "path", "required": True, "schema": PATH_PARAMS[name]}
        for name in _PARAM.findall(path)
    ]
    slug = re.sub(r"[^A-Za-z0-9]+", "_", path)
    op_id = method.lower() + (slug[:-1] + "_slash" if path.endswith("/") and path != "/" else slug)
    return {"operationId": op_id, **spec, "parameters": params + spec.get("parameters", [])}


def document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI document of `app`'s registered routes.

    Raises:
        KeyError: a route has no entry in `OPERATIONS`.
    """
    paths: dict[str, dict[str, Any]] = {}
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        path = route.resource.canonical
        spec = OPERATIONS.get((route.method, path))
        if spec is None:
            raise KeyError(f"no OpenAPI description for {route.method} {path}")
        for method in PROXY_METHODS if route.method == "*" else (route.method,):
            paths.setdefault(path, {})[method.lower()] = _operation(method, path, spec)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "spinyard gateway",
            "version": "1",
            "description": "Events in, status out, apps embedded. Every error has the body "
            '`{"error": {"code", "message"}}`; every GET also answers HEAD. Events and status '
            "need a bearer token (or `?token=`) unless authentication is off; publishing an app "
            "needs a publisher token, and so does setting its secrets.",
        },
        "paths": paths,
        "components": {
            "schemas": components(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
