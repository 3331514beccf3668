"""`spinyard secrets set|list|rm`: the real CLI in a subprocess, through a gateway (a
publisher token) and straight into the local backend's store; values from stdin or
--from-env, never from the command line, never printed."""

from dispatcher.backends.local.secrets import SecretFiles
from dispatcher.gateway.auth import mint
from tests.gateway.support import PUBLISH_SECRET
from tests.helpers import run_cli

VALUE = "from-ci ✓ s3cr3t"


async def spinyard(*args: str, stdin: str = "", **env: str) -> tuple[int, str, str]:
    """The CLI's answer, after checking the value is never in what it prints."""
    code, out, err = await run_cli(*args, stdin=stdin, **env)
    assert VALUE not in out + err
    return code, out, err


async def test_set_list_rm_through_the_gateway(sgw):
    minted = mint(PUBLISH_SECRET, [], publish=["alice"], subject="ci")
    env = {"SPINYARD_GATEWAY_URL": sgw.url, "SPINYARD_TOKEN": minted}
    got = await spinyard("secrets", "set", "alice/sums", "DB_URL", stdin=VALUE + "\n", **env)
    assert got == (0, "set alice/sums DB_URL (new)\n", "")
    assert sgw.secrets.read("alice/sums") == {"DB_URL": VALUE}  # one trailing newline dropped
    env_value = env | {"CI_TOKEN": "tok"}
    got = await spinyard(
        "secrets", "set", "alice/sums", "API_TOKEN", "--from-env", "CI_TOKEN", **env_value
    )
    assert got == (0, "set alice/sums API_TOKEN (new)\n", "")
    got = await spinyard("secrets", "set", "alice/sums", "DB_URL", stdin="v2", **env)
    assert got[:2] == (0, "set alice/sums DB_URL (replaced)\n")
    assert await spinyard("secrets", "list", "alice/sums", **env) == (0, "API_TOKEN\nDB_URL\n", "")
    assert (await spinyard("secrets", "rm", "alice/sums", "DB_URL", **env))[:2] == (
        0,
        "removed alice/sums DB_URL\n",
    )
    code, _, err = await spinyard("secrets", "rm", "alice/sums", "DB_URL", **env)
    assert code == 1 and "not_found" in err
    assert sgw.secrets.read("alice/sums") == {"API_TOKEN": "tok"}

    bob = mint(PUBLISH_SECRET, [], publish=["bob"], subject="ci")
    code, _, err = await spinyard(
        "secrets", "set", "alice/sums", "X", stdin=VALUE, **(env | {"SPINYARD_TOKEN": bob})
    )
    assert code == 1 and "forbidden" in err
    assert await sgw.secrets.names("alice/sums") == ["API_TOKEN"]


async def test_set_list_rm_in_the_local_store_and_bad_input(tmp_path):
    env = {"SPINYARD_DATA_DIR": str(tmp_path)}
    store = SecretFiles.under(tmp_path)
    got = await spinyard("secrets", "set", "alice/sums", "DB_URL", stdin=VALUE, **env)
    assert got == (0, "set alice/sums DB_URL (new)\n", "")
    assert store.read("alice/sums") == {"DB_URL": VALUE}
    assert await spinyard("secrets", "list", "alice/sums", **env) == (0, "DB_URL\n", "")
    assert await spinyard("secrets", "rm", "alice/sums", "DB_URL", **env) == (
        0,
        "removed alice/sums DB_URL\n",
        "",
    )
    code, _, err = await spinyard("secrets", "rm", "alice/sums", "DB_URL", **env)
    assert (code, err) == (1, "error: alice/sums has no secret DB_URL\n")

    for args, stdin, words in (
        (("set", "alice/sums", "db-url"), VALUE, "not an environment variable name"),
        (("set", "Alice", "DB_URL"), VALUE, "owner/title"),
        (("set", "alice/sums", "DB_URL"), "", "the value is empty"),
        (("set", "alice/sums", "DB_URL", "--from-env", "NOT_SET_HERE"), "", "is not set"),
    ):
        code, _, err = await spinyard("secrets", *args, stdin=stdin, **env)
        assert code == 2 and words in err, (args, err)
    assert await store.names("alice/sums") == []
