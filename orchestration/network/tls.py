"""TLS for a network on a reachable address: a private CA and the server certificate.

Off loopback, the API server serves HTTPS and the combiners serve gRPC over TLS with
one server certificate whose subjectAltNames are the advertised host (and 127.0.0.1,
so the operator's own tools and the API server's calls to the combiners verify it
too). fedseg creates a private CA per network folder unless the operator supplies
certificate, key and CA files (``tls_cert``, ``tls_key``, ``tls_ca``). Clinics get
only the CA certificate (in their kit) and verify the server with it.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.io import PRIVATE_FILE, atomic_write_bytes

TLS_DIR = "tls"
CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
SERVER_CERT = "server.pem"
SERVER_KEY = "server-key.pem"
CA_LIFETIME_DAYS = 3650
SERVER_LIFETIME_DAYS = 825  # the longest lifetime browsers and many TLS stacks accept
LOOPBACK_NAMES = ("localhost",)


@dataclass(frozen=True)
class TlsFiles:
    """Where a network's TLS material is.

    Attributes:
        cert: Server certificate (PEM), given to gunicorn and the combiners.
        key: Its private key (PEM, mode 0600).
        ca: The CA certificate clients verify the server with (PEM, public).
    """

    cert: Path
    key: Path
    ca: Path


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedseg"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def create_ca(folder: Path, common_name: str) -> tuple[Path, Path]:
    """Create a CA key (0600) and self-signed CA certificate in ``folder``.

    Returns:
        (certificate path, key path).
    """
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_LIFETIME_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    atomic_write_bytes(folder / CA_KEY, _key_pem(key), PRIVATE_FILE)
    atomic_write_bytes(folder / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return folder / CA_CERT, folder / CA_KEY


def issue_server_cert(folder: Path, hosts: list[str]) -> tuple[Path, Path]:
    """Issue a server certificate for ``hosts`` (IPs or DNS names), signed by our CA.

    The CA is the one in ``folder`` (:func:`create_ca`); the key is written 0600.

    Returns:
        (certificate path, key path).
    """
    ca_key = serialization.load_pem_private_key((folder / CA_KEY).read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((folder / CA_CERT).read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=SERVER_LIFETIME_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in dict.fromkeys(hosts)]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    atomic_write_bytes(folder / SERVER_KEY, _key_pem(key), PRIVATE_FILE)
    atomic_write_bytes(folder / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM),
                       0o644)
    return folder / SERVER_CERT, folder / SERVER_KEY


def certificate_hosts(cert_path: Path) -> list[str]:
    """The subjectAltNames (IPs and DNS names) of a PEM certificate."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ([str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
            + list(san.get_values_for_type(x509.DNSName)))


def prepare_tls(root: Path, host: str, cert: Path | None = None, key: Path | None = None,
                ca: Path | None = None) -> TlsFiles:
    """The TLS files for a network on ``host``: the operator's, or fedseg's own CA.

    fedseg's CA (root/tls/ca.pem, key 0600) is created once and kept, so clinic kits
    stay valid across restarts; the server certificate is issued anew on every call
    (the host may change).

    Raises:
        FedsegError: Operator-supplied files missing, or a certificate without ``host``.
    """
    if cert or key or ca:
        if not (cert and key and ca):
            raise FedsegError("tls_cert, tls_key and tls_ca must be given together")
        for path in (cert, key, ca):
            if not Path(path).is_file():
                raise FedsegError(f"{path}: TLS file not found")
        try:
            names = certificate_hosts(Path(cert))
        except (ValueError, x509.ExtensionNotFound) as exc:
            raise FedsegError(f"{cert}: not a PEM server certificate with subjectAltNames "
                              f"({exc})") from None
        if host not in names:
            raise FedsegError(f"{cert}: certificate is for {', '.join(names)}, not {host}")
        return TlsFiles(Path(cert), Path(key), Path(ca))
    folder = root / TLS_DIR
    if not ((folder / CA_CERT).is_file() and (folder / CA_KEY).is_file()):
        create_ca(folder, f"fedseg network CA ({root.name})")
    server_cert, server_key = issue_server_cert(folder, [host, "127.0.0.1"])
    return TlsFiles(server_cert, server_key, folder / CA_CERT)
