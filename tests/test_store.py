"""The object store against moto's real S3 server, through the real minio SDK.

Jobs' uploads are plain HTTP PUTs to the presigned URLs, as a job makes them.
moto does not check signatures or expiry, so tests of scope and expiry check
what spinyard generates (`tests.s3.signature_valid`, `presigned_parts`).
"""

import io
import json
import socket
import time

import aiohttp
import pytest
import structlog
from minio import Minio
from minio.commonconfig import ENABLED, Filter
from minio.error import InvalidResponseError, ServerError
from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule
from structlog.testing import capture_logs
from urllib3.exceptions import NewConnectionError
from yarl import URL

from dispatcher import logs
from dispatcher.embedded.s3server import S3Server
from dispatcher.store import (
    LIFECYCLE_RULE_ID,
    ObjectStore,
    ResultsMismatch,
    StoreUnavailable,
    _transient,
    key,
)
from handlers.errors import PermanentError, RetryableError
from tests.helpers import free_port
from tests.s3 import (
    ACCESS_KEY,
    SECRET_KEY,
    presigned_parts,
    signature_valid,
    store_settings,
)

JOB = "j-abc12345"


def raw(endpoint: str) -> Minio:
    """A plain minio client, to look at the bucket behind spinyard's back."""
    return Minio(endpoint, ACCESS_KEY, SECRET_KEY, secure=False, region="us-east-1")


async def http(method: str, url: str, data: bytes | None = None) -> tuple[int, bytes]:
    """One request exactly as a job or browser makes it (URL sent as signed)."""
    async with aiohttp.ClientSession() as session:
        async with session.request(method, URL(url, encoded=True), data=data) as response:
            return response.status, await response.read()


@pytest.fixture
async def store(s3_server):
    s = ObjectStore(store_settings(s3_server))
    await s.setup()
    yield s
    await s.close()


async def upload(store: ObjectStore, job_id: str, files: dict[str, bytes]) -> None:
    urls = store.upload_urls(job_id, list(files))
    for name, data in files.items():
        status, _ = await http("PUT", urls[name], data)
        assert status == 200


async def test_setup_creates_bucket_once(s3_server):
    settings = store_settings(s3_server)
    assert not raw(s3_server).bucket_exists(settings.bucket)
    s = ObjectStore(settings)
    await s.setup()
    await s.setup()
    assert raw(s3_server).bucket_exists(settings.bucket)
    await ObjectStore(settings).setup()  # a second replica


async def test_setup_sets_lifecycle_rule_and_keeps_others(s3_server):
    settings = store_settings(s3_server, lifecycle_days=3)
    client = raw(s3_server)
    client.make_bucket(settings.bucket)
    theirs = Rule(
        ENABLED,
        rule_filter=Filter(prefix="tmp/"),
        rule_id="operator",
        expiration=Expiration(days=1),
    )
    client.set_bucket_lifecycle(settings.bucket, LifecycleConfig([theirs]))
    s = ObjectStore(settings)
    await s.setup()
    await s.setup()
    rules = {r.rule_id: r for r in client.get_bucket_lifecycle(settings.bucket).rules}
    assert set(rules) == {"operator", LIFECYCLE_RULE_ID}
    ours = rules[LIFECYCLE_RULE_ID]
    assert (ours.status, ours.rule_filter.prefix, ours.expiration.days) == (ENABLED, "results/", 3)


async def test_no_lifecycle_rule_when_days_is_zero(s3_server):
    settings = store_settings(s3_server, lifecycle_days=0)
    s = ObjectStore(settings)
    await s.setup()
    assert raw(s3_server).get_bucket_lifecycle(settings.bucket) is None
    await s.close()


