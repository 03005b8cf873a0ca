"""Signing keys for content credentials (C2PA): a local CA and a signer certificate, or the user's.

C2PA refuses a lone self-signed certificate, so :func:`init_signing` makes what c2pa accepts: a
local CA (EC P-256) that issues one leaf certificate (``CA:false``, ``digitalSignature``,
``emailProtection``, authority/subject key identifiers). Files in the keys folder:

* ``chain.pem``   — leaf certificate followed by the CA certificate (what the signer sends);
* ``signing.key`` — the leaf's private key, unencrypted PKCS#8 PEM, mode 0600;
* ``ca.pem``      — the CA certificate alone (give it to a verifier as a trust anchor).

The CA's private key is not kept: it signs the leaf once and is discarded, so a stolen copy of
the folder cannot mint more signers. Readers will report such files as signed by an
*untrusted* signer (the CA is in no public trust list) — authentic, but self-vouched.

:func:`load_signing` takes a user's own certificate chain and key and checks, with clear
messages, everything c2pa would otherwise reject with an opaque error.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from latentdub.errors import InputError
from latentdub.files import atomic_write
from latentdub.provenance.store import data_dir, ensure_private_dir

try:  # POSIX: serialises two processes creating the default keys at once
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

CHAIN_FILE = "chain.pem"
KEY_FILE = "signing.key"
CA_FILE = "ca.pem"
SIGNING_SUBDIR = "signing"
CA_DAYS = 3650
LEAF_DAYS = 730
# Extended key usages C2PA accepts for a claim signer (C2PA 2.x, "Certificate Profile").
_C2PA_EKUS = {
    ExtendedKeyUsageOID.EMAIL_PROTECTION,
    x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36"),  # id-kp-documentSigning
    x509.ObjectIdentifier("1.3.6.1.4.1.62558.2.1"),  # c2pa-kp-claimSigning
}


class SigningKeyError(InputError):
    """A certificate or key that cannot be used to sign content credentials."""


class SigningKeyExpired(SigningKeyError):
    """The signing certificate is past its end date (default keys are then simply remade)."""


@dataclass(frozen=True)
class SigningKeys:
    """Where a signer's certificate chain (leaf first, PEM) and private key (PEM) live."""

    chain_pem_path: Path
    key_path: Path

    def chain_pem(self) -> bytes:
        return _read(self.chain_pem_path, "certificate chain")

    def key_pkcs8_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM, the only form c2pa takes (converted if need be)."""
        key = _load_key(_read(self.key_path, "private key"), self.key_path)
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def certificates(self) -> list[x509.Certificate]:
        return _load_certs(self.chain_pem(), self.chain_pem_path)

    def algorithm(self) -> str:
        """The c2pa signing algorithm for this key: es256/es384/es512, ps256 or ed25519."""
        key = _load_key(_read(self.key_path, "private key"), self.key_path)
        return _algorithm(key, self.key_path)

    def describe(self) -> dict[str, Any]:
        """Who signs (subject and issuer common names), until when, and the leaf's fingerprint."""
        leaf = self.certificates()[0]
        return {
            "subject": _common_name(leaf.subject),
            "issuer": _common_name(leaf.issuer),
            "not_after": leaf.not_valid_after_utc.isoformat(),
            "sha256_fingerprint": leaf.fingerprint(hashes.SHA256()).hex(),
            "chain": str(self.chain_pem_path),
            "key": str(self.key_path),
        }


def default_signing_dir() -> Path:
    return data_dir() / SIGNING_SUBDIR


def init_signing(dir: Path | None = None, *, force: bool = False, name: str | None = None) -> SigningKeys:
    """Make a local CA and a signer certificate in ``dir`` (default: the data folder's ``signing/``).

    Refuses to replace existing files unless ``force``. ``name`` goes into the certificates'
    common names (default: a random installation id, so no user or host name is published in
    every signed file).
    """
    folder = Path(dir) if dir is not None else default_signing_dir()
    ensure_private_dir(folder, what="the signing keys folder")
    with _folder_lock(folder):
        return _init_locked(folder, force=force, name=name)


def _init_locked(folder: Path, *, force: bool, name: str | None) -> SigningKeys:
    existing = [n for n in (CHAIN_FILE, KEY_FILE, CA_FILE) if (folder / n).exists()]
    if existing and not force:
        raise SigningKeyError(
            f"signing keys already exist in {folder} ({', '.join(existing)}); "
            "replacing them needs force (`latentdub keys init-signing --force`)."
        )
    label = name.strip() if name and name.strip() else f"local {secrets.token_hex(4)}"
    now = dt.datetime.now(dt.UTC)
    # Backdated a little: a verifier whose clock lags must not see a "not yet valid" signer.
    start = now - dt.timedelta(hours=1)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, f"latentdub CA ({label})"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "latentdub (self-issued)"),
    ])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, f"latentdub signer ({label})"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "latentdub (self-issued)"),
        ]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    del ca_key  # never written anywhere (see the module docstring)

    pem = serialization.Encoding.PEM
    ca_pem = ca_cert.public_bytes(pem)
    key_pem = leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    # Key first: a crash between files must never leave a chain that belongs to another key
    # looking complete (load_signing would catch the mismatch, but clearly is better).
    atomic_write(folder / KEY_FILE, key_pem, mode=0o600)  # mode set before the secret is written
    atomic_write(folder / CHAIN_FILE, leaf_cert.public_bytes(pem) + ca_pem, mode=0o644)
    atomic_write(folder / CA_FILE, ca_pem, mode=0o644)
    return SigningKeys(folder / CHAIN_FILE, folder / KEY_FILE)


