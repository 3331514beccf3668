"""Object storage for run results: the one module that talks to S3.

Jobs never get storage credentials. spinyard gives a job presigned PUT URLs
for exactly the outputs its app declares, then checks what arrived and hands
pages presigned GET URLs. Everything lives under `results/<job_id>/` in one
bucket. The reaper deletes a run's results once its app's `retention_s` has
passed (`delete_job`); a bucket-wide lifecycle rule is the backstop for
anything the reaper never sees.

It talks to MinIO in production and to moto's S3 server on one machine and in
tests, through the synchronous `minio` SDK, always via `asyncio.to_thread`.
"""

import asyncio
import io
import re
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, TypeVar

import certifi
import urllib3
from minio import Minio
from minio.commonconfig import ENABLED, Filter
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError
from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule

from dispatcher import logs
from dispatcher.settings import StoreSettings
from handlers.errors import PermanentError, PublicError, RetryableError
from handlers.ports import ObjectStore as ObjectStorePort
from handlers.ports import StoredResult
from schemas import errors as codes
from schemas.names import JOB_ID_RE

PREFIX = "results/"
LIFECYCLE_RULE_ID = "spinyard-results-expiry"
_BACKOFF_S = 0.1  # first pause between tries; doubles each time
_NAME_RE = re.compile(r"^[^/\\\x00-\x1f.][^/\\\x00-\x1f]{0,254}\Z")

T = TypeVar("T")


class StoreUnavailable(RetryableError):
    """The object store could not be reached or answered 5xx; try again later."""


class ResultsMismatch(PermanentError, PublicError):
    """What a job uploaded does not match its declared outputs; extra objects were deleted."""

    code = codes.BAD_RESULTS

    def __init__(
        self, job_id: str, missing: list[str], unexpected: list[str], too_large: list[str]
    ):
        found = (("missing", missing), ("unexpected", unexpected), ("too large", too_large))
        parts = [f"{what} {', '.join(map(repr, names))}" for what, names in found if names]
        super().__init__(f"job {job_id} results do not match its outputs: " + "; ".join(parts))
        self.missing, self.unexpected, self.too_large = missing, unexpected, too_large


# The port's result type, under the name this module has always used.
Result = StoredResult


def key(job_id: str, name: str) -> str:
    """The storage key of a job's result file; the only place keys are built.

    Args:
        job_id: the job's id (`j-...`).
        name: a plain file name: no `/`, not starting with `.`.

    Raises:
        ValueError: bad job id or name.
    """
    if not JOB_ID_RE.match(job_id):
        raise ValueError(f"invalid job id {job_id!r}")
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid result name {name!r}: must be a plain file name")
    return f"{PREFIX}{job_id}/{name}"


def _job_prefix(job_id: str) -> str:
    return key(job_id, "x").removesuffix("x")


def _check_key(k: str) -> str:
    """Return `k` if `key()` could have built it; else raise ValueError."""
    parts = k.split("/")
    if len(parts) != 3 or key(parts[1], parts[2]) != k:
        raise ValueError(f"invalid key {k!r}: not results/<job_id>/<name>")
    return k


def _transient(exc: Exception) -> bool:
    """True for errors worth retrying: no connection, timeouts, 5xx."""
    if isinstance(exc, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, ServerError):
        return exc.status_code >= 500
    if isinstance(exc, S3Error):
        return exc.response is not None and exc.response.status >= 500
    if isinstance(exc, InvalidResponseError):
        return exc._code >= 500  # a proxy's HTML 502/503 page
    return False


def _endpoint(value: str, secure: bool) -> tuple[str, bool]:
    for scheme, is_secure in (("https://", True), ("http://", False)):
        if value.startswith(scheme):
            return value.removeprefix(scheme).rstrip("/"), is_secure
    return value, secure


