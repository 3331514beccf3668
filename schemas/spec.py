"""The app spec: what an app author registers, loaded from a YAML file.

One spec describes one app, `owner/title`, of kind `viz` (a long-running web
server shown in a page) or `job` (a model run that ends). The same spec
serves the local process backend (`command`, `{port}`/`{prefix}`
placeholders) and the Kubernetes backend (`image`, `port`, `resources`).
Which placeholders each kind may use is checked here, at registration, so
a spec that names a value its kind has none of (a job's `{port}`) never
reaches a backend; the backends fill them with `dispatcher.backends.launch`.
"""

import mimetypes
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from schemas import presets
from schemas.names import check_app, check_secret_name
from schemas.schedule import Window
from schemas.status import Chart

SPEC_VERSION = 1

# The placeholders `command` and `env` may hold, per kind: a job has no port,
# URL prefix or bind address, only the interpreter. Other braces are left as written.
PLACEHOLDERS: dict[str, frozenset[str]] = {
    "viz": frozenset({"port", "prefix", "host", "python"}),
    "job": frozenset({"python"}),
}
_NAMES = "|".join(sorted(PLACEHOLDERS["viz"]))  # viz has them all
_MEDIA_TYPE = re.compile(r"[a-z]+/[a-z0-9.+-]+")
_PLACEHOLDER = re.compile(rf"\{{({_NAMES})\}}")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class IdleLimits(BaseModel):
    """When a viz deployment counts as idle and is reaped. All in seconds."""

    model_config = ConfigDict(extra="forbid")

    since_heartbeat_s: float = Field(
        600, gt=0, description="Reap after this long with no counted heartbeat and no page load."
    )
    since_page_load_s: float = Field(
        8 * 3600,
        gt=0,
        description="Reap this long after the last page load, even if heartbeats go on.",
    )
    max_lifetime_s: float = Field(
        24 * 3600,
        gt=0,
        description="Reap this long after the deployment started, whatever its use.",
    )
    input_window_s: float = Field(
        300,
        gt=0,
        description="A heartbeat counts only if the viewer acted within this many seconds.",
    )


