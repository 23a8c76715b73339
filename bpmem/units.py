"""Bytes for people: IEC units (KiB = 1024 B) in, IEC units out."""

from __future__ import annotations

import re

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_FACTORS = {
    "b": 1, "": 1,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "pib": 1024**5,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4, "pb": 1000**5,
}


def format_bytes(nbytes: int | float) -> str:
    """``format_bytes(812_032) == '793.0 KiB'``; whole bytes below 1 KiB."""
    value, unit = float(nbytes), 0
    # choose the unit after rounding, so 1,048,575 B reads 1.0 MiB, not 1024.0 KiB
    while unit < len(_UNITS) - 1 and (abs(value) >= 1024 or (unit and round(abs(value), 1) >= 1024)):
        value /= 1024
        unit += 1
    return f"{int(value)} B" if unit == 0 else f"{value:.1f} {_UNITS[unit]}"


def parse_bytes(text: str | int, whole: bool = False) -> int:
    """``'12 MiB' -> 12582912``; ``'1.5GiB'``, ``'300 kB'`` and plain integers work too.
    With ``whole``, a size that is not a whole number of bytes (``'1.5'``, ``'0.3 B'``) is a
    ValueError instead of being rounded down."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ValueError(f"{text!r} is not a size; use e.g. 512, '12 MiB', '1.5 GiB' (IEC) or '300 kB'")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"{text!r} is not a size; sizes are >= 0 bytes")
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _FACTORS:
        raise ValueError(f"{text!r} is not a size; use e.g. 512, '12 MiB', '1.5 GiB' (IEC) or '300 kB'")
    exact = float(match.group(1)) * _FACTORS[match.group(2).lower()]
    if whole and exact != int(exact):
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(exact)
