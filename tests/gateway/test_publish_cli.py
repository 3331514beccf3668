"""`spinyard apps ...` through a gateway (SPINYARD_GATEWAY_URL, SPINYARD_TOKEN), and `spinyard
token --publish`: the real CLI in a subprocess against a gateway on a real nats-server."""

from dispatcher.gateway.auth import mint
from tests.gateway.support import PUBLISH_SECRET
from tests.helpers import free_port, run_cli

SPEC_V1 = "name: alice/sums\nkind: job\ncommand: [python, run.py]\ndescription: one\n"
SPEC_V2 = SPEC_V1.replace("one", "two")
# A job app with a scheduled pool of warm runners: `apps list` says it has a schedule.
SPEC_V3 = SPEC_V1 + "schedule: [{days: [mon], from: '09:50', to: '11:00', tz: UTC, pool: 2}]\n"


spinyard = run_cli  # `spinyard ARGS` in a subprocess: (exit code, stdout, stderr)


async def test_apps_add_history_rollback_list_rm_through_the_gateway(gw, tmp_path):
    token = mint(PUBLISH_SECRET, [], publish=["alice"], subject="ci")
    env = {"SPINYARD_GATEWAY_URL": gw.url, "SPINYARD_TOKEN": token}
    v1, v2 = tmp_path / "v1.yaml", tmp_path / "v2.yaml"
    v1.write_text(SPEC_V1)
    v2.write_text(SPEC_V2)

    assert await spinyard("apps", "add", str(v1), **env) == (
        0,
        "published alice/sums revision 1\n",
        "",
    )
    assert (await spinyard("apps", "add", str(v2), **env))[1] == "published alice/sums revision 2\n"
    assert (await spinyard("apps", "add", str(v2), **env))[1] == "unchanged alice/sums revision 2\n"
    code, out, _ = await spinyard("apps", "history", "alice/sums", **env)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[0].startswith("  1 ") and lines[1].startswith("* 2 ") and " ci " in lines[1]

    code, out, _ = await spinyard("apps", "rollback", "alice/sums", "1", **env)
    assert code == 0 and out.startswith("alice/sums is at revision 3 (sha256:")
    assert (await gw.state.apps.get("alice/sums")).description == "one"
    code, out, _ = await spinyard("apps", "list", **env)
    assert "alice/sums" in out and "demo/viz" in out
    v1.write_text(SPEC_V3)
    assert (await spinyard("apps", "add", str(v1), **env))[1] == "published alice/sums revision 4\n"
    code, out, _ = await spinyard("apps", "list", **env)
    assert [line.split() for line in out.splitlines() if "alice/sums" in line] == [
        ["alice/sums", "job", "+schedule(1)"]
    ]

    assert (await spinyard("apps", "rm", "alice/sums", **env))[:2] == (0, "removed alice/sums\n")
    assert await gw.state.apps.get("alice/sums") is None


async def test_a_refused_publish_is_one_error_line(gw, tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC_V1)
    page = mint(PUBLISH_SECRET, ["*"])
    code, out, err = await spinyard(
        "apps", "add", str(spec), SPINYARD_GATEWAY_URL=gw.url, SPINYARD_TOKEN=page
    )
    assert (code, out) == (1, "")
    assert err.startswith("error: forbidden: this token may not publish") and "Traceback" not in err
    spec.write_text(SPEC_V1.replace("kind: job", "kind: notebook"))
    token = mint(PUBLISH_SECRET, [], publish=["alice"])
    code, _, err = await spinyard(
        "apps", "add", str(spec), SPINYARD_GATEWAY_URL=gw.url, SPINYARD_TOKEN=token
    )
    assert code == 1 and err.startswith("error: invalid_spec: kind:")
    assert await gw.state.apps.get("alice/sums") is None


async def test_token_publish_mints_a_publisher_token_the_gateway_accepts(gw, tmp_path):
    code, token, err = await spinyard(
        "token", "--publish", "alice", "--ttl", "5m", SPINYARD_AUTH__HS256_SECRET=PUBLISH_SECRET
    )
    assert code == 0, err
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC_V1)
    code, out, err = await spinyard(
        "apps", "add", str(spec), SPINYARD_GATEWAY_URL=gw.url, SPINYARD_TOKEN=token.strip()
    )
    assert (code, out) == (0, "published alice/sums revision 1\n"), err
    code, _, err = await spinyard("token", SPINYARD_AUTH__HS256_SECRET=PUBLISH_SECRET)
    assert code == 2 and "--app or --publish" in err


async def test_history_over_nats_and_rollback_needs_a_gateway(gw, settings, tmp_path):
    token = mint(PUBLISH_SECRET, [], publish=["alice"], subject="ci")
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC_V1)
    await spinyard("apps", "add", str(spec), SPINYARD_GATEWAY_URL=gw.url, SPINYARD_TOKEN=token)
    nats = {"SPINYARD_NATS__URL": settings.nats.url}
    code, out, _ = await spinyard("apps", "history", "alice/sums", **nats)
    assert code == 0 and out.startswith("* 1 ")
    code, _, err = await spinyard("apps", "rollback", "alice/sums", "1", **nats)
    assert code == 2 and "--gateway" in err


async def test_no_gateway_and_unreadable_specs_exit_2(gw, tmp_path):
    token = mint(PUBLISH_SECRET, [], publish=["alice"])
    nowhere = f"http://127.0.0.1:{free_port()}"
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC_V1)
    code, out, err = await spinyard(
        "apps", "add", str(spec), SPINYARD_GATEWAY_URL=nowhere, SPINYARD_TOKEN=token
    )
    assert (code, out) == (2, "") and err.startswith(
        f"error: cannot reach the gateway at {nowhere}"
    )
    env = {"SPINYARD_GATEWAY_URL": gw.url, "SPINYARD_TOKEN": token}
    code, _, err = await spinyard("apps", "add", str(tmp_path / "none.yaml"), **env)
    assert code == 2 and "none.yaml" in err and "Traceback" not in err
    spec.write_text("kind: job\ncommand: [x]\n")
    code, _, err = await spinyard("apps", "add", str(spec), **env)
    assert code == 2 and "an app spec needs a `name`" in err
