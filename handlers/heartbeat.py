"""heartbeat: keep a deployment alive while someone really uses it.

A heartbeat counts only when the page is visible, focused, and the viewer
acted within the app's `idle.input_window_s`; a background tab or a bot that
only loads the page does not keep an app running.

A counted heartbeat is one plain KV put of its time to the slot's activity
key (`handlers.activity`): any number of viewers of one shared app write
without conflict. It does not read the deployment: the reaper counts a
heartbeat only for a live deployment created before it, which is what the
heartbeat would have checked.
"""

from handlers import activity
from handlers.context import Context
from handlers.deployments import SHARED, load_viz_app, session_slot, slot_key
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
    await activity.record(ctx, slot_key(event.app, slot), activity.HEARTBEAT)
