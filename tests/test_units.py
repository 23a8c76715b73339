"""format_bytes and parse_bytes: IEC units out, IEC and SI units in."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bpmem.units import format_bytes, parse_bytes

KIB, MIB, GIB, TIB = 1024, 1024**2, 1024**3, 1024**4


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (KIB, "1.0 KiB"),
        (KIB + KIB // 2, "1.5 KiB"),
        (793 * KIB, "793.0 KiB"),
        (MIB, "1.0 MiB"),
        (12 * MIB, "12.0 MiB"),
        (GIB, "1.0 GiB"),
        (3 * GIB + GIB // 4, "3.2 GiB"),  # 3.25 to one decimal, round-half-even
        (2 * TIB, "2.0 TiB"),
    ],
)
def test_format_bytes(nbytes, text):
    assert format_bytes(nbytes) == text


def test_format_bytes_accepts_floats():
    assert format_bytes(512.0) == "512 B"
    assert format_bytes(1.5 * MIB) == "1.5 MiB"


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("12 MiB", 12 * MIB),
        ("1.5GiB", GIB + GIB // 2),
        ("300 kB", 300 * 1000),
        ("2 MB", 2 * 1000**2),
        ("1 GB", 1000**3),
        ("1 TiB", TIB),
        ("4 KiB", 4 * KIB),
        ("0.5 KiB", 512),
        ("  7 kib ", 7 * KIB),
        ("512", 512),
        ("512 B", 512),
        ("0", 0),
        (".5 MiB", MIB // 2),
    ],
)
def test_parse_bytes(text, nbytes):
    value = parse_bytes(text)
    assert value == nbytes
    assert type(value) is int


def test_parse_bytes_passes_integers_through():
    assert parse_bytes(512) == 512
    assert parse_bytes(0) == 0


@pytest.mark.parametrize("text", ["", "MiB", "12 XB", "12 MiBs", "1.2.3 GiB", "-5 MiB", "twelve", "12 M iB"])
def test_parse_bytes_rejects_with_a_helpful_message(text):
    with pytest.raises(ValueError) as info:
        parse_bytes(text)
    message = str(info.value)
    assert repr(text) in message  # says what was wrong
    assert "MiB" in message and "512" in message  # and shows what would work


@pytest.mark.parametrize("nbytes", [0, 1, 1023, KIB, 12 * MIB, 5 * GIB, 3 * TIB, 1000 * KIB])
def test_round_trip_exact_for_whole_units(nbytes):
    assert parse_bytes(format_bytes(nbytes)) == nbytes


@given(st.integers(min_value=0, max_value=1024**5 - 1))
def test_round_trip_within_display_precision(nbytes):
    text = format_bytes(nbytes)
    back = parse_bytes(text)
    if nbytes < KIB:
        assert back == nbytes
    else:
        # one decimal of a value >= 1 in its unit: off by at most 5 %
        assert abs(back - nbytes) <= 0.05 * nbytes + 1


@given(st.integers(min_value=0, max_value=1023), st.sampled_from(["KiB", "MiB", "GiB", "TiB"]))
def test_format_of_parsed_whole_units(count, unit):
    factor = {"KiB": KIB, "MiB": MIB, "GiB": GIB, "TiB": TIB}[unit]
    nbytes = parse_bytes(f"{count} {unit}")
    assert nbytes == count * factor
    expected = f"{count}.0 {unit}" if count else "0 B"
    assert format_bytes(nbytes) == expected


def test_round_trip_pebibytes():
    assert format_bytes(1024**5) == "1.0 PiB"
    assert parse_bytes(format_bytes(1024**5)) == 1024**5


def test_unit_is_chosen_after_rounding():
    assert format_bytes(1024**2 - 1) == "1.0 MiB"


@pytest.mark.parametrize("bad", [1.5, True, -3])
def test_parse_bytes_rejects_non_sizes(bad):
    with pytest.raises(ValueError):
        parse_bytes(bad)