class ObjectStore(ObjectStorePort):
    """Results bucket access for handlers: presigned URLs, checks, retention."""

    def __init__(self, settings: StoreSettings):
        if not (settings.access_key and settings.secret_key):
            raise ValueError("store.access_key and store.secret_key must be set")
        self.settings = settings
        self.bucket = settings.bucket
        # Made here, not at import: `logs.get` binds, fixing the config of the moment.
        self._log = logs.get("spinyard.store", bucket=settings.bucket)
        self._http = http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=settings.timeout_s, read=settings.timeout_s),
            retries=False,  # we retry, boundedly, in `_call`
            maxsize=10,
            cert_reqs="CERT_REQUIRED",
            ca_certs=certifi.where(),
        )
        creds = settings.access_key.get_secret_value(), settings.secret_key.get_secret_value()
        options = {"region": settings.region, "http_client": http}
        self._client = Minio(settings.endpoint, *creds, secure=settings.secure, **options)
        # Presigning is offline when the region is set; the host is part of the
        # signature, so URLs for jobs and browsers are signed for their host.
        public, secure = _endpoint(settings.public_endpoint or settings.endpoint, settings.secure)
        self._signer = Minio(public, *creds, secure=secure, **options)

    async def _call(self, op: str, fn: Callable[..., T], *args: Any) -> T:
        for attempt in range(1, self.settings.tries + 1):
            try:
                return await asyncio.to_thread(fn, *args)
            except Exception as exc:
                if not _transient(exc):
                    raise
                if attempt == self.settings.tries:
                    self._log.warning(
                        "store_unavailable", op=op, tries=attempt, error=type(exc).__name__
                    )
                    raise StoreUnavailable(
                        f"object store at {self.settings.endpoint} unavailable "
                        f"({op}: {type(exc).__name__})"
                    ) from exc
                self._log.info(
                    "store_call_retried", op=op, attempt=attempt, error=type(exc).__name__
                )
                await asyncio.sleep(_BACKOFF_S * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    async def setup(self) -> None:
        """Create the bucket if missing and set the `results/` expiry rule. Idempotent.

        Raises:
            StoreUnavailable: the store did not answer.
        """
        await self._call("make_bucket", self._make_bucket)
        if self.settings.lifecycle_days:
            await self._call("set_lifecycle", self._set_lifecycle)

    async def close(self) -> None:
        """Close pooled connections. The store may not be used afterwards."""
        self._http.clear()

    def _make_bucket(self) -> None:
        if self._client.bucket_exists(self.bucket):
            return
        try:
            self._client.make_bucket(self.bucket)
            self._log.info("bucket_created")
        except S3Error as exc:  # another replica won the race
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def _set_lifecycle(self) -> None:
        try:
            current = self._client.get_bucket_lifecycle(self.bucket)
        except S3Error as exc:
            if exc.code != "NotImplemented":
                raise
            self._log.warning("lifecycle_unsupported")
            return
        # Keep rules an operator added; replace only ours.
        rules = [r for r in (current.rules if current else []) if r.rule_id != LIFECYCLE_RULE_ID]
        rules.append(
            Rule(
                ENABLED,
                rule_filter=Filter(prefix=PREFIX),
                rule_id=LIFECYCLE_RULE_ID,
                expiration=Expiration(days=self.settings.lifecycle_days),
            )
        )
        self._client.set_bucket_lifecycle(self.bucket, LifecycleConfig(rules))
        self._log.info("lifecycle_set", days=self.settings.lifecycle_days)

    def upload_urls(self, job_id: str, names: Iterable[str]) -> dict[str, str]:
        """Presigned PUT URLs, one per declared output, valid `upload_url_ttl_s`.

        Raises:
            ValueError: bad job id, bad or repeated name.
        """
        names = list(names)
        if len(set(names)) != len(names):
            raise ValueError(f"repeated output names in {names!r}")
        ttl = timedelta(seconds=self.settings.upload_url_ttl_s)
        urls = {
            n: self._signer.presigned_put_object(self.bucket, key(job_id, n), ttl) for n in names
        }
        self._log.info("upload_urls_issued", job_id=job_id, keys=[key(job_id, n) for n in names])
        return urls

    def download_url(self, k: str) -> str:
        """A presigned GET URL for a result key, valid `download_url_ttl_s`.

        Raises:
            ValueError: `k` is not a result key.
        """
        ttl = timedelta(seconds=self.settings.download_url_ttl_s)
        return self._signer.presigned_get_object(self.bucket, _check_key(k), ttl)

    async def collect(self, job_id: str, expected: list[str]) -> list[Result]:
        """Check a finished job's uploads against its declared outputs.

        Objects that are not declared, or larger than `max_result_bytes`, are
        deleted. spinyard's own files for the job are left alone.

        Returns:
            One `Result` per expected name, in order, each with a GET URL.

        Raises:
            ResultsMismatch: an output is missing, or something was deleted.
            StoreUnavailable: the store did not answer.
        """
        keys = {key(job_id, n): n for n in expected}
        prefix = _job_prefix(job_id)
        objects = await self._call("list_objects", self._list, prefix)
        found, unexpected, too_large = {}, [], []
        for obj in objects:
            if obj.object_name not in keys:
                unexpected.append(obj.object_name)
            elif obj.size > self.settings.max_result_bytes:
                too_large.append(obj.object_name)
            else:
                found[obj.object_name] = obj.size
        if unexpected or too_large:
            await self._call("remove_objects", self._remove, unexpected + too_large)
        missing = [n for k, n in keys.items() if k not in found]
        if missing or unexpected or too_large:
            self._log.warning(
                "results_rejected",
                job_id=job_id,
                missing=missing,
                unexpected=unexpected,
                too_large=too_large,
            )
            strip = len(prefix)
            raise ResultsMismatch(
                job_id, missing, [k[strip:] for k in unexpected], [k[strip:] for k in too_large]
            )
        self._log.info("results_collected", job_id=job_id, keys=list(keys))
        return [Result(k, n, found[k], self.download_url(k)) for k, n in keys.items()]

    async def delete_job(self, job_id: str) -> int:
        """Delete every object of a job; returns how many."""
        objects = await self._call("list_objects", self._list, _job_prefix(job_id))
        await self._call("remove_objects", self._remove, [o.object_name for o in objects])
        self._log.info("job_results_deleted", job_id=job_id, count=len(objects))
        return len(objects)

    async def put_bytes(self, k: str, data: bytes) -> None:
        """Write a small object at a result key (tools and tests stage objects with it)."""
        await self._call("put_object", self._put, _check_key(k), data)

    async def get_bytes(self, k: str) -> bytes:
        """Read a whole object.

        Raises:
            KeyError: no such object.
        """
        return await self._call("get_object", self._get, _check_key(k))

    def _list(self, prefix: str) -> list:
        return list(self._client.list_objects(self.bucket, prefix=prefix, recursive=True))

    def _remove(self, keys: list[str]) -> None:
        if not keys:
            return
        errors = list(self._client.remove_objects(self.bucket, [DeleteObject(k) for k in keys]))
        if errors:
            raise RuntimeError(f"could not delete {len(errors)} objects: {errors[0].code}")

    def _put(self, k: str, data: bytes) -> None:
        self._client.put_object(self.bucket, k, io.BytesIO(data), len(data))

    def _get(self, k: str) -> bytes:
        try:
            response = self._client.get_object(self.bucket, k)
        except S3Error as exc:
            if exc.code == "NoSuchKey":
                raise KeyError(k) from None
            raise
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()
