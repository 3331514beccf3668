"""Instance limits: the gate's pure rules, and the spec fields and setting that set them.

The rules (`handlers.gates.enter`, `leave`, `positions`, `wakeable`) decide
who is admitted and who waits where; the page loads that use them are in
test_capacity.py.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from dispatcher.settings import Settings
from handlers import capacity, gates
from handlers.gates import Gate, Hold, Waiter
from schemas.spec import AppSpec
from schemas.status import AppState, AppStatus


def waiter(instance: str, at: float) -> Waiter:
    return Waiter(
        instance=instance,
        key=f"demo.app.session.{instance}",
        app="demo/app",
        at=at,
        since=at,
        requested=at,
    )


def gate(limit: int, held: str = "", waiting: str = "") -> Gate:
    """A gate from compact text: held and waiting instance ids, a waiter's `at` its order."""
    return Gate(
        limit=limit,
        held={i: Hold(key=f"k.{i}", at=0) for i in held.split()},
        waiting=[waiter(i, at=n) for n, i in enumerate(waiting.split(), start=1)],
    )


def line(g: Gate) -> str:
    return " ".join(w.instance for w in g.waiting)


def test_a_free_place_admits_and_a_full_gate_queues_in_order_of_asking():
    g, verdict = gates.enter(gate(2, held="a"), 2, waiter("b", 5), now=9, wait=True)
    assert verdict.admitted and set(g.held) == {"a", "b"} and g.held["b"].at == 9
    g, verdict = gates.enter(g, 2, waiter("c", 6), now=9, wait=True)
    assert not verdict.admitted and verdict.position == 1 and line(g) == "c"
    # One that asked earlier (it waited at another gate first) goes ahead of c.
    g, verdict = gates.enter(g, 2, waiter("d", 1), now=9, wait=True)
    assert verdict.position == 1 and line(g) == "d c"
    assert gates.positions(g) == {"d": 1, "c": 2}


def test_entering_again_is_idempotent_and_keeps_the_place():
    g = gate(1, held="a", waiting="b c")
    again, verdict = gates.enter(g, 1, g.waiting[1], now=9, wait=True)
    assert verdict.position == 2 and again == g
    same, verdict = gates.enter(g, 1, waiter("a", 0), now=9, wait=True)
    assert verdict.admitted and same is g


def test_a_newcomer_never_passes_a_waiter_even_with_a_place_free():
    g = gate(2, held="a", waiting="b")  # a place is free: b is being woken for it
    g, verdict = gates.enter(g, 2, waiter("z", 99), now=9, wait=True)
    assert not verdict.admitted and verdict.position == 1 and line(g) == "b z"
    assert [w.instance for w in gates.wakeable(g)] == ["b"]
    g, verdict = gates.enter(g, 2, g.waiting[0], now=9, wait=True)  # b's wake-up
    assert verdict.admitted and line(g) == "z" and gates.wakeable(g) == []


def test_without_waiting_a_full_gate_refuses_and_keeps_no_line():
    g, verdict = gates.enter(gate(1, held="a"), 1, waiter("b", 5), now=9, wait=False)
    assert verdict == gates.Verdict(admitted=False) and line(g) == ""
    # A pool refill (asking now, so last) does not take a place a page load waits for.
    g, verdict = gates.enter(gate(2, held="a", waiting="b"), 2, waiter("r", 99), 9, wait=False)
    assert not verdict.admitted


def test_leave_frees_places_and_lines_and_says_when_nothing_changed():
    g = gate(1, held="a", waiting="b c")
    assert gates.leave(g, {"zz"}) is None
    freed = gates.leave(g, {"a", "c"})
    assert freed.held == {} and line(freed) == "b" and gates.wakeable(freed) == freed.waiting
    assert gates.positions(gate(2, held="a", waiting="b c d")) == {"b": 1, "c": 1, "d": 2}


def test_a_lowered_limit_admits_no_one_until_enough_have_left():
    g, verdict = gates.enter(gate(3, held="a b c"), 2, waiter("d", 1), now=9, wait=True)
    assert verdict.position == 1 and g.limit == 2 and g.free() == 0


def per_session(**fields) -> AppSpec:
    return AppSpec(name="demo/class", command=["x"], sharing="per_session", **fields)


@pytest.mark.parametrize("field", ["max_instances", "max_instances_per_session"])
@pytest.mark.parametrize("value", [0, -3])
def test_limits_below_one_are_refused_naming_the_field(field, value):
    with pytest.raises(ValidationError) as caught:
        per_session(**{field: value})
    assert caught.value.errors()[0]["loc"] == (field,)


@pytest.mark.parametrize("field", ["max_instances", "max_instances_per_session"])
@pytest.mark.parametrize(
    ("other", "why"),
    [
        ({}, "only per_session apps have it; a shared app has one instance"),
        ({"kind": "job"}, "only per_session viz apps have it; this is a job app"),
    ],
)
def test_instance_limits_are_refused_on_shared_and_job_apps(field, other, why):
    with pytest.raises(ValidationError) as caught:
        AppSpec(name="demo/one", command=["x"], **other, **{field: 2})
    [error] = caught.value.errors()
    assert error["loc"] == (field,) and error["msg"].startswith(f"Value error, {why}")


def test_at_capacity_is_queue_or_fail():
    assert per_session().at_capacity == "queue"
    assert per_session(max_instances=3, at_capacity="fail").at_capacity == "fail"
    with pytest.raises(ValidationError) as caught:
        per_session(at_capacity="wait")
    assert caught.value.errors()[0]["loc"] == ("at_capacity",)


def test_max_concurrent_starts_defaults_to_64_and_refuses_negatives(monkeypatch):
    assert Settings().handlers.max_concurrent_starts == 64
    monkeypatch.setenv("SPINYARD_HANDLERS__MAX_CONCURRENT_STARTS", "-1")
    with pytest.raises(ValidationError, match="max_concurrent_starts"):
        Settings()


def test_a_queued_status_carries_its_position():
    status = capacity.queued_status(waiter("i-0123456789abcdef", 5.0), 3)
    assert status.state == AppState.QUEUED == "queued" and status.position == 3
    assert AppStatus.model_validate(status.model_dump()).phases.requested == 5.0


# A step: a load entering (instance, when it asked, whether it waits), or one leaving.
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("enter"), st.integers(0, 9), st.integers(0, 50), st.booleans()),
        st.tuples(st.just("leave"), st.integers(0, 9), st.just(0), st.just(False)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(1, 4), steps=STEPS)
def test_no_sequence_of_entries_and_leavings_passes_the_limit_or_the_line(limit, steps):
    g = Gate()
    for op, n, at, wait in steps:
        i = f"i-{n}"
        if op == "leave":
            g = gates.leave(g, {i}) or g
            continue
        already = i in g.held
        me = next((w for w in g.waiting if w.instance == i), waiter(i, at))
        ahead = [w for w in g.waiting if w.instance != i and w.at <= me.at]
        free = g.free() if g.limit else limit
        g2, verdict = gates.enter(g, limit, me, now=0, wait=wait)
        if verdict.admitted and not already:
            assert len(ahead) < free  # it passed no one a place was not free for
        if not verdict.admitted and wait:
            assert verdict.position >= 1 and i in {w.instance for w in g2.waiting}
        g = g2
        assert len(g.held) <= limit
        assert not g.held.keys() & {w.instance for w in g.waiting}
        assert [w.at for w in g.waiting] == sorted(w.at for w in g.waiting)
        assert sorted(gates.positions(g).values()) == list(gates.positions(g).values())
