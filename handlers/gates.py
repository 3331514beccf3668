"""Gates: the record of one limit on viz instances, and the rules of its line.

A gate (`handlers.capacity` keeps three kinds) holds the instances that have
a place under its limit, by instance id, and the page loads waiting for one,
ordered by when each asked. The rules here are pure functions of the record,
applied with compare-and-set: who is admitted, who waits at which position,
and whom a freed place is for.
"""

from dataclasses import dataclass

from pydantic import BaseModel, Field


class Hold(BaseModel):
    key: str = Field(description="Slot key of the deployment (or pool key of a refill) holding it")
    at: float


class Waiter(BaseModel):
    instance: str
    key: str = Field(description="Slot key of the waiting deployment")
    app: str
    session: str | None = None
    at: float = Field(
        description="Its place in the line: when its deployment record was made, by the "
        "handler's clock (an event's own `time` is the publisher's, and would let it jump)"
    )
    since: float = Field(description="When it joined this gate")
    requested: float | None = Field(None, description="Its page load's time, for its status")


class Gate(BaseModel):
    """One limit: the instances holding a place (by instance id), and the line."""

    limit: int = Field(0, description="The limit as last entered")
    held: dict[str, Hold] = Field(default_factory=dict)
    waiting: list[Waiter] = Field(default_factory=list)

    def free(self) -> int:
        return max(0, self.limit - len(self.held))


@dataclass(frozen=True)
class Verdict:
    """The outcome of entering a gate: admitted, or waiting at `position` (None: refused)."""

    admitted: bool
    position: int | None = None


def positions(gate: Gate) -> dict[str, int]:
    """Instance -> place in the line; 1 is the next served (those being woken now are all 1)."""
    free = gate.free()
    return {w.instance: max(1, i - free + 1) for i, w in enumerate(gate.waiting)}


def enter(
    gate: Gate, limit: int, waiter: Waiter, now: float, *, wait: bool
) -> tuple[Gate, Verdict]:
    """`gate` with `waiter` admitted, in the line (`wait`), or left out; and the verdict.

    Admitted when its place in the line (by `at`) is within the free places, so
    it never passes a load that waits. Entering again is idempotent: a holder
    stays admitted, a waiter keeps its place.
    """
    if waiter.instance in gate.held:
        return gate, Verdict(admitted=True)
    mine = next((w for w in gate.waiting if w.instance == waiter.instance), waiter)
    others = [w for w in gate.waiting if w.instance != waiter.instance]
    line = sorted([*others, mine], key=lambda w: w.at)
    place = line.index(mine)
    free = max(0, limit - len(gate.held))
    if place < free:
        held = gate.held | {waiter.instance: Hold(key=waiter.key, at=now)}
        return Gate(limit=limit, held=held, waiting=others), Verdict(admitted=True)
    if not wait:
        return Gate(limit=limit, held=gate.held, waiting=others), Verdict(admitted=False)
    position = place - free + 1
    return Gate(limit=limit, held=gate.held, waiting=line), Verdict(False, position)


def leave(gate: Gate, instances: set[str]) -> Gate | None:
    """`gate` without those instances' places and waiters, or None if it has none of them."""
    if not instances & gate.held.keys() and not any(w.instance in instances for w in gate.waiting):
        return None
    return Gate(
        limit=gate.limit,
        held={i: h for i, h in gate.held.items() if i not in instances},
        waiting=[w for w in gate.waiting if w.instance not in instances],
    )


def wakeable(gate: Gate) -> list[Waiter]:
    """The waiters the free places are for."""
    return gate.waiting[: gate.free()]
