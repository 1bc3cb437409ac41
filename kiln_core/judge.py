"""One gate judge: figures held to thresholds that know their direction.

Every gate (an encoder's cosines, a causal LM's logits and perplexity, the int8 portability
check) states its thresholds as :class:`Threshold` objects and asks :func:`judge` for the
verdict, so a NaN or a missing figure fails the same way everywhere and nothing downstream
keeps its own list of which limits are maximums.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum


class Direction(str, Enum):
    at_least = "at_least"  # a minimum: a cosine, an agreement count
    at_most = "at_most"  # a maximum: a difference, a ratio, a count of problems

    @property
    def symbol(self) -> str:
        return ">=" if self is Direction.at_least else "<="


@dataclass(frozen=True)
class Threshold:
    name: str  # the figure it holds
    limit: float
    direction: Direction

    def holds(self, value: float) -> bool:
        """Whether ``value`` is on the right side of the limit; NaN never is, either way."""
        if math.isnan(value):
            return False
        return value >= self.limit if self.direction is Direction.at_least else value <= self.limit

    def failure(self, value: float | None) -> str | None:
        """Why ``value`` misses this threshold (``None``: the figure was never measured), or
        ``None`` when it holds: the figure, its value, the limit and how far off it is."""
        needs = f"needs {self.direction.symbol} {self.limit:g}"
        if value is None:
            return f"{self.name} missing, {needs}"
        if self.holds(value):
            return None
        off = "not a number" if math.isnan(value) else f"off by {abs(value - self.limit):.3g}"
        return f"{self.name} = {value:.6g}, {needs} ({off})"

    def __str__(self) -> str:
        return f"{self.name} {self.direction.symbol} {self.limit:g}"


def at_least(name: str, limit: float) -> Threshold:
    return Threshold(name, float(limit), Direction.at_least)


def at_most(name: str, limit: float) -> Threshold:
    return Threshold(name, float(limit), Direction.at_most)


@dataclass(frozen=True)
class Verdict:
    failures: list[str]  # one message per threshold missed, in the thresholds' order

    @property
    def passed(self) -> bool:
        return not self.failures


def judge(figures: Mapping[str, float], thresholds: Iterable[Threshold]) -> Verdict:
    """Hold each figure to its thresholds; a threshold whose figure is absent fails."""
    failures = [t.failure(figures.get(t.name)) for t in thresholds]
    return Verdict([f for f in failures if f is not None])