async def test_upload_urls_are_scoped_to_each_declared_output(s3_server):
    settings = store_settings(s3_server, upload_url_ttl_s=120)
    urls = ObjectStore(settings).upload_urls(JOB, ["out.csv", "plot 1.png"])
    assert set(urls) == {"out.csv", "plot 1.png"}
    for name, url in urls.items():
        host, path, query = presigned_parts(url)
        assert host == s3_server
        assert path == f"/{settings.bucket}/results/{JOB}/{name.replace(' ', '%20')}"
        assert query["X-Amz-Expires"] == "120"
        access, _date, region, service, end = query["X-Amz-Credential"].split("/")
        assert (access, region, service, end) == (ACCESS_KEY, "us-east-1", "s3", "aws4_request")
        assert query["X-Amz-SignedHeaders"] == "host"
        assert signature_valid(url, "PUT")
        assert not signature_valid(url, "GET")
        assert not signature_valid(url.replace(f"/{JOB}/", "/j-other1234/"), "PUT")


async def test_urls_are_signed_for_the_public_endpoint(s3_server):
    s = ObjectStore(store_settings(s3_server, public_endpoint="https://files.example.com"))
    await s.setup()  # internal calls still go to moto
    url = s.upload_urls(JOB, ["out.csv"])["out.csv"]
    assert url.startswith("https://files.example.com/")
    assert signature_valid(url, "PUT")


async def test_uploads_are_collected_with_download_urls(store):
    files = {"out.csv": b"a,b\n1,2\n", "model.bin": bytes(range(256)) * 4}
    await upload(store, JOB, files)
    results = await store.collect(JOB, ["out.csv", "model.bin"])
    assert [(r.name, r.key, r.size) for r in results] == [
        ("out.csv", f"results/{JOB}/out.csv", 8),
        ("model.bin", f"results/{JOB}/model.bin", 1024),
    ]
    for r in results:
        _, path, query = presigned_parts(r.url)
        assert path == f"/{store.bucket}/{r.key}"
        assert query["X-Amz-Expires"] == "3600"
        assert signature_valid(r.url, "GET") and not signature_valid(r.url, "PUT")
        assert await http("GET", r.url) == (200, files[r.name])


async def test_missing_output_is_named(store):
    await upload(store, JOB, {"a.txt": b"a"})
    with pytest.raises(ResultsMismatch, match=r"missing 'b\.txt'") as err:
        await store.collect(JOB, ["a.txt", "b.txt"])
    assert isinstance(err.value, PermanentError)
    assert (err.value.missing, err.value.unexpected) == (["b.txt"], [])


async def test_unexpected_object_is_deleted_and_reported(store, s3_server):
    await upload(store, JOB, {"a.txt": b"a"})
    raw(s3_server).put_object(store.bucket, f"results/{JOB}/extra.bin", io.BytesIO(b"x"), 1)
    with pytest.raises(ResultsMismatch, match=r"unexpected 'extra\.bin'") as err:
        await store.collect(JOB, ["a.txt"])
    assert err.value.unexpected == ["extra.bin"]
    names = [o.object_name for o in raw(s3_server).list_objects(store.bucket, recursive=True)]
    assert names == [f"results/{JOB}/a.txt"]


async def test_too_large_output_is_deleted(s3_server):
    s = ObjectStore(store_settings(s3_server, max_result_bytes=10))
    await s.setup()
    await upload(s, JOB, {"ok.txt": b"0123456789", "big.txt": b"0123456789!"})
    with pytest.raises(ResultsMismatch, match=r"too large 'big\.txt'") as err:
        await s.collect(JOB, ["ok.txt", "big.txt"])
    assert err.value.too_large == ["big.txt"]
    with pytest.raises(KeyError):
        await s.get_bytes(f"results/{JOB}/big.txt")


@pytest.mark.parametrize("job_id", ["", "j-ABC12345", "j-abc", "../j-abc12345", "j-abc12345/x"])
async def test_bad_job_id_is_rejected(store, job_id):
    with pytest.raises(ValueError, match="invalid job id"):
        store.upload_urls(job_id, ["out.csv"])
    with pytest.raises(ValueError, match="invalid job id"):
        await store.collect(job_id, ["out.csv"])
    with pytest.raises(ValueError, match="invalid job id"):
        await store.delete_job(job_id)


