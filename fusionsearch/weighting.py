"""Loss weightings: how the K per-term losses become one scalar to backpropagate.

A weighting is an ``nn.Module`` built from a :class:`WeightingConfig`, the compiled terms and the
number of scales. ``forward(losses [K]) -> (total, weights)`` returns ``weights . losses`` plus the
weighting's own regulariser (if any) and the detached effective weights used, which the trainer
logs every epoch. Learnable weightings expose their parameters as module parameters, so the
network's optimiser trains them (as LoMix does).

Built-in kinds (see docs/weightings.md for formulas and caveats):

``softplus``             w = softplus(alpha), alpha = ``init`` (0 -> w = ln 2); LoMix.
``softplus_normalised``  softplus weights rescaled to sum to K.
``uncertainty``          Kendall et al. 2018: total = sum(exp(-s_k) * L_k + s_k), w = exp(-s_k).
``fixed``                the K ``values`` given.
``uniform``              all ones (deep supervision).
``last_only``            1 for the finest original ``P{L-1}``, 0 elsewhere.
``halving``              nnU-Net: original P_i gets 1/2^(L-1-i), the coarsest dropped, normalised.

Third parties add a kind with ``@fusionsearch.register_weighting("name")`` on a callable
``(config, terms, num_scales) -> Weighting``; their own settings go under ``options:``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from torch import Tensor, nn

from fusionsearch.errors import ConfigError, UnknownNameError
from fusionsearch.registry import WEIGHTINGS, register_weighting
from fusionsearch.terms import Term, original_name

# Which optional fields each built-in kind understands (others are rejected with a clear message).
_FIELDS_OF_KIND: dict[str, set[str]] = {
    "softplus": {"init"},
    "softplus_normalised": {"init"},
    "uncertainty": {"init"},
    "fixed": {"values", "normalise"},
    "uniform": {"normalise"},
    "last_only": set(),
    "halving": {"normalise"},
}


class WeightingConfig(BaseModel):
    """How the K per-term losses are weighted (the ``weighting:`` section of a search space)."""

    model_config = ConfigDict(extra="forbid")

    kind: str = "softplus"
    """A registered weighting: softplus, softplus_normalised, uncertainty, fixed, uniform, last_only, halving."""
    init: float | None = None
    """Initial raw parameter of learnable kinds: alpha for softplus (default 0), log-variance s for uncertainty."""
    values: list[float] | None = None
    """``fixed`` only: one non-negative weight per term, in term order."""
    normalise: bool | None = None
    """``fixed``/``uniform``/``halving``: rescale the weights to sum to 1 (default: True for halving only)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Settings of a third-party weighting (built-in kinds take none)."""

    @field_validator("kind")
    @classmethod
    def _registered_kind(cls, kind: str) -> str:
        try:
            WEIGHTINGS.get(kind)
        except UnknownNameError as exc:
            raise ValueError(str(exc)) from None
        return kind

    @field_validator("init")
    @classmethod
    def _finite_init(cls, value: float | None, info: ValidationInfo) -> float | None:
        _check_applies("init", value, info)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        return value

    @field_validator("values")
    @classmethod
    def _valid_values(cls, values: list[float] | None, info: ValidationInfo) -> list[float] | None:
        _check_applies("values", values, info)
        if values is None:
            return values
        bad = [v for v in values if not math.isfinite(v) or v < 0]
        if bad:
            raise ValueError(f"weights must be finite and >= 0, got {bad}")
        if not any(v > 0 for v in values):
            raise ValueError("no weight is positive, so nothing would be trained; make at least one positive")
        return values

    @field_validator("normalise")
    @classmethod
    def _normalise_applies(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        _check_applies("normalise", value, info)
        return value

    @field_validator("options")
    @classmethod
    def _options_for_plugins_only(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        kind = info.data.get("kind")
        if options and kind in _FIELDS_OF_KIND:
            raise ValueError(
                f"'options' is for third-party weightings; the built-in kind '{kind}' takes none, "
                f"got {sorted(options)}"
            )
        return options

    @model_validator(mode="after")
    def _fixed_has_values(self) -> WeightingConfig:
        if self.kind == "fixed" and self.values is None:
            raise ValueError("weighting kind 'fixed' needs 'values': one weight per term, in term order")
        return self


def _check_applies(name: str, value: object, info: ValidationInfo) -> None:
    """Reject a built-in kind's field that the chosen kind would silently ignore."""
    kind = info.data.get("kind")  # absent when 'kind' itself failed validation
    allowed = _FIELDS_OF_KIND.get(kind) if isinstance(kind, str) else None
    if value is None or allowed is None or name in allowed:
        return
    users = sorted(k for k, fields in _FIELDS_OF_KIND.items() if name in fields)
    raise ValueError(
        f"'{name}' does not apply to weighting kind '{kind}' (it is used by: {', '.join(users)}); remove it"
    )


