"""All of spinyard's settings, read once at start from `SPINYARD_*` variables.

Nested parts use `__`: `SPINYARD_NATS__URL`, `SPINYARD_GATEWAY__PORT`. Nothing
else in spinyard reads the environment. docs/configuration.md lists every
field with its default.
"""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from dispatcher.backends.settings import BackendSettings  # beside the backends it configures


class SettingsError(ValueError):
    """A setting is missing or does not fit the others; the message names it."""


class NatsSettings(BaseModel):
    url: str = Field("nats://127.0.0.1:4222", description="NATS server URL(s), comma-separated")
    user: str | None = Field(None, description="User name, if the server wants one")
    password: SecretStr | None = Field(None, description="Password for `user`")
    token: SecretStr | None = Field(None, description="Auth token, instead of user/password")
    creds_file: Path | None = Field(None, description="NATS .creds file (JWT + nkey)")
    connect_timeout_s: float = Field(5.0, description="Seconds one connection attempt may take")
    startup_wait_s: float = Field(
        60.0,
        ge=0,
        description="Services keep trying to reach NATS this long at start (CLI: one attempt)",
    )
    replicas: int = Field(1, ge=1, le=5, description="JetStream replicas of streams and buckets")
    events_max_age_s: float = Field(
        24 * 3600, description="Unhandled events are dropped after this"
    )
    status_max_age_s: float = Field(
        7 * 24 * 3600, description="Last status per subject kept this long"
    )
    dead_max_age_s: float = Field(14 * 24 * 3600, description="Dead letters kept this long")
    dedup_window_s: float = Field(
        120.0, description="Window in which a repeated event id is dropped"
    )


class HandlerSettings(BaseModel):
    ack_wait_s: float = Field(30.0, gt=0, description="Unacked message is redelivered after this")
    max_ack_pending: int = Field(
        1000, ge=1, description="Messages out at once per handler, all replicas"
    )
    fetch_batch: int = Field(
        16,
        ge=1,
        description="Most messages asked for per pull request (each is handled as it "
        "arrives; a pull asks for no more than the handler's free concurrency)",
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="In-flight work may finish for this long"
    )
    bus_retry_s: float = Field(
        30.0,
        ge=0,
        description="A handler run that fails because NATS is away (a lost cluster node, a "
        "leader election) is run again on the same delivery for this long before it counts "
        "as a failed try",
    )
    health_port: int | None = Field(
        None, ge=0, le=65535, description="Serve /healthz and /metrics on this port; unset: off"
    )
    health_host: str = Field(
        "127.0.0.1", description="Address of the health server (0.0.0.0 in pods)"
    )
    run_slots: int = Field(
        0,
        ge=0,
        description="Runs of all apps running at once on the backend; more wait `queued` "
        "(0: no total limit, only the apps' own)",
    )
    max_concurrent_starts: int = Field(
        64,
        ge=0,
        description="Viz instance starts in progress at once, all apps and replicas together "
        "(cold starts and warm pool refills; a claim from a warm pool is not a start); more "
        "page loads wait `queued` (0: no limit)",
    )
    concurrency: dict[str, int] = Field(
        default_factory=dict,
        description='Per-handler concurrency override, e.g. {"page_load": 128}',
    )
    spec_cache_s: float = Field(
        1.0,
        ge=0,
        description="page_load and heartbeat use an app spec read this long ago again instead "
        "of reading it per event; a watch on the apps bucket drops a changed spec at once and a "
        "reconnect to NATS empties the memory, so this only bounds a change the watch missed "
        "otherwise (0: read each time)",
    )
    activity_write_s: float = Field(
        0.1,
        ge=0,
        description="A handler process does not write an app's activity key (its last page load "
        "or heartbeat) again within this long of its last write of it; the reaper sees activity "
        "this much late at most (0: write for every event)",
    )


class ReaperSettings(BaseModel):
    interval_s: float = Field(5.0, gt=0, description="Seconds between reaper passes")
    pool_refill_per_tick: int = Field(
        1, ge=1, description="Warm instances started per app per pass"
    )
    reconcile_grace_s: float = Field(
        30.0, ge=0, description="Instances younger than this are never treated as orphans"
    )


class GatewaySettings(BaseModel):
    host: str = Field("127.0.0.1", description="Address the gateway listens on")
    port: int = Field(8080, ge=0, le=65535, description="Port; 0 picks a free one")
    public_url: str | None = Field(None, description="Base URL pages use; default http://host:port")
    max_body_bytes: int = Field(64 * 1024, gt=0, description="Largest event body accepted")
    sse_keepalive_s: float = Field(15.0, gt=0, description="Comment line sent this often on SSE")
    sse_linger_s: float = Field(
        3.0,
        ge=0,
        description="Seconds a status subject's shared subscription outlives its last SSE "
        "client, so a page that reloads or reconnects finds it (0: dropped at once)",
    )
    sse_heartbeat_s: float = Field(
        5.0,
        gt=0,
        description="Seconds between NATS's idle heartbeats on a status subscription; after "
        "two missed ones (a NATS restart) the gateway makes it again",
    )
    read_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A client has this long to send a request's head (from the connection's "
        "start or the head's first byte), and as long again for its body; else the "
        "connection is closed. Answers (SSE, proxied apps) and WebSockets are not timed",
    )
    idle_timeout_s: float = Field(
        75.0,
        gt=0,
        description="An idle keep-alive connection is closed after this long; keep it above "
        "the idle timeout of any reverse proxy in front (nginx's upstream default: 60 s)",
    )
    spec_cache_size: int = Field(
        10_000,
        ge=0,
        description="App specs the gateway keeps in memory (least recently used dropped "
        "first), kept fresh by a watch on the apps bucket. 0: read the bucket every request",
    )
    revisions_kept: int = Field(
        50,
        ge=1,
        description="Published revisions kept per app (oldest dropped first); only kept ones "
        "can be rolled back to (docs/publishing.md)",
    )
    spec_cache_max_age_s: float = Field(
        10.0,
        gt=0,
        description="Longest a kept app spec is used without reading it again, should its "
        "watch miss a change (changes normally apply within milliseconds)",
    )

    @property
    def base_url(self) -> str:
        """The base URL pages use to reach the gateway, without a trailing `/`.

        Raises:
            SettingsError: the port is 0 (chosen at bind time) and no `public_url`
                is set, so the URL cannot be known yet.
        """
        if self.public_url:
            return self.public_url.rstrip("/")
        if self.port == 0:
            raise SettingsError(
                "gateway.port is 0, so the public URL is unknown: set gateway.public_url, "
                "or pick the port before the backend is made"
            )
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"http://{host}:{self.port}"


