"""Key material for a provisioned fleet: CA, certificates, CRL, and mosquitto password hashes.

Everything here is pure (bytes in, bytes out) so it is testable without files or a broker; the
layout on disk and the mosquitto configuration are `fleet.py`. Keys are ECDSA P-256 (small and
fast on a Pi, supported by OpenSSL in mosquitto and by Python's ssl module). Password hashes use
mosquitto 2.0's PBKDF2-SHA512 format, `user:$7$iterations$base64(salt)$base64(hash)`, written here
rather than by `mosquitto_passwd -b` so a password never appears on a command line (visible to every
local user in /proc) and the provisioning host does not need mosquitto installed.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import secrets

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 1825
# mosquitto_passwd's default for $7$ hashes. The passwords are 256-bit random tokens, so the
# iteration count does not protect them; a higher one would only cost broker CPU per connection.
PBKDF2_ITERATIONS = 101
_SALT_BYTES = 12  # what mosquitto_passwd uses
_HASH_BYTES = 64  # SHA-512 output


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    return serialization.load_pem_private_key(pem, password=None)


def load_cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _name(common_name: str, organisation: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(federation: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = new_key()
    name = _name(f"fftmoe {federation} CA", f"fftmoe fleet {federation}")
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_leaf(ca_key, ca_cert: x509.Certificate, common_name: str, *, server_hosts: list[str] | None = None,
              days: int = LEAF_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A certificate signed by the CA: a TLS server certificate with `server_hosts` as subject
    alternative names (IP addresses and DNS names), or else a client certificate whose common name
    is the MQTT user name (mosquitto's use_identity_as_username)."""
    key = new_key()
    now = _now()
    organisation = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    builder = (x509.CertificateBuilder().subject_name(_name(common_name, organisation)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if server_hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in server_hosts]), critical=False)
        usage = ExtendedKeyUsageOID.SERVER_AUTH
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH  # a client certificate cannot pose as the broker
    builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_crl(ca_key, ca_cert: x509.Certificate, revoked_serials: list[int]) -> x509.CertificateRevocationList:
    """The CA's revocation list. Its next-update time is the CA's own expiry: OpenSSL refuses every
    client once a CRL is past its next update, and nobody re-signs this one on a schedule."""
    now = _now()
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(now - dt.timedelta(minutes=5)).next_update(ca_cert.not_valid_after_utc))
    for serial in sorted(set(revoked_serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
    return builder.sign(ca_key, hashes.SHA256())


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


# -- passwords ----------------------------------------------------------------------------------
def new_password() -> str:
    """A random 256-bit password, URL-safe (no ':' or whitespace, so it survives any config file)."""
    return secrets.token_urlsafe(32)


def password_line(username: str, password: str, *, salt: bytes | None = None,
                  iterations: int = PBKDF2_ITERATIONS) -> str:
    """One line of a mosquitto 2.0 password file (no newline): PBKDF2-HMAC-SHA512, format $7$."""
    if ":" in username or "\n" in username:
        raise ValueError(f"user name {username!r} cannot be in a mosquitto password file")
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, _HASH_BYTES)
    return f"{username}:$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password_line(line: str, username: str, password: str) -> bool:
    """True when `line` (from a mosquitto password file) accepts `username` / `password`."""
    user, _, hashed = line.strip().partition(":")
    parts = hashed.split("$")
    if user != username or len(parts) != 5 or parts[1] != "7":
        return False
    iterations, salt, expected = int(parts[2]), base64.b64decode(parts[3]), base64.b64decode(parts[4])
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(expected))
    return hmac.compare_digest(digest, expected)
