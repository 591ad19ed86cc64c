"""Bearer tokens: JWTs verified with PyJWT, one pinned algorithm, issuer, audience and expiry.

The verifying keys come from a file: a PEM public key (or, for an HMAC algorithm, the shared
secret itself), or a JWKS document whose keys are chosen by the token's ``kid``. A token with
``alg`` other than the pinned one (``none`` included), a bad signature, a missing or wrong
``iss``/``aud``, a missing or past ``exp`` or no ``sub`` is refused; the principal is ``sub``.
"""
from __future__ import annotations

import json
import pathlib

import jwt

# Seconds of clock difference tolerated between the token's issuer and this server.
LEEWAY_SECONDS = 30
REQUIRED_CLAIMS = ("exp", "iss", "aud", "sub")
TOKEN_BYTES_MAX = 8_192


class Unauthenticated(Exception):
    """The caller did not prove an identity; the message says why, never the credential."""


class TokenVerifier:
    """Checks bearer tokens against one algorithm, issuer, audience and key set."""

    def __init__(self, keys_path: pathlib.Path, algorithm: str, issuer: str, audience: str):
        if algorithm.lower() == "none" or algorithm not in jwt.algorithms.get_default_algorithms():
            raise ValueError(f"unsupported JWT algorithm {algorithm!r}")
        self.algorithm = algorithm
        self.issuer = issuer
        self.audience = audience
        self._keys = _load_keys(keys_path.read_bytes(), algorithm)

    def principal(self, token: str) -> str:
        """The verified token's subject; raises Unauthenticated otherwise."""
        if len(token) > TOKEN_BYTES_MAX:
            raise Unauthenticated("bearer token too long")
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") != self.algorithm:
                raise Unauthenticated(f"token algorithm must be {self.algorithm}")
            key = self._key_for(header.get("kid"))
            claims = jwt.decode(
                token, key, algorithms=[self.algorithm], audience=self.audience,
                issuer=self.issuer, leeway=LEEWAY_SECONDS,
                options={"require": list(REQUIRED_CLAIMS), "verify_signature": True},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("bearer token expired") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("bearer token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("bearer token from an unknown issuer") from None
        except jwt.PyJWTError as error:
            raise Unauthenticated(f"invalid bearer token: {type(error).__name__}") from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated("bearer token has no subject")
        return subject

    def _key_for(self, kid):
        if None in self._keys and len(self._keys) == 1:
            return self._keys[None]
        if kid not in self._keys:
            raise Unauthenticated("bearer token signed by an unknown key")
        return self._keys[kid]


def _load_keys(data: bytes, algorithm: str) -> dict:
    """{kid: key}; a single PEM (or secret) is {None: key}."""
    text = data.strip()
    if text.startswith(b"{"):
        document = json.loads(text)
        keys = {}
        for entry in document.get("keys", []):
            if entry.get("alg", algorithm) != algorithm or entry.get("use", "sig") != "sig":
                continue
            keys[entry.get("kid")] = jwt.PyJWK(entry, algorithm).key
        if not keys:
            raise ValueError(f"the JWKS document holds no signing key for {algorithm}")
        return keys
    verifier = jwt.algorithms.get_default_algorithms()[algorithm]
    # prepare_key refuses a PEM public key as an HMAC secret (the algorithm-confusion attack).
    return {None: verifier.prepare_key(text)}