@pytest.mark.parametrize("bad", ["", ".hidden", "a/b", "..", "a\\b", "a\nb"])
async def test_bad_names_and_keys_are_rejected(store, bad):
    with pytest.raises(ValueError):
        store.upload_urls(JOB, [bad])
    with pytest.raises(ValueError):
        store.download_url(f"results/{JOB}/{bad}")
    with pytest.raises(ValueError):
        await store.put_bytes(f"results/{JOB}/{bad}", b"x")
    with pytest.raises(ValueError):
        store.upload_urls(JOB, ["a", "a"])
    with pytest.raises(ValueError):
        await store.get_bytes(f"other/{JOB}/a")


async def test_delete_job_removes_only_that_job(store):
    other = "j-def67890"
    await upload(store, JOB, {"a": b"1", "b": b"2"})
    await upload(store, other, {"a": b"2"})
    assert await store.delete_job(JOB) == 2
    assert await store.delete_job(JOB) == 0
    assert await store.get_bytes(key(other, "a")) == b"2"
    with pytest.raises(KeyError):
        await store.get_bytes(key(JOB, "b"))


async def test_unavailable_after_bounded_retries():
    s = ObjectStore(store_settings(f"127.0.0.1:{free_port()}", tries=3))
    with capture_logs() as logged:
        with pytest.raises(StoreUnavailable, match="unavailable") as err:
            await s.setup()
    assert isinstance(err.value, RetryableError)
    events = [e["event"] for e in logged]
    assert events == ["store_call_retried", "store_call_retried", "store_unavailable"]


async def test_timeout_is_unavailable():
    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        endpoint = f"127.0.0.1:{listener.getsockname()[1]}"
        s = ObjectStore(store_settings(endpoint, timeout_s=0.2, tries=2))
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await s.get_bytes(key(JOB, "a"))
        assert time.monotonic() - started < 2


async def test_works_again_when_the_server_comes_back():
    server = S3Server().start()
    try:
        s = ObjectStore(store_settings(server.endpoint))
        await s.setup()
        server.stop()
        with pytest.raises(StoreUnavailable):
            await s.put_bytes(key(JOB, "a"), b"1")
        server = S3Server(port=server.port).start()  # moto's state lives on in the process
        await s.put_bytes(key(JOB, "a"), b"1")
        assert await s.get_bytes(key(JOB, "a")) == b"1"
    finally:
        server.stop()


def test_transient_errors():
    assert _transient(NewConnectionError(None, "refused"))
    assert _transient(ConnectionResetError())
    assert _transient(ServerError("boom", 503))
    assert _transient(InvalidResponseError(502, "text/html", "<html>bad gateway</html>"))
    assert not _transient(InvalidResponseError(403, "text/html", "denied"))
    assert not _transient(ValueError("bad key"))


async def test_secrets_never_reach_the_logs(s3_server, capsys):
    saved = structlog.get_config()
    logs.configure("json", "debug")
    try:
        s = ObjectStore(store_settings(s3_server))
        await s.setup()
        await upload(s, JOB, {"a.txt": b"a"})
        [result] = await s.collect(JOB, ["a.txt"])
        with pytest.raises(ResultsMismatch):
            await s.collect(JOB, ["a.txt", "b.txt"])
        with pytest.raises(StoreUnavailable):
            await ObjectStore(store_settings(f"127.0.0.1:{free_port()}", tries=2)).setup()
    finally:
        structlog.configure(**saved)
    err = capsys.readouterr().err
    lines = [json.loads(line) for line in err.splitlines()]
    assert {"upload_urls_issued", "results_collected", "results_rejected"} <= {
        line["event"] for line in lines
    }
    assert f"results/{JOB}/a.txt" in err
    for secret in (SECRET_KEY, ACCESS_KEY, "X-Amz-", result.url):
        assert secret not in err
    assert SECRET_KEY not in repr(s.settings) and SECRET_KEY not in repr(vars(s))
