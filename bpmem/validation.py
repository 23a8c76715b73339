"""Field-named validation errors, the checks behind them, and the one parser of budgets.

Every spec and strategy config raises ``SpecError`` naming its field and the values it
would have accepted; the CLI turns the field into its flag (``--field-name``) and the config
loader into its key. Nothing here imports torch.
"""

from __future__ import annotations

import math
import re
from typing import Any

from bpmem.units import format_bytes, parse_bytes


class SpecError(ValueError):
    """A field of a spec holds a value outside its allowed set.

    ``field`` is the dataclass field name (the CLI turns it into ``--field-name``) and
    ``allowed`` describes the values that would have been accepted.
    """

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}={value!r} is not allowed; allowed: {allowed}")


def check_positive_int(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(field, value, "an integer >= 1")


def check_non_negative(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise SpecError(field, value, "a finite number >= 0")


def check_choice(field: str, value: Any, choices: tuple[str, ...] | dict[str, Any]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise SpecError(field, value, ", ".join(choices))


BUDGET_ALLOWED = "a fraction of the plain figure in (0, 1], or bytes: an integer >= 2 or a size with a unit ('64MiB')"


def parse_budget(value: Any) -> float | int:
    """A checkpoint budget, never ambiguous: a fraction of the plain step's retained bytes in
    (0, 1] (a float), or bytes (an int >= 2). Accepts 0.5, "0.5", 1 (the fraction 1.0),
    1000000, "1000000", "64MiB", "1.5 GiB"; refuses 1.5, which is neither. Raises SpecError."""
    if isinstance(value, bool):
        raise SpecError("budget", value, BUDGET_ALLOWED)
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"[0-9]+", text):
            value = int(text)
        elif re.fullmatch(r"[0-9]*\.[0-9]+|[0-9]+\.[0-9]*", text):
            value = float(text)
        else:
            try:
                value = parse_bytes(text)
            except ValueError:
                raise SpecError("budget", value, BUDGET_ALLOWED) from None
            if not re.search(r"[A-Za-z]", text) or value < 2:
                raise SpecError("budget", text, BUDGET_ALLOWED)
            return value
    if isinstance(value, int):
        if value == 1:
            return 1.0
        if value < 2:
            raise SpecError("budget", value, BUDGET_ALLOWED)
        return value
    if isinstance(value, float) and math.isfinite(value) and 0 < value <= 1:
        return value
    raise SpecError("budget", value, BUDGET_ALLOWED)


class InfeasibleBudget(ValueError):
    """The budget is below what one checkpoint over the whole chain retains: no plan fits.

    ``budget_bytes`` is what was asked, ``smallest_bytes`` the least any plan retains (one
    checkpoint over the whole chain keeps only its input, plus the loss internals), and
    ``plain_bytes`` what the plain step retains, so a message can give both forms."""

    def __init__(self, budget_bytes: int, smallest_bytes: int, plain_bytes: int) -> None:
        self.budget_bytes, self.smallest_bytes, self.plain_bytes = budget_bytes, smallest_bytes, plain_bytes
        # the smallest fraction, rounded up to 3 decimals, that still meets smallest_bytes
        fraction = math.ceil(smallest_bytes / plain_bytes * 1000) / 1000
        super().__init__(f"budget: {budget_bytes:,} B is below the smallest feasible budget, "
                         f"{smallest_bytes:,} B ({format_bytes(smallest_bytes)}); allowed: at least "
                         f"{smallest_bytes} bytes or a fraction >= {min(fraction, 1.0):g} of the plain "
                         f"{plain_bytes:,} B")