class Pool(BaseModel):
    """Warm instances (viz) or warm runners (job) kept started ahead of use."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(
        0, ge=0, le=100, description="Warm instances (viz) or warm runners (job) to keep ready."
    )


class Rollout(BaseModel):
    """What an update does to instances of older revisions (docs/publishing.md)."""

    model_config = ConfigDict(extra="forbid")

    drain_s: float = Field(
        3600,
        gt=0,
        description="An instance of an older revision is stopped this long after it was first "
        "seen draining, if its idle limits have not stopped it before (seconds)",
    )


class Resources(BaseModel):
    """Requests and limits, in Kubernetes quantity syntax."""

    model_config = ConfigDict(extra="forbid")

    cpu: str = Field("500m", description="CPU request and limit (Kubernetes quantity)")
    memory: str = Field("512Mi", description="Memory request and limit (Kubernetes quantity)")


class AppSpec(BaseModel):
    """One registered app. See docs/app-spec.md for every field."""

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = Field(SPEC_VERSION, description="Spec format version")
    name: str = Field(description="owner/title")
    kind: Literal["viz", "job"] = Field(
        "viz", description="viz: a web app shown in a page; job: a run that ends with results"
    )
    description: str = Field("", description="Shown in the app list")
    framework: Literal["bokeh", "panel", "dash", "streamlit", "voila"] | None = Field(
        None,
        description="Fills in command, readiness_path, entry_path and env for this "
        "framework (docs/frameworks.md); what the spec states itself wins",
    )
    script: str | None = Field(
        None, description="With `framework`: the file it serves, relative to workdir"
    )
    command: list[str] = Field(
        min_length=1,
        description="argv; placeholders such as '{port}' are replaced (docs/app-spec.md); "
        "filled in by `framework`",
    )
    workdir: str | None = Field(None, description="Working directory; relative to the spec file.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables; placeholders as in command"
    )
    secrets: list[str] = Field(
        default_factory=list,
        max_length=100,
        description="Names of the app's secrets (`spinyard secrets set`) that reach its "
        "environment, each as the variable of its name; a start fails `missing_secret` while "
        "one is not set",
    )
    image: str | None = Field(None, description="Container image, for the Kubernetes backend.")
    port: int = Field(8000, ge=1, le=65535, description="Port the app listens on in its container.")
    resources: Resources = Field(default_factory=Resources)
    readiness_path: str = Field(
        "/", description="Probed under the instance's prefix until it answers 200-399"
    )
    entry_path: str = Field("", description="Page opened under the instance's prefix, e.g. 'main'")
    sharing: Literal["shared", "per_session"] = Field(
        "shared", description="shared: one instance for all viewers; per_session: one each"
    )
    pool: Pool = Field(default_factory=Pool)
    schedule: list[Window] = Field(
        default_factory=list,
        max_length=50,
        description="Weekly windows in which the pool holds another size; the largest open "
        "one wins, `pool.size` outside them",
    )
    idle: IdleLimits = Field(default_factory=IdleLimits)
    rollout: Rollout = Field(default_factory=Rollout)
    revision: int | None = Field(
        None,
        ge=1,
        description="The published revision this spec is; set by publishing over HTTP, never "
        "by the spec's author (null for apps added over NATS)",
    )
    start_timeout_s: float = Field(60, gt=0, description="Seconds to become ready before `failed`")
    embed_origins: list[str] = Field(
        default_factory=list,
        description="Origins allowed to embed the app (frame-ancestors); \"'self'\" is the gateway",
    )
    # Instance limits, per_session viz apps only (docs/app-spec.md#instance-limits).
    max_instances: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Instances of this per_session app serving sessions at once; more page "
        "loads wait `queued` (or fail, see at_capacity). Default: no limit",
    )
    max_instances_per_session: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="Instances one session may hold at once of all the per_session apps that "
        "set this (this app's value counts when it is opened). Default: no limit",
    )
    at_capacity: Literal["queue", "fail"] = Field(
        "queue",
        description="A page load past a limit (these two, or the handlers' "
        "max_concurrent_starts): queue waits `queued` with its position; fail ends it "
        "`failed` (at_capacity) at once",
    )
    # Jobs only.
    deadline_s: float = Field(600, gt=0, description="A run past this is stopped: timed_out.")
    max_input_bytes: int = Field(
        64 * 1024, gt=0, le=1024 * 1024, description="Largest run inputs accepted (msgpack bytes)"
    )
    retention_s: float = Field(7 * 24 * 3600, gt=0, description="How long results are kept.")
    max_log_bytes: int = Field(
        10 * 2**20,
        ge=64 * 1024,
        description="Largest run log kept, bytes; past it the oldest output is dropped",
    )
    max_concurrent_runs: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="Runs of this app running at once; more wait `queued` (job apps; "
        "default: no limit but the backend's total)",
    )
    max_runs_per_session: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="Runs of one session running at once; its others wait `queued` (job apps)",
    )
    max_queued_runs: int = Field(
        1000,
        ge=1,
        le=10_000,
        description="Runs that may wait `queued` at once; a request past it fails "
        "`too_many` (job apps)",
    )
    example_inputs: dict = Field(
        default_factory=dict, description="Inputs the demo page's run form starts with (job apps)"
    )
    outputs: list[str] = Field(
        default_factory=list, description="File names a run may upload (job apps)."
    )
    output_types: dict[str, str] = Field(
        default_factory=dict,
        description="Media type of an output, where its suffix does not say (job apps)",
    )
    charts: dict[str, Chart] = Field(
        default_factory=dict,
        description="A line chart to draw of a CSV output: {x: column, y: [columns]} (job apps)",
    )
    preload: list[str] = Field(
        default_factory=list,
        max_length=100,
        description="Modules a warm runner of a Python model imports ahead of its run "
        "(job apps with a pool; dotted names, e.g. 'numpy')",
    )

    @model_validator(mode="before")
    @classmethod
    def _framework(cls, data: Any) -> Any:
        return presets.expand(data) if isinstance(data, dict) else data

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_app(v)

    @field_validator("command", "env")
    @classmethod
    def _placeholders(
        cls, v: list[str] | dict[str, str], info: ValidationInfo
    ) -> list[str] | dict[str, str]:
        kind = info.data.get("kind")
        if kind is None:  # `kind` itself was invalid: that error is reported instead
            return v
        where = enumerate(v) if isinstance(v, list) else v.items()
        for key, text in where:
            for name in _PLACEHOLDER.findall(text):
                if name not in PLACEHOLDERS[kind]:
                    allowed = ", ".join(f"{{{n}}}" for n in sorted(PLACEHOLDERS[kind]))
                    raise ValueError(
                        f"{info.field_name}[{key!r}]: {{{name}}} has no value in a {kind} app "
                        f"(a {kind} app may use {allowed})"
                    )
        return v

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, v: list[str], info: ValidationInfo) -> list[str]:
        for name in v:
            check_secret_name(name)
            if name in info.data.get("env", {}):
                raise ValueError(f"{name!r} is in env too: a variable comes from one or the other")
        if len(set(v)) != len(v):
            raise ValueError("a secret is named twice")
        return v

    @field_validator("preload")
    @classmethod
    def _preload(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _MODULE.match(name):
                raise ValueError(f"preload {name!r} is not a module name (dotted identifiers)")
        return v

    @field_validator("readiness_path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("readiness_path must start with '/'")
        return v

    @field_validator("entry_path")
    @classmethod
    def _entry(cls, v: str) -> str:
        if v.startswith("/") or ".." in v.split("/"):
            raise ValueError("entry_path is relative to the app's prefix: no leading '/' or '..'")
        return v

    @field_validator("embed_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for origin in v:
            if origin != "'self'" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"embed origin {origin!r} must be 'self' or an http(s) origin")
            if "*" in origin or origin.rstrip("/").count("/") > 2:
                raise ValueError(
                    f"embed origin {origin!r} must be one exact origin: no '*', no path"
                )
        return v

    @model_validator(mode="after")
    def _kind_rules(self) -> "AppSpec":
        if self.kind == "viz":
            for name in ("max_concurrent_runs", "max_runs_per_session", "preload"):
                if getattr(self, name) not in (None, []):
                    raise ValueError(f"{name} is for job apps; this is a viz app")
        for name in self.outputs:
            if "/" in name or name.startswith(".") or not name:
                raise ValueError(f"output {name!r} must be a plain file name")
        for field in ("output_types", "charts"):
            for name in getattr(self, field):
                if name not in self.outputs:
                    raise ValueError(f"{field}: {name!r} is not one of the app's outputs")
        for name, kind in self.output_types.items():
            if not _MEDIA_TYPE.fullmatch(kind):
                raise ValueError(f"output_types: {kind!r} ({name}) is not a media type")
        for name in self.charts:
            if self.media_type(name) != "text/csv":
                raise ValueError(f"charts: {name!r} is not a CSV output")
        return self

    @field_validator("max_instances", "max_instances_per_session")
    @classmethod
    def _instance_limits(cls, v: int | None, info: ValidationInfo) -> int | None:
        kind, sharing = info.data.get("kind"), info.data.get("sharing")
        if v is None or kind is None or sharing is None:  # theirs is the error reported
            return v
        if kind != "viz":
            raise ValueError(f"only per_session viz apps have it; this is a {kind} app")
        if sharing != "per_session":
            raise ValueError(
                "only per_session apps have it; a shared app has one instance "
                "(the handlers' max_concurrent_starts limits its starts)"
            )
        return v

    def media_type(self, output: str) -> str | None:
        """The media type of an output: declared in `output_types`, else by its suffix."""
        return self.output_types.get(output) or mimetypes.guess_type(output, strict=False)[0]

    @property
    def owner(self) -> str:
        return self.name.split("/")[0]

    @property
    def title(self) -> str:
        return self.name.split("/")[1]


def load_spec(path: str | Path) -> AppSpec:
    """Read and validate one app spec file, resolving `workdir` against it.

    Raises:
        ValueError: the file is not YAML, or not a valid spec (the message names the field).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: an app spec must be a mapping")
    if "revision" in data:
        raise ValueError(f"{path}: revision is set by publishing, not by the spec; remove it")
    spec = AppSpec.model_validate(data)
    workdir = Path(spec.workdir) if spec.workdir else Path(".")
    if not workdir.is_absolute():
        workdir = (path.parent / workdir).resolve()
    return spec.model_copy(update={"workdir": str(workdir)})
