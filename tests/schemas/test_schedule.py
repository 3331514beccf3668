"""Schedule windows: which are open when (days, midnight, time zones, DST), which size wins,
and the spec's refusals of bad windows, each naming the field."""

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
import yaml
from pydantic import ValidationError

from schemas.codec import decode, encode
from schemas.schedule import Window, scheduled_pool
from schemas.spec import AppSpec

BERLIN = ZoneInfo("Europe/Berlin")
UTC = ZoneInfo("UTC")


def at(text: str, tz: ZoneInfo = UTC) -> float:
    """The POSIX time of the wall-clock `YYYY-MM-DD HH:MM[:SS]` in `tz`."""
    return datetime.fromisoformat(text).replace(tzinfo=tz).timestamp()


def window(**fields) -> Window:
    return Window.model_validate({"from": "09:50", "to": "11:00", "tz": "UTC", "pool": 4} | fields)


# 2026-03-02 is a Monday.
@pytest.mark.parametrize(
    "when, open_",
    [
        ("2026-03-02 09:49:59", False),  # a second early
        ("2026-03-02 09:50:00", True),  # `from` is included
        ("2026-03-02 10:59:59", True),
        ("2026-03-02 11:00:00", False),  # `to` is not
        ("2026-03-04 10:00", True),  # Wednesday
        ("2026-03-03 10:00", False),  # Tuesday
        ("2026-03-08 10:00", False),  # Sunday
    ],
)
def test_a_window_is_open_on_its_days_between_from_and_to(when, open_):
    assert window(days=["mon", "wed"]).is_open(at(when)) is open_


def test_a_window_without_days_is_open_every_day():
    w = window()
    assert w.days == ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    assert all(w.is_open(at(f"2026-03-0{d} 10:00")) for d in range(2, 9))


@pytest.mark.parametrize(
    "when, open_",
    [
        ("2026-03-06 21:59", False),  # Friday, before
        ("2026-03-06 22:00", True),  # Friday night
        ("2026-03-07 00:00", True),  # past midnight: Saturday, opened on Friday
        ("2026-03-07 01:59", True),
        ("2026-03-07 02:00", False),
        ("2026-03-07 23:00", False),  # Saturday night: not a day it opens on
        ("2026-03-05 01:00", False),  # Thursday early: Wednesday did not open it
    ],
)
def test_a_window_past_midnight_belongs_to_the_day_it_opens(when, open_):
    assert window(days=["fri"], **{"from": "22:00", "to": "02:00"}).is_open(at(when)) is open_


def test_a_window_to_midnight_ends_at_the_days_end():
    w = window(days=["fri"], **{"from": "20:00", "to": "00:00"})
    assert w.is_open(at("2026-03-06 23:59:59"))
    assert not w.is_open(at("2026-03-07 00:00"))


def test_a_window_follows_its_time_zone_and_daylight_saving_time():
    """09:50 in Berlin: 08:50 UTC in winter (CET), 07:50 UTC in summer (CEST; clocks went
    forward on Sunday 2026-03-29), the Monday before and the Monday after."""
    w = window(days=["mon"], tz="Europe/Berlin")
    assert w.is_open(at("2026-03-23 08:50", UTC))
    assert not w.is_open(at("2026-03-23 08:49", UTC))
    assert not w.is_open(at("2026-03-30 07:49", UTC))
    assert w.is_open(at("2026-03-30 07:50", UTC))
    assert not w.is_open(at("2026-03-30 09:00", UTC))  # 11:00 in Berlin: closed
    assert w.is_open(at("2026-03-30 09:50", BERLIN))


def test_on_the_day_clocks_go_forward_a_window_in_the_skipped_hour_opens_at_the_jump():
    """Berlin's clocks go from 02:00 to 03:00 on 2026-03-29: a 02:30 window opens at 03:00."""
    w = window(days=["sun"], tz="Europe/Berlin", **{"from": "02:30", "to": "04:00"})
    assert not w.is_open(at("2026-03-29 00:59", UTC))  # 01:59 CET
    assert w.is_open(at("2026-03-29 01:00", UTC))  # 03:00 CEST
    assert not w.is_open(at("2026-03-29 02:00", UTC))  # 04:00 CEST


