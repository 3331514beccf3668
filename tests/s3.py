"""S3 helpers for tests: settings for the `s3_server` fixture (tests/conftest.py), and checks
of presigned URLs.

Build settings with `store_settings(s3_server, bucket=...)`, one bucket per
test. moto keeps its state in process memory, shared by every server in the
process; it does not check signatures, so `signature_valid` checks them here.
"""

import hashlib
import hmac
import uuid
from urllib.parse import parse_qsl, quote, urlsplit

from dispatcher.settings import StoreSettings

ACCESS_KEY = "spinyard-test"
SECRET_KEY = "spinyard-test-secret"


def store_settings(endpoint: str, bucket: str | None = None, **changes) -> StoreSettings:
    """StoreSettings for a test endpoint: fake credentials, a fresh bucket, short timeouts."""
    values = {
        "endpoint": endpoint,
        "access_key": ACCESS_KEY,
        "secret_key": SECRET_KEY,
        "bucket": bucket or f"t-{uuid.uuid4().hex[:16]}",
        "timeout_s": 2.0,
    }
    return StoreSettings(**values | changes)


def presigned_parts(url: str) -> tuple[str, str, dict[str, str]]:
    """Split a presigned URL into (host, path, query parameters)."""
    parts = urlsplit(url)
    return parts.netloc, parts.path, dict(parse_qsl(parts.query, keep_blank_values=True))


def signature_valid(url: str, method: str, secret_key: str = SECRET_KEY) -> bool:
    """Check a presigned URL's SigV4 signature as S3 would, for `method`.

    moto does not check signatures, so this is how tests see that a URL is
    good for PUT and not GET (or the reverse), for exactly its path.
    """
    host, path, query = presigned_parts(url)
    signature = query.pop("X-Amz-Signature")
    canonical_query = "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items())
    )
    request = "\n".join(
        [method, path, canonical_query, f"host:{host}", "", "host", "UNSIGNED-PAYLOAD"]
    )
    amz_date = query["X-Amz-Date"]
    scope = query["X-Amz-Credential"].split("/", 1)[1]
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(request.encode()).hexdigest()]
    )
    signing_key = ("AWS4" + secret_key).encode()
    for part in scope.split("/"):
        signing_key = hmac.new(signing_key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(signing_key, to_sign.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)
