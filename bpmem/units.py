"""Bytes for people: IEC units (KiB = 1024 B) in, IEC units out."""

from __future__ import annotations

import re

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_FACTORS = {
    "b": 1, "": 1,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
}


def format_bytes(nbytes: int | float) -> str:
    """``format_bytes(812_032) == '793.0 KiB'``; whole bytes below 1 KiB."""
    value, unit = float(nbytes), 0
    while abs(value) >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    return f"{int(value)} B" if unit == 0 else f"{value:.1f} {_UNITS[unit]}"


def parse_bytes(text: str | int) -> int:
    """``'12 MiB' -> 12582912``; ``'1.5GiB'``, ``'300 kB'`` and plain integers work too."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _FACTORS:
        raise ValueError(f"{text!r} is not a size; use e.g. 512, '12 MiB', '1.5 GiB' (IEC) or '300 kB'")
    return int(float(match.group(1)) * _FACTORS[match.group(2).lower()])
