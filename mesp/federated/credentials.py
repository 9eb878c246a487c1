"""Throw-away credentials for one local federation, made with `cryptography` (a dependency of Flower):

- a certificate authority (CA) that exists only for this run;
- the TLS certificate of the SuperLink (and of each SuperNode's local Runtime API), signed by that CA, for
  127.0.0.1 and localhost: Flower's `--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile` and the clients'
  `--root-certificates`;
- one EC key pair (P-384, OpenSSH encoding) per SuperNode: Flower's SuperNode authentication, where the
  SuperLink admits only nodes whose public keys were registered (`flwr supernode register`).

    tls = make_tls(directory)          # TlsFiles(ca, cert, key)
    keys = make_node_key(directory, "alice")   # NodeKey(private, public)

Nothing here is kept: the launcher writes these into its private Flower home and removes it when the run
ends, so every run has fresh ones.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_FOR = datetime.timedelta(days=30)  # a run that is resumed later makes new ones anyway
CURVE = ec.SECP384R1  # P-384: the curve Flower's SuperNode keys are documented with


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the CA certificate: what clients trust
    cert: Path  # the server certificate, signed by the CA
    key: Path  # the server's private key


@dataclass(frozen=True)
class NodeKey:
    private: Path  # OpenSSH private key: flower-supernode --auth-supernode-private-key
    public: Path  # OpenSSH public key: flwr supernode register


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mesp local federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_tls(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TlsFiles:
    """A fresh CA and a server certificate it signs for `hosts` (IP addresses or DNS names), as PEM files in
    `directory` (keys readable by the owner only)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + VALID_FOR  # 5 min: clocks of a loopback run agree
    ca_key = ec.generate_private_key(CURVE())
    ca_name = _name("mesp throw-away CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False),
                         critical=True)
          .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(CURVE())
    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    server = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_name)
              .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(start).not_valid_after(end)
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA384()))
    files = TlsFiles(ca=directory / "ca.crt", cert=directory / "server.pem", key=directory / "server.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_private(files.key, server_key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return files


def make_node_key(directory: Path, name: str) -> NodeKey:
    """A SuperNode's authentication key pair: `name` (private, 0600) and `name.pub`, OpenSSH encoded."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(CURVE())
    files = NodeKey(private=directory / name, public=directory / f"{name}.pub")
    _write_private(files.private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                    serialization.NoEncryption()))
    files.public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                           serialization.PublicFormat.OpenSSH))
    return files