def default_signing() -> tuple[SigningKeys, bool]:
    """The default keys (data folder ``signing/``), made on first use; ``created`` says if just now.

    Expired default keys are replaced too (they are ours to manage); ``created`` is then True.
    """
    folder = default_signing_dir()
    with _folder_lock(folder):
        keys = SigningKeys(folder / CHAIN_FILE, folder / KEY_FILE)
        if keys.chain_pem_path.exists() and keys.key_path.exists():
            try:
                check_signing(keys)
                return keys, False
            except SigningKeyExpired:
                pass  # ours to manage: make new ones below
            except SigningKeyError as err:
                raise SigningKeyError(
                    f"the default signing keys in {folder} cannot be used: {err} "
                    "Make new ones with `latentdub keys init-signing --force`."
                ) from None
        return _init_locked(folder, force=True, name=None), True


def load_signing(cert: Path | None, key: Path | None) -> SigningKeys:
    """The user's certificate chain (PEM, signer first) and private key (PEM), checked to fit.

    Both ``None``: the default keys (made on first use). One without the other is an error.
    """
    if cert is None and key is None:
        return default_signing()[0]
    if cert is None or key is None:
        missing, given = ("certificate", "key") if cert is None else ("private key", "certificate")
        raise SigningKeyError(f"a signing {given} was given without its {missing}; give both (or neither, for the default keys).")
    keys = SigningKeys(Path(cert), Path(key))
    check_signing(keys)
    return keys


def check_signing(keys: SigningKeys) -> None:
    """Raise :class:`SigningKeyError` naming the problem if c2pa could not sign with ``keys``."""
    certs = keys.certificates()
    key = _load_key(_read(keys.key_path, "private key"), keys.key_path)
    _algorithm(key, keys.key_path)
    public = _spki(key.public_key())
    leaf = certs[0]
    if _spki(leaf.public_key()) != public:
        if any(_spki(c.public_key()) == public for c in certs[1:]):
            raise SigningKeyError(
                f"the certificate that matches the key {keys.key_path} is not the first in "
                f"{keys.chain_pem_path}; put the signer's certificate first, then its issuers."
            )
        raise SigningKeyError(
            f"the private key {keys.key_path} does not belong to the certificate in "
            f"{keys.chain_pem_path} (their public keys differ)."
        )
    now = dt.datetime.now(dt.UTC)
    if leaf.not_valid_after_utc < now:
        raise SigningKeyExpired(
            f"the signing certificate in {keys.chain_pem_path} expired on {leaf.not_valid_after_utc:%Y-%m-%d}."
        )
    if leaf.not_valid_before_utc > now:
        raise SigningKeyError(
            f"the signing certificate in {keys.chain_pem_path} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC."
        )
    if leaf.issuer == leaf.subject:
        raise SigningKeyError(
            f"the certificate in {keys.chain_pem_path} is self-signed, which C2PA refuses; use one issued "
            "by a CA (`latentdub keys init-signing` makes a local CA and signer)."
        )
    _check_leaf_extensions(leaf, keys.chain_pem_path)


def _check_leaf_extensions(leaf: x509.Certificate, where: Path) -> None:
    exts = leaf.extensions
    with contextlib.suppress(x509.ExtensionNotFound):
        if exts.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise SigningKeyError(f"the first certificate in {where} is a CA certificate; C2PA needs the signer's own (CA:false) first.")
    try:
        usage = exts.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise SigningKeyError(f"the signing certificate in {where} has no keyUsage; C2PA needs digitalSignature.") from None
    if not usage.digital_signature:
        raise SigningKeyError(f"the signing certificate in {where} does not allow digitalSignature (keyUsage).")
    try:
        ekus = set(exts.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        raise SigningKeyError(
            f"the signing certificate in {where} has no extendedKeyUsage; C2PA needs emailProtection or documentSigning."
        ) from None
    if not ekus & _C2PA_EKUS:
        raise SigningKeyError(
            f"the signing certificate in {where} is not for signing documents (extendedKeyUsage lacks "
            "emailProtection, documentSigning and C2PA claimSigning)."
        )


# -- helpers ----------------------------------------------------------------------------------
def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _read(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise SigningKeyError(f"the {what} file {path} does not exist.") from None
    except IsADirectoryError:
        raise SigningKeyError(f"the {what} file {path} is a folder, not a file.") from None
    except OSError as err:
        raise SigningKeyError(f"cannot read the {what} file {path}: {err.strerror or err}") from None
    if not data.strip():
        raise SigningKeyError(f"the {what} file {path} is empty.")
    return data


def _load_certs(data: bytes, path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise SigningKeyError(f"{path} holds no PEM certificate (expected -----BEGIN CERTIFICATE----- blocks).")
    return certs


def _load_key(data: bytes, path: Path) -> Any:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography says a password is needed
        raise SigningKeyError(f"the private key {path} is encrypted; give an unencrypted key (PEM).") from None
    except (ValueError, UnsupportedAlgorithm) as err:
        hint = " (it looks like a certificate)" if b"CERTIFICATE" in data else ""
        raise SigningKeyError(f"{path} is not a readable PEM private key{hint}: {err}") from None


def _algorithm(key: Any, path: Path) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        by_curve = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}
        if key.curve.name not in by_curve:
            raise SigningKeyError(f"the EC key {path} uses the curve {key.curve.name}; C2PA signs with P-256, P-384 or P-521.")
        return by_curve[key.curve.name]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise SigningKeyError(f"the RSA key {path} has {key.key_size} bits; C2PA needs at least 2048.")
        return "ps256"
    raise SigningKeyError(f"the key {path} is of a kind C2PA cannot sign with ({type(key).__name__}); use EC P-256, Ed25519 or RSA.")


def _spki(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _common_name(name: x509.Name) -> str:
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else name.rfc4514_string()


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Any:
    ensure_private_dir(folder, what="the signing keys folder")
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
