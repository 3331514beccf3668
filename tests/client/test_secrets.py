"""Secrets through the client against `spinyard up`: set with a publisher token, named by a
published spec, in the run's environment (checked by the run itself), names only when
listed, a page token refused, and a run whose secret is not set failing `missing_secret`."""

import stat

import pytest

from spinyard import ApiError, AsyncClient, Client, RunFailed

VALUE = "v4lue-from-ci ✓"
CHECKS = {  # a run that succeeds only if its environment holds the secret's value
    "name": "alice/secretive",
    "kind": "job",
    "command": [
        "{python}",
        "-c",
        f"import os, sys; sys.exit(0 if os.environ.get('API_TOKEN') == {VALUE!r} else 3)",
    ],
    "secrets": ["API_TOKEN"],
}


async def test_a_set_secret_reaches_the_run_and_a_missing_one_fails_it(stack):
    async with AsyncClient(stack["url"], stack["token"]) as client:
        assert (await client.set_secret(CHECKS["name"], "API_TOKEN", VALUE)).created
        assert not (await client.set_secret(CHECKS["name"], "API_TOKEN", VALUE)).created
        assert await client.secrets(CHECKS["name"]) == ["API_TOKEN"]
        await client.publish(CHECKS)
        done = await client.result(await client.run(CHECKS["name"], {}), timeout_s=60)
        assert done.state == "succeeded"

        await client.publish(CHECKS | {"secrets": ["API_TOKEN", "NOT_SET"]})
        with pytest.raises(RunFailed) as failed:
            await client.result(await client.run(CHECKS["name"], {}), timeout_s=60)
        assert failed.value.code == "missing_secret" and "NOT_SET" in failed.value.message

        await client.remove_secret(CHECKS["name"], "API_TOKEN")
        assert await client.secrets(CHECKS["name"]) == []
        with pytest.raises(ApiError) as caught:
            await client.remove_secret(CHECKS["name"], "API_TOKEN")
        assert (caught.value.status, caught.value.code) == (404, "not_found")
    # Kept where the local backend reads it: the stack's data dir, 0600.
    path = stack["data"] / "local" / "secrets" / "alice" / "secretive.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_page_token_cannot_set_or_list_secrets_and_bad_names_are_422(stack):
    with Client(stack["url"], stack["page_token"]) as page:
        with pytest.raises(ApiError) as caught:
            page.set_secret("alice/secretive", "API_TOKEN", "x")
        assert (caught.value.status, caught.value.code) == (403, "forbidden")
        with pytest.raises(ApiError):
            page.secrets("alice/secretive")
    with Client(stack["url"], stack["token"]) as client:
        with pytest.raises(ApiError) as caught:
            client.set_secret("alice/secretive", "api-token", "x")
        assert (caught.value.status, caught.value.code) == (422, "invalid_secret")
        assert "api-token" in caught.value.message
