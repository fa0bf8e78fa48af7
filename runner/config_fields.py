"""Typed config fields with the values they may take: a choice list or a numeric Range, which validate() checks
before any step runs (every int/float key of the schema has one)."""

import math
from dataclasses import dataclass, field
from typing import Any, List


def choice(default: Any, choices: List[Any]) -> Any:
    """A field whose value must be one of `choices` (checked by validate())."""
    return field(default=default, metadata={"choices": choices})


INF = math.inf


@dataclass(frozen=True)
class Range:
    """The values a numeric key can take: lo..hi, each end open or closed, plus `special` values outside it that
    mean something (max_seq_length=-1: the model's limit). A range refuses impossible values, not bad ideas
    (learning_rate=1e10 is in range; the quality gate before register catches what it does to a run)."""

    lo: float = -INF
    hi: float = INF
    lo_open: bool = False
    hi_open: bool = False
    special: tuple = ()

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if value in self.special:
            return True
        if not math.isfinite(value):  # NaN compares false with everything: finiteness is checked, not implied
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def __str__(self) -> str:
        def num(x):
            return str(int(x)) if float(x).is_integer() else repr(x)

        if self.hi == INF:
            text = f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        elif self.lo == -INF:
            text = f"{'<' if self.hi_open else '<='} {num(self.hi)}"
        else:
            text = f"in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"
        return text + "".join(f" or {num(v)}" for v in self.special)


def bounded(default: Any, lo: float = -INF, hi: float = INF, *, lo_open: bool = False, hi_open: bool = False,
            special: tuple = ()) -> Any:
    """A numeric field whose value must lie in a Range (checked by validate()); every int/float key has one."""
    return field(default=default, metadata={"range": Range(lo, hi, lo_open, hi_open, tuple(special))})


def positive(default: Any) -> Any:
    """> 0: an int must be >= 1, a float any finite value above 0."""
    return bounded(default, 0, lo_open=True)


def non_negative(default: Any) -> Any:
    return bounded(default, 0)


def list_field(*items: Any) -> Any:
    return field(default_factory=lambda: list(items))
