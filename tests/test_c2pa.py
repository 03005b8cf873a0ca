"""Content credentials: signing keys, signing a real MP4 in place, reading it back, tampering."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import stat
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import latentdub
from latentdub.errors import InputError, LatentdubError
from latentdub.files import sha256_file
from latentdub.media.audio_io import AudioClip
from latentdub.media.writer import VideoWriter
from latentdub.provenance import c2pa as c2pa_mod
from latentdub.provenance.c2pa import (
    CredentialsError,
    ProvenanceClaims,
    c2pa_finalizer,
    read_credentials,
)
from latentdub.provenance.keys import (
    SigningKeyError,
    SigningKeys,
    default_signing,
    init_signing,
    load_signing,
)
from latentdub.provenance.store import data_dir

IPTC_AI = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
PARTIAL_NAME = ".dubbed.mp4.partial-abcd1234.mp4"  # what VideoWriter names its temporary file
VIDEO_SHA = hashlib.sha256(b"input video").hexdigest()
AUDIO_SHA = hashlib.sha256(b"input audio").hexdigest()
MODEL = {
    "name": "LatentSync 1.6 (512 px)",
    "version": "1.6",
    "resolution": 512,
    "random_weights": True,
    "source": "/home/someone/private/weights",
    "device": "cpu",
    "dtype": "float32",
}


@pytest.fixture(autouse=True)
def _private_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "latentdub-data"
    monkeypatch.setenv("LATENTDUB_DATA_DIR", str(folder))
    return folder


def _write_mp4(path: Path, frames: int = 25) -> Path:
    rng = np.random.default_rng(0)
    t = np.arange(16000, dtype=np.float32) / 16000
    clip = AudioClip((0.1 * np.sin(2 * np.pi * 440 * t))[:, None].astype(np.float32), 16000)
    with VideoWriter(path, width=64, height=48, time_base=Fraction(1, 25), fps=25, audio=clip, preset="ultrafast") as w:
        for i in range(frames):
            w.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), pts=i)
    return path


@pytest.fixture(scope="module")
def small_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_mp4(tmp_path_factory.mktemp("media") / "small.mp4")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> SigningKeys:
    return init_signing(tmp_path_factory.mktemp("keys") / "signing")


def _claims(**changes: object) -> ProvenanceClaims:
    values: dict[str, object] = {
        "model": MODEL,
        "video_sha256": VIDEO_SHA,
        "audio_sha256": AUDIO_SHA,
        "consent_id": "consent-0123",
        "watermark": True,
        "watermark_id": "wm-77",
        "options": {"steps": 20, "guidance": 1.5},
    }
    values.update(changes)
    return ProvenanceClaims(**values)  # type: ignore[arg-type]


def _partial_copy(src: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / PARTIAL_NAME
    shutil.copyfile(src, dst)
    return dst


def _mdat_payload(data: bytes) -> tuple[int, int]:
    """(start, end) of the top-level mdat box's payload, found by walking the MP4 boxes."""
    pos = 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        header = 8
        if size == 1:
            size, header = int.from_bytes(data[pos + 8 : pos + 16], "big"), 16
        elif size == 0:
            size = len(data) - pos
        if kind == b"mdat":
            return pos + header, pos + size
        pos += size
    raise AssertionError("no mdat box")


