"""Subband file names and group ids: only the exact correlator form is accepted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from dsa110_contimg.products import (
    InvalidName,
    group_id_for,
    group_time,
    parse_subband_name,
    validate_group_id,
)


def test_parses_timestamp_and_subband() -> None:
    parsed = parse_subband_name("2025-03-04T05:06:07_sb15.hdf5")
    assert parsed.timestamp == datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert parsed.subband == 15
    assert parse_subband_name("2025-03-04T05:06:07_sb00.hdf5").subband == 0
    assert parse_subband_name("2025-03-04T05:06:07_sb99.hdf5").subband == 99


@pytest.mark.parametrize(("name", "reason"), [
    ("", "empty"),
    ("2025-03-04T05:06:07_sb15.h5", "suffix"),
    ("2025-03-04T05:06:07_sb15.hdf5.tmp", "suffix"),
    ("2025-03-04T05:06:07_sb15.HDF5", "suffix"),
    ("2025-03-04T05:06:07_sb5.hdf5", "does not match"),
    ("2025-03-04T05:06:07_sb100.hdf5", "does not match"),
    ("2025-03-04 05:06:07_sb15.hdf5", "whitespace"),
    ("2025-03-04T05:06:07_sb15.hdf5 ", "whitespace"),
    ("../2025-03-04T05:06:07_sb15.hdf5", "path separator"),
    ("2025-03-04T05:06:07_sb15..hdf5", "'..'"),
    ("sub/2025-03-04T05:06:07_sb15.hdf5", "path separator"),
    ("2025-03-04T05:06:07_sb1\u0665.hdf5", "non-ASCII"),      # Arabic-Indic digit five
    ("2025-03-04T05:06:07_sb\uff11\uff15.hdf5", "non-ASCII"),  # fullwidth digits
    ("2025-13-04T05:06:07_sb15.hdf5", "not a valid date"),
    ("2025-02-30T05:06:07_sb15.hdf5", "not a valid date"),
    ("2025-03-04T24:06:07_sb15.hdf5", "not a valid date"),
    (".2025-03-04T05:06:07_sb15.hdf5.swp", "suffix"),
    ("x" * 200 + ".hdf5", "longer than"),
])
def test_rejects_with_reason(name: str, reason: str) -> None:
    with pytest.raises(InvalidName) as info:
        parse_subband_name(name)
    assert reason in info.value.reason
    assert info.value.name == name


def test_group_ids_round_trip_and_are_plain() -> None:
    ts = parse_subband_name("2025-03-04T05:06:07_sb03.hdf5").timestamp
    gid = group_id_for(ts)
    assert gid == "2025-03-04T05:06:07"
    assert validate_group_id(gid) == gid
    assert group_time(gid) == ts
    # a timezone-aware time elsewhere is converted, not mislabelled
    assert group_id_for(ts.astimezone(timezone(timedelta(hours=-8)))) == gid


@pytest.mark.parametrize("text", [
    "", "2025-03-04", "2025-03-04T05:06", "2025-03-04T05:06:07Z", "2025-03-04T05:06:07/..",
    "../../etc", "2025-02-30T05:06:07", "2025-03-04T05:06:07_sb03", "2025-03-04t05:06:07",
])
def test_validate_group_id_rejects(text: str) -> None:
    with pytest.raises(InvalidName):
        validate_group_id(text)


def test_validate_group_id_strips_outer_whitespace_only() -> None:
    assert validate_group_id(" 2025-03-04T05:06:07\n") == "2025-03-04T05:06:07"
