"""Certificates minted in the test with `cryptography`: a CA, a server certificate for
127.0.0.1/localhost and client certificates whose subject CN is a node id. Imported as
`certs` (tests/ is on sys.path)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _builder(subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
             ) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)))


class Authority:
    """A CA that signs server and client certificates into `folder`."""

    def __init__(self, folder: Path, name: str = "fedkube-test-ca") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (_builder(name, self.name, self.key.public_key())
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))
        self.cert = folder / f"{name}.crt"
        self.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def _issue(self, common_name: str, builder_extension: x509.ExtensionType,
               usage: x509.ObjectIdentifier, *, san: x509.SubjectAlternativeName | None = None
               ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (_builder(common_name, self.name, key.public_key())
                   .add_extension(builder_extension, critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        stem = self.folder / common_name
        path = stem.with_suffix(".crt")
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return Issued(cert=path, key=_write_key(key, stem.with_suffix(".key")))

    def server(self) -> Issued:
        """For `localhost` and 127.0.0.1."""
        return self._issue("localhost", x509.BasicConstraints(ca=False, path_length=None),
                           ExtendedKeyUsageOID.SERVER_AUTH, san=x509.SubjectAlternativeName([
                               x509.DNSName("localhost"),
                               x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))

    def client(self, node_id: str) -> Issued:
        """Subject CN = `node_id`."""
        return self._issue(node_id, x509.BasicConstraints(ca=False, path_length=None),
                           ExtendedKeyUsageOID.CLIENT_AUTH)
