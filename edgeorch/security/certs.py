"""Mutual TLS material: a local CA and a certificate per service or node (``edgeorch certs init DIR``).

Every certificate is signed by the one CA, names its holder in the subject and
in the subject alternative names (plus ``localhost`` and 127.0.0.1, so the
loopback stack verifies), and may serve and authenticate as a client: each
process is a server to some peers and a client of others. A service started
with :class:`TlsSettings` set serves HTTPS and refuses any client that does
not present a certificate of the same CA (``CERT_REQUIRED``).
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

CA_NAME = "edgeorch-ca"
VALID_DAYS = 825


class TlsSettings(BaseSettings):
    """``EDGEORCH_TLS_CERT``, ``_KEY``, ``_CA``: this process's certificate, its key, and the CA it trusts."""

    model_config = SettingsConfigDict(env_prefix="EDGEORCH_TLS_", extra="ignore")

    cert: Path | None = Field(default=None, description="PEM certificate; unset: plain HTTP")
    key: Path | None = Field(default=None, description="PEM private key of the certificate")
    ca: Path | None = Field(
        default=None, description="PEM CA certificate that peers' certificates must chain to"
    )

    @property
    def enabled(self) -> bool:
        """Whether TLS is configured (all three files named)."""
        return bool(self.cert and self.key and self.ca)

    def server_kwargs(self) -> dict:
        """uvicorn's TLS arguments: serve HTTPS, require and verify a client certificate."""
        if not self.enabled:
            return {}
        return {"ssl_certfile": str(self.cert), "ssl_keyfile": str(self.key), "ssl_ca_certs": str(self.ca),
                "ssl_cert_reqs": ssl.CERT_REQUIRED}  # fmt: skip

    def client_context(self) -> ssl.SSLContext:
        """An SSL context for calling peers: verify them against the CA, present this certificate."""
        return _client_context(str(self.cert), str(self.key), str(self.ca))

    def env(self) -> dict[str, str]:
        """These settings as the environment variables a child process reads them from."""
        if not self.enabled:
            return {}
        return {
            "EDGEORCH_TLS_CERT": str(self.cert),
            "EDGEORCH_TLS_KEY": str(self.key),
            "EDGEORCH_TLS_CA": str(self.ca),
        }


@lru_cache(maxsize=16)
def _client_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    # One context per certificate for the whole process: building one reads and parses
    # the files (milliseconds), and a context is safe to share between connections.
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.load_cert_chain(cert, key)
    return ctx


def client_tls() -> ssl.SSLContext | None:
    """The context every client of this process calls its peers with (``EDGEORCH_TLS_*``); None: plain HTTP.

    Each client library takes it where it takes its own: ``httpx.Client(verify=client_verify())``,
    ``HopClient`` and ``SyncHopClient`` by default. It is used for ``https://`` URLs only, so
    a plain ``http://`` URL (a peer still without TLS, a test server) keeps working.
    """
    settings = TlsSettings()
    return settings.client_context() if settings.enabled else None


def client_verify() -> ssl.SSLContext | bool:
    """httpx's ``verify`` argument: this process's TLS context, or True (the system's CAs) without one."""
    return client_tls() or True


def url_scheme(tls: bool) -> str:
    """``https`` for a peer served with TLS, else ``http``."""
    return "https" if tls else "http"


def init_certs(directory: Path, names: list[str], hosts: tuple[str, ...] = ()) -> list[Path]:
    """Write ``ca.pem``/``ca.key`` (kept if present) and ``<name>.pem``/``<name>.key`` per name; returns the files.

    ``hosts``: more addresses or DNS names every certificate of this call is valid for
    (a worker in a network namespace of its own is reached at its namespace's address).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def subject(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(path: Path, key) -> None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
        path.chmod(0o600)

    ca_pem, ca_key_path = directory / "ca.pem", directory / "ca.key"
    if ca_pem.exists() and ca_key_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = (
            x509.CertificateBuilder().subject_name(subject(CA_NAME)).issuer_name(subject(CA_NAME))
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(ca_key, hashes.SHA256())
        )  # fmt: skip
        write_key(ca_key_path, ca_key)
        ca_pem.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    written = [ca_pem]
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        alt = [
            x509.DNSName(name),
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            *(_alt_name(h) for h in hosts),
        ]
        cert = (
            x509.CertificateBuilder().subject_name(subject(name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )  # fmt: skip
        write_key(directory / f"{name}.key", key)
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        written += [directory / f"{name}.pem", directory / f"{name}.key"]
    return written


def _alt_name(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def tls_settings_for(directory: Path, name: str) -> TlsSettings:
    """The settings of the holder ``name`` of a directory made by :func:`init_certs`."""
    return TlsSettings(cert=directory / f"{name}.pem", key=directory / f"{name}.key", ca=directory / "ca.pem")