def test_a_window_in_another_time_zone_may_open_on_another_utc_day():
    """Monday 08:00 in Tokyo is Sunday 23:00 UTC."""
    w = window(days=["mon"], tz="Asia/Tokyo", **{"from": "08:00", "to": "09:00"})
    assert w.is_open(at("2026-03-01 23:30", UTC))  # Sunday in UTC
    assert not w.is_open(at("2026-03-02 08:30", UTC))  # Monday in UTC, 17:30 in Tokyo


def test_overlapping_windows_hold_the_largest_pool_and_none_open_gives_none():
    windows = [
        window(pool=10, **{"from": "09:00", "to": "12:00"}),
        window(pool=40, **{"from": "09:50", "to": "11:00"}),
        window(pool=0, **{"from": "22:00", "to": "06:00"}),  # nights: no pool at all
    ]
    assert scheduled_pool(windows, at("2026-03-02 09:30")) == 10
    assert scheduled_pool(windows, at("2026-03-02 10:00")) == 40
    assert scheduled_pool(windows, at("2026-03-02 11:30")) == 10
    assert scheduled_pool(windows, at("2026-03-02 23:00")) == 0
    assert scheduled_pool(windows, at("2026-03-02 15:00")) is None
    assert scheduled_pool([], at("2026-03-02 10:00")) is None


def test_a_spec_schedule_round_trips_as_written():
    text = """
name: course/lecture
command: ["{python}", "app.py"]
sharing: per_session
pool: {size: 2}
schedule:
  - {days: [mon, Wed], from: "09:50", to: "11:00", tz: Europe/Berlin, pool: 40}
"""
    spec = AppSpec.model_validate(yaml.safe_load(text))
    written = spec.model_dump(mode="json")["schedule"]
    assert written == [
        {"days": ["mon", "wed"], "from": "09:50", "to": "11:00", "tz": "Europe/Berlin", "pool": 40}
    ]
    assert decode(AppSpec, encode(spec)) == spec


@pytest.mark.parametrize(
    "bad, field, says",
    [
        ({"days": ["monday"]}, "schedule.0.days", "'monday' is not a day"),
        ({"days": []}, "schedule.0.days", "at least 1"),
        ({"from": "9:50"}, "schedule.0.from", "HH:MM"),
        ({"to": "24:00"}, "schedule.0.to", "HH:MM"),
        ({"from": "10:61"}, "schedule.0.from", "HH:MM"),
        ({"from": 615}, "schedule.0.from", "write the time in quotes"),  # YAML's 10:15
        ({"to": "09:50"}, "schedule.0.to", "must have a length"),  # from == to
        ({"tz": "Mars/Olympus_Mons"}, "schedule.0.tz", "not a known time zone"),
        ({"tz": "../../etc/passwd"}, "schedule.0.tz", "not a known time zone"),
        ({"pool": -1}, "schedule.0.pool", "greater than or equal to 0"),
        ({"pool": 101}, "schedule.0.pool", "less than or equal to 100"),
        ({"size": 3}, "schedule.0.size", "Extra inputs"),
    ],
)
def test_bad_windows_are_refused_naming_the_field(bad, field, says):
    raw = {"from": "09:50", "to": "11:00", "tz": "UTC", "pool": 4} | bad
    with pytest.raises(ValidationError) as err:
        AppSpec(name="demo/x", command=["x"], schedule=[raw])
    errors = err.value.errors()
    assert [".".join(map(str, e["loc"])) for e in errors] == [field]
    assert says in errors[0]["msg"]


@pytest.mark.parametrize("missing", ["from", "to", "tz", "pool"])
def test_a_window_must_say_when_where_and_how_many(missing):
    raw = {"from": "09:50", "to": "11:00", "tz": "UTC", "pool": 4}
    del raw[missing]
    with pytest.raises(ValidationError) as err:
        AppSpec(name="demo/x", command=["x"], schedule=[raw])
    assert [e["loc"] for e in err.value.errors()] == [("schedule", 0, missing)]
