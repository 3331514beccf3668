"""What the gateway keeps in memory: app specs (watched) and verified tokens (until expiry)."""

import time

import pytest

from dispatcher.gateway.auth import Authenticator, AuthError, mint
from dispatcher.gateway.keys import SPECS
from dispatcher.gateway.specs import SpecCache
from dispatcher.settings import AuthSettings
from schemas.spec import AppSpec
from tests.gateway.support import VIZ, page_load
from tests.helpers import wait_for

SECRET = "c" * 40


# --- app specs ----------------------------------------------------------------------------


async def test_a_spec_is_read_once_then_served_from_memory(env):
    specs = SpecCache(env.state.apps, size=10, max_age_s=60)
    await specs.start()
    try:
        assert await specs.get(VIZ.name) == VIZ
        assert await specs.get(VIZ.name) == VIZ
        assert await specs.get("demo/none") is None
        assert await specs.get("demo/none") is None  # unknown apps are kept too
        assert specs.reads == 2
    finally:
        await specs.stop()


async def test_a_changed_or_removed_app_takes_effect_through_the_watch(env):
    specs = SpecCache(env.state.apps, size=10, max_age_s=60)
    await specs.start()
    try:
        assert (await specs.get(VIZ.name)).description == "A shared viz app"
        changed = VIZ.model_copy(update={"description": "changed"})
        await env.state.apps.put(VIZ.name, changed)

        async def seen(want):
            return (await specs.get(VIZ.name)) == want

        await wait_for(lambda: seen(changed), what="the change to reach the cache")
        await env.state.apps.kv.delete("demo.viz")
        await wait_for(lambda: seen(None), what="the removal to reach the cache")
        created = AppSpec(name="demo/new", command=["x"])
        assert await specs.get("demo/new") is None
        await env.state.apps.put(created.name, created)
        await wait_for(
            lambda: seen_app(specs, "demo/new", created), what="a new app to reach the cache"
        )
        assert specs.reads == 2  # one per app: every change came by the watch
    finally:
        await specs.stop()


async def seen_app(specs: SpecCache, app: str, want) -> bool:
    return (await specs.get(app)) == want


async def test_no_entry_is_used_past_its_max_age_without_the_watch(env):
    specs = SpecCache(env.state.apps, size=10, max_age_s=0.2)  # never started: no watch
    assert await specs.get(VIZ.name) == VIZ
    changed = VIZ.model_copy(update={"description": "changed"})
    await env.state.apps.put(VIZ.name, changed)
    assert await specs.get(VIZ.name) == VIZ  # within the max age: the old spec
    await wait_for(lambda: seen_app(specs, VIZ.name, changed), what="the entry to age out")
    assert specs.reads == 2


async def test_the_cache_is_bounded_and_drops_the_least_recently_used(env):
    specs = SpecCache(env.state.apps, size=2, max_age_s=60)
    for app in ("demo/viz", "demo/per", "demo/viz", "demo/job"):
        await specs.get(app)
    assert specs.reads == 3
    await specs.get("demo/viz")  # kept: used more recently than demo/per
    assert specs.reads == 3
    await specs.get("demo/per")  # dropped when demo/job came
    assert specs.reads == 4


async def test_a_reconnect_empties_the_cache(env):
    specs = SpecCache(env.state.apps, size=10, max_age_s=60)
    await specs.start()
    try:
        await specs.get(VIZ.name)
        await specs.get(VIZ.name)
        assert specs.reads == 1
        env.nc.stats["reconnects"] += 1  # as nats-py counts one: changes may have been missed
        await specs.get(VIZ.name)
        await specs.get(VIZ.name)
        assert specs.reads == 2
    finally:
        await specs.stop()


async def test_an_older_revision_never_replaces_a_newer_one(env):
    specs = SpecCache(env.state.apps, size=10, max_age_s=60)
    newer = VIZ.model_copy(update={"description": "newer"})
    specs._store(VIZ.name, 9, newer, refresh=False)  # as the watch would
    specs._store(VIZ.name, 5, VIZ, refresh=True)  # a read that started before it
    assert await specs.get(VIZ.name) == newer


async def test_the_gateway_answers_a_removed_app_with_404_promptly(env):
    status, _ = await env.post(page_load())
    assert status == 202
    await env.state.apps.kv.delete("demo.viz")

    async def refused() -> bool:
        status, body = await env.post(page_load())
        return status == 404 and body["error"]["code"] == "unknown_app"

    await wait_for(refused, timeout=2.0, what="the removed app to be refused")
    runner = env.runners[0]
    assert runner.app[SPECS].reads == 1  # the removal came by the watch, not by reading


# --- tokens -------------------------------------------------------------------------------


def checked(auth: Authenticator, calls: list) -> Authenticator:
    """`auth`, counting its signature checks in `calls`."""
    check = auth._check

    def counted(token):
        calls.append(token)
        return check(token)

    auth._check = counted
    return auth


def test_a_verified_token_is_not_checked_again():
    calls: list = []
    auth = checked(Authenticator(AuthSettings(hs256_secret=SECRET)), calls)
    token = mint(SECRET, ["demo/viz"], session="s-1")
    first = auth.verify(token)
    assert auth.verify(token) == first
    assert len(calls) == 1
    auth.authorize(auth.verify(token), "demo/viz", "s-1")  # the same claims decide
    with pytest.raises(AuthError) as refused:
        auth.authorize(auth.verify(token), "demo/other", "s-1")
    assert refused.value.status == 403


def test_a_kept_token_is_refused_once_it_expires(monkeypatch):
    calls: list = []
    auth = checked(Authenticator(AuthSettings(hs256_secret=SECRET, leeway_s=0)), calls)
    token = mint(SECRET, ["demo/viz"], ttl_s=2)
    claims = auth.verify(token)
    monkeypatch.setattr(time, "time", lambda: claims.expires + 0.01)  # just after `exp`
    with pytest.raises(AuthError) as expired:
        auth.verify(token)
    assert (expired.value.status, expired.value.message) == (401, "the token has expired")
    assert len(calls) == 1  # refused from the cache, not by a fresh check


def test_failed_tokens_are_not_kept_and_the_cache_is_bounded():
    calls: list = []
    auth = checked(Authenticator(AuthSettings(hs256_secret=SECRET, token_cache_size=2)), calls)
    forged = mint("f" * 40, ["demo/viz"])
    for _ in range(2):
        with pytest.raises(AuthError):
            auth.verify(forged)
    assert len(calls) == 2
    tokens = [mint(SECRET, ["demo/viz"], session=f"s-{i}") for i in range(3)]
    for token in (*tokens, tokens[2], tokens[1]):
        auth.verify(token)
    assert len(calls) == 5  # the last two were kept
    auth.verify(tokens[0])  # dropped: the least recently used when the third came
    assert len(calls) == 6


def test_a_cache_size_of_zero_checks_every_time():
    calls: list = []
    auth = checked(Authenticator(AuthSettings(hs256_secret=SECRET, token_cache_size=0)), calls)
    token = mint(SECRET, ["demo/viz"])
    auth.verify(token)
    auth.verify(token)
    assert len(calls) == 2
