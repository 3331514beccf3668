"""Scheduled warm pools: windows of the week in which an app's pool holds another size.

Classrooms warm instances by hand before a lecture because nothing schedules
it. A spec's `schedule` lists windows (`{days: [mon, wed], from: "09:50",
to: "11:00", tz: "Europe/Berlin", pool: 40}`); while one is open, the app's
pool is kept at the window's size instead of `pool.size`.

Rules, decided here once (docs/app-spec.md says them to authors):

- `from` and `to` are the wall clock of `tz` (an IANA name), so a window
  follows daylight saving time: 09:50 in Berlin is 08:50 UTC in winter and
  07:50 UTC in summer. `from` is included, `to` is not.
- `days` are the days a window *opens* on. A window whose `to` is before its
  `from` runs past midnight into the next day (`{days: [fri], from: "22:00",
  to: "02:00"}` is open Friday 22:00 to Saturday 02:00).
- On the day clocks go forward, a `from` in the skipped hour opens the window
  when the clock jumps past it; on the day they go back, the repeated hour is
  inside the window both times.
- Where windows overlap, the largest `pool` holds. Outside every window,
  `pool.size` holds.

Pure: nothing here reads a clock; callers pass the time (`ctx.now()`).
"""

import re
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # datetime.weekday() order
_TIME = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")


def _minutes(text: str) -> int:
    """Minutes since midnight of an `HH:MM` time."""
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


class Window(BaseModel):
    """A weekly time window in which the app's pool holds `pool` warm members."""

    # `from` is a Python keyword: the fields are `start`/`end`, read and written only as
    # `from`/`to`, so a spec has one spelling.
    model_config = ConfigDict(extra="forbid", serialize_by_alias=True)

    days: list[str] = Field(
        default_factory=lambda: list(DAYS),
        min_length=1,
        description="Days the window opens on (a window past midnight ends the next day)",
    )
    start: str = Field(
        alias="from", description="Local time (HH:MM, 24 h) the window opens and the pool fills"
    )
    end: str = Field(
        alias="to",
        description="Local time (HH:MM) it closes, excluded; before `from`: the next day",
    )
    tz: str = Field(description="IANA time zone of from/to, e.g. 'Europe/Berlin'")
    pool: int = Field(ge=0, le=100, description="Warm members to hold while the window is open")

    @field_validator("days")
    @classmethod
    def _days(cls, v: list[str]) -> list[str]:
        days = []
        for day in v:
            name = day.lower() if isinstance(day, str) else day
            if name not in DAYS:
                raise ValueError(f"{day!r} is not a day: use {', '.join(DAYS)}")
            if name not in days:
                days.append(name)
        return days

    @field_validator("start", "end", mode="before")
    @classmethod
    def _time(cls, v: object) -> object:
        if isinstance(v, int) and not isinstance(v, bool):
            # YAML 1.1 reads an unquoted 10:15 as the base-60 number 615.
            raise ValueError(f'{v!r} is a number: write the time in quotes, e.g. "09:50"')
        if isinstance(v, str) and not _TIME.fullmatch(v):
            raise ValueError(f"{v!r} is not a time of day: use HH:MM, 00:00 to 23:59")
        return v

    @field_validator("end")
    @classmethod
    def _length(cls, v: str, info: ValidationInfo) -> str:
        if v == info.data.get("start"):
            raise ValueError(
                f"from and to are both {v}: a window must have a length "
                "(for all day every day, use pool.size)"
            )
        return v

    @field_validator("tz")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):  # ValueError: not a key at all ("../x")
            raise ValueError(f"{v!r} is not a known time zone (an IANA name)") from None
        return v

    def is_open(self, now: float) -> bool:
        """Whether the window is open at the POSIX time `now`."""
        local = datetime.fromtimestamp(now, ZoneInfo(self.tz))
        minute = local.hour * 60 + local.minute
        start, end = _minutes(self.start), _minutes(self.end)
        today, yesterday = DAYS[local.weekday()], DAYS[(local.weekday() - 1) % 7]
        if start < end:
            return today in self.days and start <= minute < end
        # Past midnight: open from `start` today, or until `end` if it opened yesterday.
        return (today in self.days and minute >= start) or (yesterday in self.days and minute < end)


def scheduled_pool(windows: list[Window], now: float) -> int | None:
    """The pool size the open windows ask for at `now` (the largest), or None if none is open."""
    sizes = [w.pool for w in windows if w.is_open(now)]
    return max(sizes) if sizes else None