class StoreSettings(BaseModel):
    endpoint: str = Field("127.0.0.1:9000", description="host:port of the S3 API spinyard calls")
    public_endpoint: str | None = Field(
        None,
        description="host:port (or http(s)://host:port) jobs and browsers use in presigned URLs, "
        "if not `endpoint`; a URL's scheme overrides `secure` for them",
    )
    access_key: SecretStr | None = Field(None, description="S3 access key (required)")
    secret_key: SecretStr | None = Field(None, description="S3 secret key (required)")
    secure: bool = Field(False, description="Use HTTPS to reach `endpoint`")
    region: str = Field("us-east-1", min_length=1, description="Region; presigning is then offline")
    bucket: str = Field("spinyard-results", description="Bucket for run results; made at start")
    upload_url_ttl_s: int = Field(900, ge=1, le=604800, description="Seconds a PUT URL is valid")
    download_url_ttl_s: int = Field(3600, ge=1, le=604800, description="Seconds a GET URL is valid")
    lifecycle_days: int = Field(
        7,
        ge=0,
        description="Days after which the server deletes results/ objects, whatever the app's "
        "retention (keep it >= the longest retention_s); 0: no rule",
    )
    max_result_bytes: int = Field(100 * 2**20, gt=0, description="Largest result kept, bytes")
    timeout_s: float = Field(10.0, gt=0, description="Connect and read timeout per request, s")
    tries: int = Field(3, ge=1, description="Attempts per call on transient errors, then give up")


class AuthSettings(BaseModel):
    enabled: bool = Field(
        True, description="Require a JWT on events and status; false only for trusted networks"
    )
    hs256_secret: SecretStr | None = Field(None, description="Shared secret for HS256 tokens")
    rs256_public_key: str | None = Field(
        None, description="PEM public key (or a path to one) for RS256 tokens"
    )
    audience: str | None = Field(None, description="Required `aud` claim, if set")
    issuer: str | None = Field(None, description="Required `iss` claim, if set")
    leeway_s: float = Field(5.0, ge=0, description="Clock skew allowed on `exp`, seconds")
    max_ttl_s: float = Field(
        24 * 3600, gt=0, description="`spinyard token` refuses longer lifetimes"
    )
    dev_token_endpoint: bool = Field(
        False, description="Serve GET /v1/dev/token (mints tokens for anyone): `spinyard up` only"
    )
    token_cache_size: int = Field(
        10_000,
        ge=0,
        description="Verified tokens the gateway keeps (least recently used dropped first), "
        "so a page's repeated token skips the signature check; each is still refused once "
        "expired. 0: check every request",
    )


class EmbeddedSettings(BaseModel):
    nats_restarts: int = Field(
        5,
        ge=0,
        description="`spinyard up` restarts a nats-server that died at most this many times "
        "within `nats_restart_window_s`, then stops with an error (count; 0: never restart)",
    )
    nats_restart_window_s: float = Field(
        60.0, gt=0, description="The window `nats_restarts` counts restarts in, seconds"
    )
    nats_restart_delay_s: float = Field(
        0.0,
        ge=0,
        le=60,
        description="Pause between a nats-server's death and its restart, seconds (clients "
        "hold their requests meanwhile)",
    )


class Settings(BaseSettings):
    """spinyard's configuration."""

    model_config = SettingsConfigDict(env_prefix="SPINYARD_", env_nested_delimiter="__")

    data_dir: Path = Field(
        Path(".spinyard"), description="State of the embedded stack and local backend"
    )
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: console on a tty"
    )
    log_level: str = Field("info", description="debug, info, warning, error")
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto",
        description="Event loop of `spinyard handlers` and `spinyard up`: auto is uvloop when "
        "it is installed (it is a dependency), else asyncio's own",
    )
    gateway_url: str | None = Field(
        None,
        description="The CLI's `apps` and `secrets` commands go through this gateway (HTTP, "
        "with `token`; docs/publishing.md); unset: they write the apps bucket over NATS, "
        "and secrets into the backend's store",
    )
    token: SecretStr | None = Field(
        None, description="The publisher token the CLI sends to `gateway_url`"
    )
    nats: NatsSettings = Field(default_factory=NatsSettings)
    handlers: HandlerSettings = Field(default_factory=HandlerSettings)
    reaper: ReaperSettings = Field(default_factory=ReaperSettings)
    backend: BackendSettings = Field(default_factory=BackendSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    embedded: EmbeddedSettings = Field(default_factory=EmbeddedSettings)
