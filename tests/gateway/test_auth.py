"""Token checks: every way a token can be wrong gets a clear 401 or 403."""

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from dispatcher.gateway.auth import Authenticator, AuthError, mint, new_secret
from dispatcher.settings import AuthSettings

SECRET = "s" * 40


@pytest.fixture(scope="module")
def rsa_keys():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


def auth(**kw) -> Authenticator:
    return Authenticator(AuthSettings(hs256_secret=SECRET, **kw))


def expect(status, code, fn):
    with pytest.raises(AuthError) as err:
        fn()
    assert (err.value.status, err.value.code) == (status, code)
    return err.value.message


def test_minted_token_verifies_with_its_claims():
    token = mint(SECRET, ["demo/hello", "lab/*"], session="s-1", subject="ann", ttl_s=60)
    claims = auth().verify(token)
    assert claims.apps == ("demo/hello", "lab/*") and claims.session == "s-1"
    assert claims.subject == "ann" and claims.expires > time.time()
    auth().authorize(claims, "demo/hello", "s-1")
    auth().authorize(claims, "lab/anything", "s-1")


def test_missing_token_is_401():
    assert "bearer token" in expect(401, "unauthorized", lambda: auth().verify(None))


def test_garbage_is_401():
    expect(401, "unauthorized", lambda: auth().verify("not.a.jwt"))


def test_expired_token_is_401():
    token = mint(SECRET, ["demo/hello"], ttl_s=-60)
    assert "expired" in expect(401, "unauthorized", lambda: auth().verify(token))


def test_forged_token_is_401():
    token = mint("x" * 40, ["demo/hello"])
    expect(401, "unauthorized", lambda: auth().verify(token))


def test_token_without_exp_is_401():
    token = jwt.encode({"apps": ["demo/hello"]}, SECRET, algorithm="HS256")
    expect(401, "unauthorized", lambda: auth().verify(token))


def test_token_without_apps_claim_is_401():
    token = jwt.encode({"exp": time.time() + 60}, SECRET, algorithm="HS256")
    assert "apps" in expect(401, "unauthorized", lambda: auth().verify(token))


def test_alg_none_is_refused():
    token = jwt.encode({"apps": ["*"], "exp": time.time() + 60}, None, algorithm="none")
    expect(401, "unauthorized", lambda: auth().verify(token))


def test_other_app_is_403():
    claims = auth().verify(mint(SECRET, ["demo/hello"]))
    expect(403, "forbidden", lambda: auth().authorize(claims, "demo/other"))


def test_other_session_is_403():
    claims = auth().verify(mint(SECRET, ["demo/hello"], session="s-1"))
    expect(403, "forbidden", lambda: auth().authorize(claims, "demo/hello", "s-2"))


def test_rs256_tokens_verify_with_the_public_key(rsa_keys):
    private, public = rsa_keys
    a = Authenticator(AuthSettings(rs256_public_key=public))
    token = jwt.encode(
        {"apps": ["demo/hello"], "exp": time.time() + 60}, private, algorithm="RS256"
    )
    assert a.verify(token).apps == ("demo/hello",)
    # An HS256 token signed with the public key as secret (alg confusion) is refused.
    forged = jwt.encode({"apps": ["*"], "exp": time.time() + 60}, SECRET, algorithm="HS256")
    expect(401, "unauthorized", lambda: a.verify(forged))


def test_audience_and_issuer_are_enforced_when_set():
    a = auth(audience="spinyard", issuer="platform")
    good = mint(SECRET, ["*"], audience="spinyard", issuer="platform")
    assert a.verify(good).apps == ("*",)
    expect(
        401,
        "unauthorized",
        lambda: a.verify(mint(SECRET, ["*"], audience="other", issuer="platform")),
    )
    expect(401, "unauthorized", lambda: a.verify(mint(SECRET, ["*"], audience="spinyard")))


def test_enabled_without_a_key_refuses_to_start():
    with pytest.raises(ValueError, match="no key is set"):
        Authenticator(AuthSettings())


def test_short_secret_is_refused():
    with pytest.raises(ValueError, match="32 characters"):
        Authenticator(AuthSettings(hs256_secret="short"))


def test_mint_rejects_bad_names():
    with pytest.raises(ValueError):
        mint(SECRET, ["Not An App"])
    with pytest.raises(ValueError):
        mint(SECRET, ["demo/hello"], session="bad session")


def test_new_secret_is_long_and_random():
    a, b = new_secret(), new_secret()
    assert a != b and len(a) >= 48


def test_a_publisher_token_needs_no_apps_and_publishes_only_its_owners():
    token = mint(SECRET, [], publish=["alice", "lab"], subject="ci", ttl_s=60)
    claims = auth().verify(token)
    assert claims.publish == ("alice", "lab") and claims.apps == ()
    auth().authorize_publish(claims, "alice")
    assert "'bob'" in expect(403, "forbidden", lambda: auth().authorize_publish(claims, "bob"))
    star = auth().verify(mint(SECRET, [], publish=["*"], ttl_s=60))
    auth().authorize_publish(star, "anyone")


def test_a_page_token_cannot_publish():
    claims = auth().verify(mint(SECRET, ["*"], ttl_s=60))
    message = expect(403, "forbidden", lambda: auth().authorize_publish(claims, "alice"))
    assert "no 'publish' claim" in message


def test_a_malformed_publish_claim_is_401():
    for publish in ("alice", [1], {"alice": True}):
        token = jwt.encode({"publish": publish, "exp": time.time() + 60}, SECRET, algorithm="HS256")
        expect(401, "unauthorized", lambda token=token: auth().verify(token))
    with pytest.raises(ValueError):
        mint(SECRET, [], publish=["Not An Owner"])
