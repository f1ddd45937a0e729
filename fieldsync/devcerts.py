"""A development CA and certificates for `make run-tls` (never for production).

`make_dev_pki(directory)` writes, with the `cryptography` package: `ca.pem` and
`ca.key` (a CA valid for a year), `server.pem`/`server.key` for 127.0.0.1 and
localhost (both services serve with it), and `client.pem`/`client.key`, the
client certificate the sync service presents to the audit service (mutual
TLS). Existing files are kept while they stay valid for another 14 days.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["make_dev_pki"]

_DAY = datetime.timedelta(days=1)


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.with_suffix(".key").chmod(0o600)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _still_good(path: Path) -> bool:
    if not path.exists() or not path.with_suffix(".key").exists():
        return False
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC) > 14 * _DAY


def make_dev_pki(directory: Path) -> dict[str, Path]:
    """The development CA, server and client certificates in `directory`; their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_pem = directory / "ca.pem"
    now = datetime.datetime.now(datetime.UTC)
    names = ("ca", "server", "client")
    if not all(_still_good(directory / f"{n}.pem") for n in names):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FieldSync development CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 365 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        _write(ca_pem, ca_key, ca)
        for name, usage in (
            ("server", ExtendedKeyUsageOID.SERVER_AUTH),
            ("client", ExtendedKeyUsageOID.CLIENT_AUTH),
        ):
            key = ec.generate_private_key(ec.SECP256R1())
            common = "localhost" if name == "server" else "fieldsync-sync"
            cert = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)]))
                .issuer_name(ca_name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - _DAY)
                .not_valid_after(now + 90 * _DAY)
                .add_extension(
                    x509.SubjectAlternativeName(
                        [
                            x509.DNSName("localhost"),
                            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        ]
                    ),
                    critical=False,
                )
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256())
            )
            _write(directory / f"{name}.pem", key, cert)
    out = {"ca": ca_pem}
    for name in ("server", "client"):
        out[f"{name}_cert"] = directory / f"{name}.pem"
        out[f"{name}_key"] = directory / f"{name}.key"
    return out
