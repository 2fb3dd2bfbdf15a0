"""timm encoders with pretrained weights from the hub or from a local file.

``pretrained=True`` uses timm's normal mechanism (the Hugging Face hub or its local cache).
``pretrained_file`` loads a local safetensors or ``.pth``/``.bin`` state dict (read with
``weights_only=True``) and hands it to timm through ``pretrained_cfg_overlay``, so timm's own
key conversion and input-channel adaptation still apply. Because timm loads features-only
encoders non-strictly, the result is checked afterwards: a file whose tensors do not end up in the
encoder is an error, never a silently random encoder.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusionsearch.errors import ConfigError, DataError, FusionSearchError

_WRAPPER_KEYS = ("state_dict", "model", "module")
_PREFIXES = ("module.", "_orig_mod.")
_MIN_LOADED_FRACTION = 0.9  # share of encoder values that must come from the file


def create_timm_encoder(
    name: str,
    *,
    in_chans: int = 3,
    pretrained: bool = False,
    pretrained_file: str | Path | None = None,
) -> nn.Module:
    """A timm ``features_only`` encoder; see the module docstring for the weight sources.

    A ``pretrained_file`` is loaded whatever ``pretrained`` says: naming a file is a request for it.
    """
    import timm

    if not isinstance(name, str) or not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=3, cutoff=0.6)
        hint = f"Did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise ConfigError(
            f"'{name}' is not a timm model",
            field="encoder",
            fix=f"{hint}Use a timm model name that supports features_only, e.g. pvt_v2_b2, resnet34, convnext_tiny",
        )
    kwargs: dict[str, Any] = {"features_only": True, "in_chans": in_chans}
    if pretrained_file is not None:
        state = read_state_dict(pretrained_file)
        try:
            encoder = _create(timm, name, pretrained=True, pretrained_cfg_overlay={"state_dict": dict(state)}, **kwargs)
        except RuntimeError as exc:  # torch's load_state_dict: tensors of the wrong shape
            reason = " ".join(str(exc).split())[:500]
            raise DataError(
                f"The weights file {pretrained_file} does not fit timm encoder '{name}': {reason}. "
                f"It was probably saved from another model variant; pick the matching 'encoder'."
            ) from exc
        _check_loaded(encoder, state, name, Path(pretrained_file))
        encoder.pretrained_cfg.pop("state_dict", None)  # do not keep a second copy of the weights alive
        return encoder
    if not pretrained:
        return _create(timm, name, pretrained=False, **kwargs)
    try:
        return _create(timm, name, pretrained=True, **kwargs)
    except (OSError, RuntimeError) as exc:
        offline = " (HF_HUB_OFFLINE is set, so nothing is downloaded)" if _env_flag("HF_HUB_OFFLINE") else ""
        raise FusionSearchError(
            f"Could not get the pretrained weights of timm encoder '{name}' ({type(exc).__name__}: "
            f"{str(exc).strip()[:300]}). 'pretrained: true' downloads them through timm from the Hugging Face hub "
            f"or reads timm's local cache, so the first use needs network access{offline}. Either run once online "
            f"to fill the cache, or download the weights elsewhere and set 'pretrained_file: "
            f"/path/to/weights.safetensors' (or .pth/.bin), or set 'pretrained: false'."
        ) from exc


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _create(timm: Any, name: str, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(name, **kwargs)
    except (AssertionError, NotImplementedError, TypeError, ValueError) as exc:  # how timm models refuse
        raise ConfigError(
            f"timm model '{name}' cannot be built as a features_only encoder with in_chans={kwargs.get('in_chans')} "
            f"({type(exc).__name__}: {exc})",
            field="encoder",
            fix="Pick a timm model that supports features_only=True (CNNs, ConvNeXt, PVT v2, Swin, ...)",
        ) from exc


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch file (``weights_only=True``), unwrapping
    ``{"state_dict": ...}``/``{"model": ...}`` and ``module.``/``_orig_mod.`` prefixes."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(
            f"the weights file '{file}' does not exist",
            field="pretrained_file",
            fix="Give the path of a .safetensors, .pth or .bin file holding the encoder's state dict",
        )
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(file), device="cpu")
        else:
            raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated or pickled with custom classes
        raise DataError(
            f"Cannot read the weights file {file} ({type(exc).__name__}: {str(exc)[:300]}). Expected a "
            f"safetensors file or a state dict saved with torch.save(model.state_dict(), path); files that "
            f"need arbitrary pickled objects are refused (weights_only=True)."
        ) from exc
    while isinstance(raw, dict):
        inner = next((raw[k] for k in _WRAPPER_KEYS if isinstance(raw.get(k), dict)), None)
        if inner is None:
            break
        raw = inner
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise DataError(
            f"The weights file {file} does not hold a state dict (a mapping of names to tensors). Save it "
            f"with torch.save(model.state_dict(), path) or safetensors.torch.save_file."
        )
    state = {}
    for key, value in raw.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        state[key] = value
    return state


def _check_loaded(encoder: nn.Module, state: dict[str, torch.Tensor], name: str, file: Path) -> None:
    """Fail if too little of the encoder came from ``state``.

    Matches tensors by value (within shape groups), because timm renames modules in features_only
    wrappers and its checkpoint filters rename keys; values survive both.
    """
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = defaultdict(list)
    for tensor in state.values():
        if tensor.is_floating_point():
            by_shape[tuple(tensor.shape)].append(tensor)
    loaded = total = 0
    not_loaded = []
    for key, tensor in encoder.state_dict().items():
        if not tensor.is_floating_point():
            continue
        total += tensor.numel()
        candidates = by_shape.get(tuple(tensor.shape), [])
        if any(torch.equal(tensor, c.to(tensor.dtype)) for c in candidates):
            loaded += tensor.numel()
        else:
            not_loaded.append(key)
    if total and loaded / total < _MIN_LOADED_FRACTION:
        raise DataError(
            f"The weights file {file} does not fit timm encoder '{name}': only {loaded / total:.0%} of the "
            f"encoder's values were found in it (e.g. not loaded: {', '.join(not_loaded[:5])}). Its key names "
            f"or shapes differ from timm's; save it from timm.create_model('{name}').state_dict() or pick the "
            f"matching 'encoder'."
        )
    if not_loaded:
        warnings.warn(
            f"{len(not_loaded)} encoder tensors of '{name}' were not taken from {file} (e.g. "
            f"{', '.join(not_loaded[:3])}); timm adapted or left them at random initialisation.",
            stacklevel=3,
        )
