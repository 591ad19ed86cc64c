"""A development certificate authority: a CA, a server certificate and client certificates.

For trying TLS and mutual TLS on one machine (`txengine certs`); production certificates come
from the organisation's own CA. Keys are ECDSA P-256, written with mode 0600.
"""
from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import pathlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY_DAYS = 365
# Where a client certificate's identity lives: a URI SAN (SPIFFE style).
CLIENT_URI_PREFIX = "spiffe://txengine.dev/"


@dataclasses.dataclass(frozen=True)
class Issued:
    """A certificate and its key, both PEM."""

    cert_pem: bytes
    key_pem: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALIDITY_DAYS)))


def make_ca(name: str = "txengine development CA") -> Issued:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (_builder(name, subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _issue(ca: Issued, subject: str, san: list[x509.GeneralName], usage) -> Issued:
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    key = _key()
    cert = (_builder(subject, ca_cert.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue_server(ca: Issued, hosts: list[str]) -> Issued:
    """A server certificate for DNS names and IP addresses."""
    san: list[x509.GeneralName] = []
    for host in hosts:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            san.append(x509.DNSName(host))
    return _issue(ca, hosts[0], san, ExtendedKeyUsageOID.SERVER_AUTH)


def issue_client(ca: Issued, name: str) -> Issued:
    """A client certificate whose identity is the URI SAN ``spiffe://txengine.dev/<name>``
    (and the common name `name`)."""
    return _issue(ca, name, [x509.UniformResourceIdentifier(CLIENT_URI_PREFIX + name)],
                  ExtendedKeyUsageOID.CLIENT_AUTH)


def write(directory: pathlib.Path, name: str, issued: Issued) -> tuple[pathlib.Path, pathlib.Path]:
    """`name.pem` and `name-key.pem` under `directory`; the key readable by its owner only."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(issued.cert_pem)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(issued.key_pem)
    return cert_path, key_path


def make_development_set(directory: pathlib.Path, hosts: list[str],
                         clients: list[str]) -> dict[str, pathlib.Path]:
    """A CA, a server certificate and one client certificate per name, written to `directory`.

    Returns the paths by role: ``ca``, ``server``, ``server-key`` and ``<client>``,
    ``<client>-key`` for each client."""
    ca = make_ca()
    paths: dict[str, pathlib.Path] = {}
    paths["ca"], _ = write(directory, "ca", ca)
    (directory / "ca-key.pem").chmod(0o600)
    paths["server"], paths["server-key"] = write(directory, "server", issue_server(ca, hosts))
    for client in clients:
        paths[client], paths[f"{client}-key"] = write(directory, client, issue_client(ca, client))
    return paths