def _frame_count(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


# -- keys ---------------------------------------------------------------------------------------
def test_init_signing_makes_a_ca_and_a_c2pa_leaf(tmp_path: Path) -> None:
    folder = tmp_path / "k"
    made = init_signing(folder)
    assert made.chain_pem_path == folder / "chain.pem" and made.key_path == folder / "signing.key"
    assert stat.S_IMODE(os.stat(folder / "signing.key").st_mode) == 0o600

    leaf, ca = x509.load_pem_x509_certificates((folder / "chain.pem").read_bytes())
    assert x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes()) == ca
    assert leaf.issuer == ca.subject and leaf.issuer != leaf.subject
    ca.public_key().verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(leaf.signature_hash_algorithm))
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp256r1"
    ext = leaf.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ext.get_extension_for_class(x509.KeyUsage).value.digital_signature is True
    assert ExtendedKeyUsageOID.EMAIL_PROTECTION in ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki == ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    ext.get_extension_for_class(x509.SubjectKeyIdentifier)  # present (raises if not)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True

    key_pem = (folder / "signing.key").read_bytes()
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    key = serialization.load_pem_private_key(key_pem, password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(serialization.Encoding.DER, spki) == leaf.public_key().public_bytes(
        serialization.Encoding.DER, spki
    )


def test_init_signing_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    first = init_signing(tmp_path)
    before = first.chain_pem_path.read_bytes()
    with pytest.raises(InputError, match=r"already exist.*--force"):
        init_signing(tmp_path)
    assert first.chain_pem_path.read_bytes() == before
    init_signing(tmp_path, force=True)
    assert first.chain_pem_path.read_bytes() != before


def test_default_signing_is_made_once_in_the_data_dir(_private_data_dir: Path) -> None:
    keys, created = default_signing()
    assert created is True
    assert keys.chain_pem_path.parent == _private_data_dir / "signing"
    assert stat.S_IMODE(os.stat(_private_data_dir).st_mode) == 0o700
    again, created_again = default_signing()
    assert created_again is False and again == keys
    assert load_signing(None, None) == keys


def test_data_dir_default_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LATENTDUB_DATA_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_dir() == tmp_path / "xdg" / "latentdub"
    assert (tmp_path / "xdg" / "latentdub").is_dir()


def _cert(subject_key, issuer_key, subject: str, issuer: str, *, ca: bool, eku: bool = True, usage: bool = True) -> x509.Certificate:  # type: ignore[no-untyped-def]
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    if usage:
        builder = builder.add_extension(
            x509.KeyUsage(not ca, False, False, False, False, ca, ca, False, False), critical=True
        )
    if eku and not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
    algorithm = None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(issuer_key, algorithm)


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _key_pem(key, fmt=serialization.PrivateFormat.PKCS8, password: bytes | None = None) -> bytes:  # type: ignore[no-untyped-def]
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, fmt, enc)


def test_mismatched_or_unusable_user_keys_are_refused_clearly(tmp_path: Path, keys: SigningKeys) -> None:
    other = init_signing(tmp_path / "other")
    with pytest.raises(SigningKeyError, match="does not belong to the certificate"):
        load_signing(keys.chain_pem_path, other.key_path)
    with pytest.raises(SigningKeyError, match="does not belong"):
        c2pa_finalizer(SigningKeys(keys.chain_pem_path, other.key_path), _claims())
    with pytest.raises(SigningKeyError, match="without its private key"):
        load_signing(keys.chain_pem_path, None)
    with pytest.raises(SigningKeyError, match="does not exist"):
        load_signing(tmp_path / "nope.pem", keys.key_path)

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert(ca_key, ca_key, "CA", "CA", ca=True)
    leaf = _cert(leaf_key, ca_key, "signer", "CA", ca=False)
    (tmp_path / "leaf.key").write_bytes(_key_pem(leaf_key))

    (tmp_path / "reversed.pem").write_bytes(_pem(ca, leaf))
    with pytest.raises(SigningKeyError, match="not the first"):
        load_signing(tmp_path / "reversed.pem", tmp_path / "leaf.key")

    self_signed = _cert(leaf_key, leaf_key, "me", "me", ca=False)
    (tmp_path / "self.pem").write_bytes(_pem(self_signed))
    with pytest.raises(SigningKeyError, match="self-signed"):
        load_signing(tmp_path / "self.pem", tmp_path / "leaf.key")

    no_eku = _cert(leaf_key, ca_key, "signer", "CA", ca=False, eku=False)
    (tmp_path / "noeku.pem").write_bytes(_pem(no_eku, ca))
    with pytest.raises(SigningKeyError, match="extendedKeyUsage"):
        load_signing(tmp_path / "noeku.pem", tmp_path / "leaf.key")

    no_usage = _cert(leaf_key, ca_key, "signer", "CA", ca=False, usage=False)
    (tmp_path / "nousage.pem").write_bytes(_pem(no_usage, ca))
    with pytest.raises(SigningKeyError, match="keyUsage"):
        load_signing(tmp_path / "nousage.pem", tmp_path / "leaf.key")

    (tmp_path / "chain.pem").write_bytes(_pem(leaf, ca))
    (tmp_path / "locked.key").write_bytes(_key_pem(leaf_key, password=b"secret"))
    with pytest.raises(SigningKeyError, match="encrypted"):
        load_signing(tmp_path / "chain.pem", tmp_path / "locked.key")
    (tmp_path / "garbage.pem").write_text("hello")
    with pytest.raises(SigningKeyError, match="no PEM certificate"):
        load_signing(tmp_path / "garbage.pem", tmp_path / "leaf.key")
    with pytest.raises(SigningKeyError, match="not a readable PEM private key"):
        load_signing(tmp_path / "chain.pem", tmp_path / "garbage.pem")