class Weighting(nn.Module):
    """Base class: subclasses implement :meth:`weights` (and :meth:`regulariser` if they have one)."""

    def __init__(self, terms: list[Term]) -> None:
        super().__init__()
        self.term_names = [t.name for t in terms]

    @property
    def num_terms(self) -> int:
        return len(self.term_names)

    def weights(self) -> Tensor:
        """The effective weights [K] (differentiable for learnable kinds)."""
        raise NotImplementedError

    def regulariser(self) -> Tensor | None:
        """An extra scalar added to the total (None when the weighting has none)."""
        return None

    def forward(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        if losses.shape != (self.num_terms,):
            raise ValueError(
                f"{type(self).__name__} was built for {self.num_terms} terms but got losses of shape "
                f"{tuple(losses.shape)}"
            )
        weights = self.weights()
        total = torch.dot(weights.to(losses.dtype), losses)
        extra = self.regulariser()
        if extra is not None:
            total = total + extra.to(losses.dtype)
        return total, weights.detach()

    @torch.no_grad()
    def effective_weights(self) -> Tensor:
        """Detached effective weights [K], for logging."""
        return self.weights().detach().clone()


class _SoftplusWeighting(Weighting):
    def __init__(self, config: WeightingConfig, terms: list[Term], num_scales: int) -> None:
        super().__init__(terms)
        init = 0.0 if config.init is None else config.init
        self.alpha = nn.Parameter(torch.full((len(terms),), float(init)))


@register_weighting("softplus")
class SoftplusWeighting(_SoftplusWeighting):
    """LoMix: w_k = softplus(alpha_k), alpha initialised to 0 (w = ln 2), unnormalised, learnable."""

    def weights(self) -> Tensor:
        return F.softplus(self.alpha)


@register_weighting("softplus_normalised")
class NormalisedSoftplusWeighting(_SoftplusWeighting):
    """w_k = K * softplus(alpha_k) / sum_j softplus(alpha_j): only the relative weights are learned."""

    def weights(self) -> Tensor:
        w = F.softplus(self.alpha)
        return w * (self.num_terms / w.sum())


@register_weighting("uncertainty")
class UncertaintyWeighting(Weighting):
    """Kendall et al. 2018: total = sum_k exp(-s_k) L_k + s_k with learnable log-variances s_k.

    The effective weight is exp(-s_k); the regulariser sum_k s_k keeps the weights from collapsing
    to 0, and the optimum of each summand is s_k = log L_k (weight 1/L_k).
    """

    def __init__(self, config: WeightingConfig, terms: list[Term], num_scales: int) -> None:
        super().__init__(terms)
        init = 0.0 if config.init is None else config.init
        self.log_variance = nn.Parameter(torch.full((len(terms),), float(init)))

    def weights(self) -> Tensor:
        return torch.exp(-self.log_variance)

    def regulariser(self) -> Tensor:
        return self.log_variance.sum()


class ConstantWeighting(Weighting):
    """Weights that are not trained: held in a buffer (so they move with ``.to(device)``)."""

    def __init__(self, terms: list[Term], weights: list[float], normalise: bool) -> None:
        super().__init__(terms)
        values = torch.tensor(weights, dtype=torch.float32)
        if normalise:
            values = values / values.sum()
        self.register_buffer("constant", values)

    def weights(self) -> Tensor:
        return self.constant


@register_weighting("fixed")
def fixed_weighting(config: WeightingConfig, terms: list[Term], num_scales: int) -> ConstantWeighting:
    """The user's list of K weights, in term order."""
    values = config.values or []
    if len(values) != len(terms):
        names = ", ".join(t.name for t in terms)
        raise ConfigError(
            f"'fixed' has {len(values)} values but the space compiles to K={len(terms)} terms ({names})",
            field="weighting.values",
            fix=f"Give exactly {len(terms)} weights in that order",
        )
    return ConstantWeighting(terms, list(values), bool(config.normalise))


@register_weighting("uniform")
def uniform_weighting(config: WeightingConfig, terms: list[Term], num_scales: int) -> ConstantWeighting:
    """All terms weighted 1 (deep supervision over the pool)."""
    return ConstantWeighting(terms, [1.0] * len(terms), bool(config.normalise))


@register_weighting("last_only")
def last_only_weighting(config: WeightingConfig, terms: list[Term], num_scales: int) -> ConstantWeighting:
    """Only the finest original output P{L-1} is supervised."""
    finest = _original_positions(terms, num_scales, "last_only")[num_scales - 1]
    return ConstantWeighting(terms, [1.0 if i == finest else 0.0 for i in range(len(terms))], False)


@register_weighting("halving")
def halving_weighting(config: WeightingConfig, terms: list[Term], num_scales: int) -> ConstantWeighting:
    """nnU-Net deep supervision: P_i gets 1/2^(L-1-i), the coarsest P_0 is dropped (when L > 1), normalised."""
    positions = _original_positions(terms, num_scales, "halving")
    values = [0.0] * len(terms)
    first = 1 if num_scales > 1 else 0
    for scale in range(first, num_scales):
        values[positions[scale]] = 0.5 ** (num_scales - 1 - scale)
    normalise = True if config.normalise is None else config.normalise
    return ConstantWeighting(terms, values, normalise)


def _original_positions(terms: list[Term], num_scales: int, kind: str) -> dict[int, int]:
    """Index of each original term P_i in the term list; all L originals must be present."""
    positions = {t.scales[0]: i for i, t in enumerate(terms) if t.is_original}
    missing = [original_name(s) for s in range(num_scales) if s not in positions]
    if missing:
        raise ConfigError(
            f"weighting '{kind}' weights the original outputs, but the compiled terms lack {', '.join(missing)}",
            field="weighting.kind",
            fix="Include the original scales in the space, or pick another weighting (e.g. fixed or softplus)",
        )
    return positions


def build_weighting(config: WeightingConfig, terms: list[Term], num_scales: int) -> Weighting:
    """Instantiate the registered weighting ``config.kind`` for these K terms."""
    if not terms:
        raise ConfigError("the space compiles to no terms, so there is nothing to weight", field="weighting")
    factory = WEIGHTINGS.get(config.kind)
    weighting = factory(config, list(terms), num_scales)
    if not isinstance(weighting, Weighting):
        raise ConfigError(
            f"the weighting registered as '{config.kind}' returned {type(weighting).__name__}, "
            f"not a fusionsearch.weighting.Weighting",
            field="weighting.kind",
            fix="Make its factory return a Weighting subclass instance",
        )
    return weighting
