"""Consent records: parsing from JSON text, files and mappings; errors that name the fields."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest

from latentdub.errors import InputError
from latentdub.provenance.consent import ConsentError, ConsentRecord, parse_consent

GOOD = {
    "subject": "Jane Doe",
    "granted_by": "Jane Doe",
    "method": "signed release form",
    "evidence": "contracts/2026-114.pdf",
    "granted_at": "2026-01-10T09:30:00Z",
    "scope": "Spanish dub of the product video",
    "expires_at": "2999-01-01T00:00:00Z",
}
NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


@pytest.fixture(autouse=True)
def _private_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATENTDUB_DATA_DIR", str(tmp_path / "latentdub-data"))


def test_good_record_from_a_mapping_keeps_extra_fields() -> None:
    record = parse_consent({**GOOD, "witness": "Bob", "notes": {"room": 4}}, now=NOW)
    assert isinstance(record, ConsentRecord)
    assert (record.subject, record.granted_by, record.method, record.evidence) == (
        "Jane Doe", "Jane Doe", "signed release form", "contracts/2026-114.pdf",
    )  # fmt: skip
    assert record.granted_at == dt.datetime(2026, 1, 10, 9, 30, tzinfo=dt.UTC)
    assert record.expires_at == dt.datetime(2999, 1, 1, tzinfo=dt.UTC)
    out = record.to_dict()
    assert out["witness"] == "Bob" and out["notes"] == {"room": 4}
    assert re.fullmatch(r"consent-[0-9a-f]{32}", out["id"])


def test_id_is_kept_when_given_and_stable_when_derived() -> None:
    assert parse_consent({**GOOD, "id": "release-2026-114"}, now=NOW).id == "release-2026-114"
    a = parse_consent(GOOD, now=NOW)
    # The same record, keys in another order and the same instant in another zone: same id.
    shuffled = dict(reversed(list(GOOD.items())))
    shuffled["granted_at"] = "2026-01-10T10:30:00+01:00"
    assert parse_consent(shuffled, now=NOW).id == a.id
    assert parse_consent({**GOOD, "evidence": "contracts/2026-115.pdf"}, now=NOW).id != a.id


def test_from_json_text_and_from_a_file(tmp_path: Path) -> None:
    from_text = parse_consent(json.dumps(GOOD), now=NOW)
    path = tmp_path / "consent.json"
    path.write_text(json.dumps(GOOD, indent=2), encoding="utf-8")
    assert parse_consent(path, now=NOW) == from_text
    assert parse_consent(str(path), now=NOW) == from_text
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode())
    assert parse_consent(bom, now=NOW).id == from_text.id


def test_missing_fields_are_all_named() -> None:
    with pytest.raises(ConsentError) as err:
        parse_consent({"subject": "Jane Doe", "method": "recorded verbal"}, now=NOW)
    message = str(err.value)
    assert "missing: granted_by, evidence" in message
    assert "subject, granted_by, method and evidence" in message
    assert isinstance(err.value, InputError)


def test_empty_and_blank_strings_are_invalid() -> None:
    with pytest.raises(ConsentError, match=r"empty fields: granted_by, evidence"):
        parse_consent({**GOOD, "granted_by": "", "evidence": "   "}, now=NOW)
    with pytest.raises(ConsentError, match="empty"):
        parse_consent("", now=NOW)


def test_wrong_types_and_dates_are_explained() -> None:
    with pytest.raises(ConsentError, match="evidence must be text, got 42"):
        parse_consent({**GOOD, "evidence": 42}, now=NOW)
    with pytest.raises(ConsentError, match=r"granted_at must be an ISO 8601 date-time.*'last tuesday'"):
        parse_consent({**GOOD, "granted_at": "last tuesday"}, now=NOW)
    with pytest.raises(ConsentError, match="expires_at must be after granted_at"):
        parse_consent({**GOOD, "expires_at": "2025-01-01T00:00:00Z"}, now=NOW)


def test_expired_record_is_refused() -> None:
    record = {**GOOD, "granted_at": "2026-01-01T00:00:00Z", "expires_at": "2026-05-31T23:59:59Z"}
    with pytest.raises(ConsentError, match="expired on 2026-05-31"):
        parse_consent(record, now=NOW)
    assert parse_consent(record, now=dt.datetime(2026, 5, 1, tzinfo=dt.UTC)).expires_at is not None
    # Without an explicit clock the real one is used: a 2001 expiry is long past.
    with pytest.raises(ConsentError, match="expired"):
        parse_consent({**GOOD, "granted_at": "2000-01-01", "expires_at": "2001-01-01"})


def test_grant_dated_in_the_future_is_refused() -> None:
    with pytest.raises(ConsentError, match="in the future"):
        parse_consent({**GOOD, "granted_at": "2026-07-01T00:00:00Z"}, now=NOW)


def test_bad_json_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConsentError, match=r"not valid JSON: .* line 1, column"):
        parse_consent('{"subject": "Jane", ', now=NOW)
    with pytest.raises(ConsentError, match=r"must be a JSON object.*not a list"):
        parse_consent('[{"subject": "Jane"}]', now=NOW)
    with pytest.raises(ConsentError, match="does not exist"):
        parse_consent(tmp_path / "nope.json", now=NOW)
    with pytest.raises(ConsentError, match="is a folder"):
        parse_consent(tmp_path, now=NOW)
    broken = tmp_path / "broken.json"
    broken.write_text('{"subject": "Jane",\n "granted_by": }', encoding="utf-8")
    with pytest.raises(ConsentError, match=rf"{re.escape(str(broken))} is not valid JSON: .* line 2"):
        parse_consent(broken, now=NOW)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConsentError, match="not UTF-8"):
        parse_consent(binary, now=NOW)
    with pytest.raises(ConsentError, match="not int"):
        parse_consent(12, now=NOW)  # type: ignore[arg-type]