def test_user_keys_in_other_forms_sign(tmp_path: Path, small_mp4: Path) -> None:
    """A SEC1 ("EC PRIVATE KEY") P-256 key and an Ed25519 key both sign valid credentials."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(ca_key, ca_key, "User CA", "User CA", ca=True)
    for name, leaf_key, fmt in [
        ("sec1", ec.generate_private_key(ec.SECP256R1()), serialization.PrivateFormat.TraditionalOpenSSL),
        ("ed25519", ed25519.Ed25519PrivateKey.generate(), serialization.PrivateFormat.PKCS8),
    ]:
        (tmp_path / f"{name}.pem").write_bytes(_pem(_cert(leaf_key, ca_key, f"{name} signer", "User CA", ca=False), ca))
        (tmp_path / f"{name}.key").write_bytes(_key_pem(leaf_key, fmt))
        user = load_signing(tmp_path / f"{name}.pem", tmp_path / f"{name}.key")
        target = _partial_copy(small_mp4, tmp_path / name)
        out = c2pa_finalizer(user, _claims())(target)
        assert out["c2pa"]["signer"] == f"{name} signer"
        report = read_credentials(target)
        assert report.valid and report.claims["signer"]["common_name"] == f"{name} signer"


# -- signing ------------------------------------------------------------------------------------
def test_sign_in_place_and_read_back_every_claim(tmp_path: Path, small_mp4: Path, keys: SigningKeys) -> None:
    target = _partial_copy(small_mp4, tmp_path / "out")
    unsigned = target.read_bytes()
    result = c2pa_finalizer(keys, _claims())(target)

    assert sorted(p.name for p in target.parent.iterdir()) == [PARTIAL_NAME]  # no sibling left
    assert target.read_bytes() != unsigned
    ca = x509.load_pem_x509_certificate(keys.chain_pem_path.with_name("ca.pem").read_bytes())
    ca_cn = ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    info = result["c2pa"]
    assert info["signed"] is True and info["issuer"] == ca_cn and info["trusted"] is False
    assert info["manifest_label"].startswith("urn:c2pa:")

    report = read_credentials(target)
    assert report.present and report.valid and report.trusted is False
    assert report.validation_state == "Valid"
    assert any(f.startswith("signingCredential.untrusted") for f in report.failures)
    assert report.manifest_label == info["manifest_label"]
    claims = report.claims
    assert claims["title"] == "dubbed.mp4"  # the final name, not the temporary one
    assert claims["claim_generator"][0]["name"] == "latentdub"
    assert claims["claim_generator"][0]["version"] == latentdub.__version__
    edited = [a for a in claims["actions"] if a["action"] == "c2pa.edited"]
    assert len(edited) == 1 and edited[0]["digitalSourceType"] == IPTC_AI
    assert edited[0]["softwareAgent"]["name"] == "latentdub"
    assert edited[0]["softwareAgent"]["model"] == "LatentSync 1.6 (512 px)"
    assert claims["actions"][0]["action"] == "c2pa.opened"
    assert claims["ai_edited"] is True
    assert claims["ingredients"] == [
        {"title": "input video", "relationship": "parentOf", "instance_id": f"sha256:{VIDEO_SHA}"}
    ]
    assert claims["latentdub"] == {
        "model": {"name": "LatentSync 1.6 (512 px)", "version": "1.6", "resolution": 512, "random_weights": True},
        "video_sha256": VIDEO_SHA,
        "audio_sha256": AUDIO_SHA,
        "consent_id": "consent-0123",
        "watermark": True,
        "watermark_id": "wm-77",
        "options": {"steps": 20, "guidance": 1.5},
    }
    assert b"/home/someone/private" not in target.read_bytes()  # local paths are not published
    assert _frame_count(target) == 25  # still a playable video

    assert read_credentials(target, trust_anchors=keys.chain_pem_path.with_name("ca.pem")).trusted is True
    stranger = init_signing(tmp_path / "stranger")
    assert read_credentials(target, trust_anchors=stranger.chain_pem_path.with_name("ca.pem")).trusted is False


def test_watermark_off_and_no_consent_are_stated(tmp_path: Path, small_mp4: Path, keys: SigningKeys) -> None:
    target = _partial_copy(small_mp4, tmp_path)
    c2pa_finalizer(keys, _claims(watermark=False, watermark_id=None, consent_id=None))(target)
    said = read_credentials(target).claims["latentdub"]
    assert said["watermark"] is False and said["watermark_id"] is None and said["consent_id"] is None
    with pytest.raises(InputError, match="watermark_id"):
        _claims(watermark=False, watermark_id="wm-1")
    with pytest.raises(InputError, match="video_sha256"):
        _claims(video_sha256="abc")


def test_tampering_with_one_mdat_byte_is_invalid(tmp_path: Path, small_mp4: Path, keys: SigningKeys) -> None:
    target = _partial_copy(small_mp4, tmp_path)
    c2pa_finalizer(keys, _claims())(target)
    data = bytearray(target.read_bytes())
    start, end = _mdat_payload(bytes(data))
    data[(start + end) // 2] ^= 0x01
    tampered = tmp_path / "tampered.mp4"
    tampered.write_bytes(bytes(data))

    report = read_credentials(tampered)
    assert report.present is True and report.valid is False and report.trusted is False
    assert any(f.startswith("assertion.bmffHash.mismatch") for f in report.failures)


def test_unsigned_and_unsupported_files(tmp_path: Path, small_mp4: Path) -> None:
    report = read_credentials(small_mp4)
    assert (report.present, report.valid, report.claims) == (False, False, {})
    with pytest.raises(InputError, match="does not exist"):
        read_credentials(tmp_path / "missing.mp4")


def test_source_video_credentials_are_carried_over(tmp_path: Path, small_mp4: Path, keys: SigningKeys) -> None:
    source = _partial_copy(small_mp4, tmp_path / "src")
    c2pa_finalizer(keys, _claims())(source)
    source_label = read_credentials(source).manifest_label
    target = _partial_copy(small_mp4, tmp_path / "dst")
    c2pa_finalizer(keys, _claims(source_video=source))(target)
    report = read_credentials(target)
    assert report.valid
    (parent,) = report.claims["ingredients"]
    assert parent["relationship"] == "parentOf" and parent["active_manifest"] == source_label


def test_signing_failure_leaves_no_extra_file(tmp_path: Path, keys: SigningKeys, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    broken = folder / PARTIAL_NAME
    broken.write_bytes(b"this is not an mp4 at all" * 100)
    with pytest.raises(CredentialsError, match="signing"):
        c2pa_finalizer(keys, _claims())(broken)
    assert sorted(p.name for p in folder.iterdir()) == [PARTIAL_NAME]
    assert broken.read_bytes() == b"this is not an mp4 at all" * 100

    # A failure after the signed copy was written (here: it does not verify) also cleans up.
    good = _write_mp4(tmp_path / "good.mp4", frames=5)
    target = _partial_copy(good, tmp_path / "out2")
    before = target.read_bytes()

    def not_valid(path: Path, **_: object) -> c2pa_mod.C2paReport:
        assert Path(path).exists() and Path(path) != target  # it checks the new copy, not the original
        return c2pa_mod.C2paReport(str(path), present=True, valid=False, trusted=False, validation_state="Invalid")

    monkeypatch.setattr(c2pa_mod, "read_credentials", not_valid)
    with pytest.raises(CredentialsError, match="does not verify"):
        c2pa_finalizer(keys, _claims())(target)
    assert sorted(p.name for p in target.parent.iterdir()) == [PARTIAL_NAME]
    assert target.read_bytes() == before


def test_matroska_is_refused_before_any_file_is_made(tmp_path: Path, keys: SigningKeys) -> None:
    mkv = tmp_path / ".x.mkv.partial-abcd1234.mkv"
    mkv.write_bytes(b"\x1a\x45\xdf\xa3")
    with pytest.raises(CredentialsError, match=r"cannot be embedded in a \.mkv file"):
        c2pa_finalizer(keys, _claims())(mkv)
    assert [p.name for p in tmp_path.iterdir()] == [mkv.name]
    assert issubclass(CredentialsError, LatentdubError)


def test_writer_finalizer_publishes_a_signed_file(tmp_path: Path, keys: SigningKeys) -> None:
    """Through VideoWriter.close(before_rename=…), as the render engine runs finalizers."""
    out = tmp_path / "final.mp4"
    sign = c2pa_finalizer(keys, _claims())
    results: list[dict[str, object]] = []
    with VideoWriter(out, width=32, height=32, time_base=Fraction(1, 10), fps=10, preset="ultrafast") as w:
        for i in range(4):
            w.write(np.full((32, 32, 3), 60 * i, np.uint8), pts=i)
        w.close(before_rename=lambda tmp: results.append(sign(tmp)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.mp4"]
    report = read_credentials(out)
    assert report.valid and report.manifest_label == results[0]["c2pa"]["manifest_label"]  # type: ignore[index]
    assert report.claims["title"] == "final.mp4"


def test_real_media_signs_fast_and_still_decodes(tmp_path: Path, media_dir: Path, keys: SigningKeys) -> None:
    source = media_dir / "vexpress_hdtf_radio10_29.97fps_2s.mp4"
    target = tmp_path / "real.mp4"
    shutil.copyfile(source, target)
    frames = _frame_count(source)
    info = c2pa_finalizer(keys, _claims(video_sha256=sha256_file(source)))(target)["c2pa"]
    assert info["sign_s"] < 5.0  # about 20 ms on 2 CPU cores; generous for a loaded machine
    assert read_credentials(target).valid
    assert _frame_count(target) == frames
