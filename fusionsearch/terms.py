"""The unit of the mixing graph: one named term (an original logit or a fused subset)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Term:
    """One supervised logit: ``P2`` (operator None, scales (2,)) or ``mul(0,2,3)``."""

    name: str
    operator: str | None
    scales: tuple[int, ...]

    @property
    def is_original(self) -> bool:
        return self.operator is None


def original_name(scale: int) -> str:
    return f"P{scale}"


def fused_name(operator: str, scales: tuple[int, ...]) -> str:
    return f"{operator}({','.join(str(s) for s in scales)})"
