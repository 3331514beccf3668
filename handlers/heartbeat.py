"""heartbeat: keep a deployment alive while someone really uses it.

A heartbeat counts only when the page is visible, focused, and the viewer
acted within the app's `idle.input_window_s`; a background tab or a bot that
only loads the page does not keep an app running.

A counted heartbeat is one plain KV put of its time to the slot's activity
key (`handlers.activity`): any number of viewers of one shared app write
without conflict. It does not read the deployment: the reaper counts a
heartbeat only for a live deployment created before it, which is what the
heartbeat would have checked. A heartbeat of a shared app that names the
instance its page shows is recorded on that instance's own slot, so viewers
on an older revision's instance keep it alive after an update
(`handlers.rollout`); the reaper counts it for the shared slot while that
instance serves it.
"""

from handlers import activity, rollout
from handlers.context import Context
from handlers.deployments import load_viz_app, slot_key
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
    slot = rollout.heartbeat_slot(spec, event.session, event.instance)
    await activity.record(ctx, slot_key(event.app, slot), activity.HEARTBEAT)
