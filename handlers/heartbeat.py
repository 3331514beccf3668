"""heartbeat: keep a deployment alive while someone really uses it.

A heartbeat counts only when the page is visible, focused, and the viewer
acted within the app's `idle.input_window_s`; a background tab or a bot that
only loads the page does not keep an app running.
"""

from handlers.context import Context
from handlers.deployments import LIVE, SHARED, load_viz_app, mutate, session_slot, slot_key
from handlers.registry import handler
from schemas import subjects
from schemas.events import Heartbeat


@handler(subjects.HEARTBEAT, schema=Heartbeat, concurrency=64, retries=2, timeout_s=10)
async def heartbeat(ctx: Context, event: Heartbeat) -> None:
    spec = await load_viz_app(ctx, event.app)
    counted = event.visible and event.focused and event.idle_s <= spec.idle.input_window_s
    if not counted:
        ctx.log.debug(
            "heartbeat_ignored", visible=event.visible, focused=event.focused, idle_s=event.idle_s
        )
        return
    slot = session_slot(event.session) if spec.sharing == "per_session" else SHARED
    now = ctx.now()
    written = await mutate(
        ctx,
        slot_key(event.app, slot),
        lambda d: d.model_copy(update={"last_heartbeat": now}) if d.state in LIVE else None,
    )
    if written is None:
        ctx.log.debug("heartbeat_without_deployment")
