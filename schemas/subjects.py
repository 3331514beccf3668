"""The NATS subject tree, streams and KV buckets: the one place they are named.

Events:   spinyard.v1.events.<kind>.<owner>.<title>   (run_cancel: .<job_id>)
Status:   spinyard.v1.status.app.<owner>.<title>        shared apps
          spinyard.v1.status.session.<owner>.<title>.<session>   per-session apps
          spinyard.v1.status.job.<job_id>
Dead:     spinyard.v1.dead.<kind>
"""

from schemas.names import split_app

PREFIX = "spinyard.v1"
EVENTS = f"{PREFIX}.events"
STATUS = f"{PREFIX}.status"
DEAD = f"{PREFIX}.dead"

# JetStream streams and KV buckets.
EVENTS_STREAM = "SPINYARD_EVENTS"
STATUS_STREAM = "SPINYARD_STATUS"
DEAD_STREAM = "SPINYARD_DEAD"
APPS_BUCKET = "spinyard_apps"
DEPLOYMENTS_BUCKET = "spinyard_deployments"
JOBS_BUCKET = "spinyard_jobs"
ACTIVITY_BUCKET = "spinyard_activity"
REVISIONS_BUCKET = "spinyard_revisions"  # each app's published revisions (history, rollback)
# Every KV bucket: handlers create them, the NATS permissions grant them, and
# the KV state opens them from this one list. A new bucket is added here.
BUCKETS = (APPS_BUCKET, DEPLOYMENTS_BUCKET, JOBS_BUCKET, ACTIVITY_BUCKET, REVISIONS_BUCKET)
# What the gateway reads: apps (validation, origins), deployments (app
# redirect), jobs (a run's app, to authorize its status and cancel); not
# activity (last page loads and heartbeats, which only handlers keep); and revisions.
GATEWAY_BUCKETS = (APPS_BUCKET, DEPLOYMENTS_BUCKET, JOBS_BUCKET, REVISIONS_BUCKET)
# What the gateway writes: apps published over HTTP (`PUT /v1/apps/...`) and their history.
PUBLISH_BUCKETS = (APPS_BUCKET, REVISIONS_BUCKET)

# Event kinds; each is consumed by one durable consumer named after its handler.
PAGE_LOAD = "page_load"
HEARTBEAT = "heartbeat"
REAPER_TICK = "reaper_tick"
POOL_REFILL = "pool_refill"
RUN_REQUEST = "run_request"
RUN_CANCEL = "run_cancel"
RUN_START = "run_start"
JOB_UPDATE = "job_update"
KINDS = (
    PAGE_LOAD,
    HEARTBEAT,
    REAPER_TICK,
    POOL_REFILL,
    RUN_REQUEST,
    RUN_CANCEL,
    RUN_START,
    JOB_UPDATE,
)


def kind_filter(kind: str) -> str:
    """Subject filter of the durable consumer for one event kind."""
    return f"{EVENTS}.{kind}.>"


def event(kind: str, app: str) -> str:
    """Subject an app-scoped event of `kind` is published on."""
    owner, title = split_app(app)
    return f"{EVENTS}.{kind}.{owner}.{title}"


def event_for(kind: str, token: str) -> str:
    """Subject for an event addressed by one token (a job id, or 'tick')."""
    return f"{EVENTS}.{kind}.{token}"


def app_status(app: str, session: str | None = None) -> str:
    """Status subject of a shared app, or of one session's instance of a per-session app."""
    owner, title = split_app(app)
    if session is None:
        return f"{STATUS}.app.{owner}.{title}"
    return f"{STATUS}.session.{owner}.{title}.{session}"


def run_queue_key(app: str) -> str:
    """Key of an app's run queue in the jobs bucket (job ids never start with `queue`)."""
    return f"queue.{app_key(app)}"


# Key of the backend-wide run slots record in the jobs bucket.
RUN_SLOTS_KEY = "queue-slots"


# Viz capacity gates in the jobs bucket (`handlers.capacity`): `queue-viz.starts`,
# `queue-viz.app.<owner>.<title>`, `queue-viz.session.<session>`. They start with
# `queue`, so a scan of runs skips them; not with `queue.`, so a scan of run queues does too.
VIZ_GATE_PREFIX = "queue-viz"
VIZ_STARTS_KEY = f"{VIZ_GATE_PREFIX}.starts"


def viz_app_gate_key(app: str) -> str:
    """Key of an app's instance gate (`max_instances`) in the jobs bucket."""
    return f"{VIZ_GATE_PREFIX}.app.{app_key(app)}"


def viz_session_gate_key(session: str) -> str:
    """Key of a session's instance gate (`max_instances_per_session`) in the jobs bucket."""
    return f"{VIZ_GATE_PREFIX}.session.{session}"


def is_queue_key(key: str) -> bool:
    """Whether a jobs-bucket key is a run queue's, the slots record or a viz gate, not a run's."""
    return key.startswith("queue")


def job_status(job_id: str) -> str:
    """Status subject of one run."""
    return f"{STATUS}.job.{job_id}"


def dead(kind: str) -> str:
    """Dead-letter subject for events of `kind` that used up their tries."""
    return f"{DEAD}.{kind}"


def app_key(app: str) -> str:
    """KV key of an app: `owner.title`."""
    owner, title = split_app(app)
    return f"{owner}.{title}"
