"""Bearer-token verification: keys from a PEM file or a JWKS document, one pinned algorithm."""
from __future__ import annotations

import datetime
import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from engine.security.tokens import TokenVerifier, Unauthenticated

ISSUER, AUDIENCE = "https://issuer.test", "txengine"


def claims(**overrides) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"sub": "svc", "iss": ISSUER, "aud": AUDIENCE,
            "exp": now + datetime.timedelta(minutes=5), **overrides}


@pytest.fixture
def keys():
    return [ec.generate_private_key(ec.SECP256R1()) for _ in range(2)]


def jwks(tmp_path, keys) -> TokenVerifier:
    document = {"keys": [{**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(k.public_key())),
                          "kid": f"k{i}", "alg": "ES256", "use": "sig"}
                         for i, k in enumerate(keys)]}
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(document))
    return TokenVerifier(path, "ES256", ISSUER, AUDIENCE)


def test_a_jwks_document_picks_the_key_by_kid(tmp_path, keys):
    verifier = jwks(tmp_path, keys)
    for i, key in enumerate(keys):
        signed = jwt.encode(claims(sub=f"svc-{i}"), key, algorithm="ES256", headers={"kid": f"k{i}"})
        assert verifier.principal(signed) == f"svc-{i}"
    wrong_kid = jwt.encode(claims(), keys[0], algorithm="ES256", headers={"kid": "k1"})
    unknown_kid = jwt.encode(claims(), keys[0], algorithm="ES256", headers={"kid": "k9"})
    for token in (wrong_kid, unknown_kid):
        with pytest.raises(Unauthenticated):
            verifier.principal(token)


def test_a_pem_key_verifies_the_pinned_algorithm_only(tmp_path, keys):
    path = tmp_path / "key.pem"
    path.write_bytes(keys[0].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    verifier = TokenVerifier(path, "ES256", ISSUER, AUDIENCE)
    assert verifier.principal(jwt.encode(claims(), keys[0], algorithm="ES256")) == "svc"
    p384 = ec.generate_private_key(ec.SECP384R1())
    for bad in (jwt.encode(claims(), p384, algorithm="ES384"),
                jwt.encode(claims(), None, algorithm="none"),
                jwt.encode(claims(sub=""), keys[0], algorithm="ES256"),
                jwt.encode({k: v for k, v in claims().items() if k != "exp"}, keys[0],
                           algorithm="ES256")):
        with pytest.raises(Unauthenticated):
            verifier.principal(bad)
    # A public key is no HMAC secret: configuring it for HS256 is refused at start-up.
    with pytest.raises(jwt.InvalidKeyError):
        TokenVerifier(path, "HS256", ISSUER, AUDIENCE)
    with pytest.raises(ValueError):
        TokenVerifier(path, "none", ISSUER, AUDIENCE)
