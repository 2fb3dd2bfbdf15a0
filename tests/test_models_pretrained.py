"""Encoder weights from local files, and the offline error for ``pretrained=True``. Nothing downloads."""

from __future__ import annotations

import os
import re
import warnings

import pytest
import torch

import fusionsearch as fs
from fusionsearch.errors import ConfigError, DataError, FusionSearchError


def _timm_state(name: str, seed: int) -> dict[str, torch.Tensor]:
    """A freshly built full timm classifier's state dict, as a user would save it."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name).state_dict()


def _source_key(feature_key: str) -> str:
    """timm's features_only wrappers flatten top-level sequences: ``stages_0.x`` is ``stages.0.x``."""
    return re.sub(r"^([a-z]+)_(\d+)\.", r"\1.\2.", feature_key)


def _save(state: dict[str, torch.Tensor], path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize(
    ("model", "encoder", "in_channels", "filename", "wrap"),
    [
        ("pvt_emcad", "pvt_v2_b0", 1, "pvt.safetensors", False),
        ("timm_unet", "test_resnet", 3, "resnet.pth", True),
        ("timm_unet", "test_convnext", 3, "convnext.bin", False),
    ],
)
def test_pretrained_file_loads_the_saved_encoder_weights(tmp_path, model, encoder, in_channels, filename, wrap):
    source = _timm_state(encoder, seed=0)
    path = tmp_path / filename
    _save({"state_dict": {f"module.{k}": v for k, v in source.items()}} if wrap else source, path)

    torch.manual_seed(1)  # a different random init: only loading can make the weights equal
    built = fs.build_model(model, num_classes=3, in_channels=in_channels, encoder=encoder, pretrained_file=str(path))
    encoder_state = built.encoder.state_dict()
    assert len(encoder_state) > 10
    for key, value in encoder_state.items():
        assert torch.equal(value, source[_source_key(key)]), key
    assert "state_dict" not in built.encoder.pretrained_cfg  # no second copy of the weights kept alive


def _original_pvt_key(timm_key: str) -> str:
    """The official PVTv2 release's name for a timm key (block1.0 for stages.0.blocks.0, ...)."""
    key = re.sub(r"^stages\.(\d+)\.blocks\.", lambda m: f"block{int(m[1]) + 1}.", timm_key)
    key = re.sub(r"^stages\.(\d+)\.norm\.", lambda m: f"norm{int(m[1]) + 1}.", key)
    key = re.sub(r"^stages\.(\d+)\.downsample\.", lambda m: f"patch_embed{int(m[1]) + 1}.", key)
    key = re.sub(r"^patch_embed\.", "patch_embed1.", key)
    return key.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")


def test_original_pvt_release_naming_is_converted_by_timm(tmp_path):
    source = _timm_state("pvt_v2_b0", seed=0)
    original = {_original_pvt_key(k): v for k, v in source.items()}
    assert "block1.0.mlp.dwconv.dwconv.weight" in original and "patch_embed1.proj.weight" in original
    path = tmp_path / "pvt_v2_b0.pth"
    torch.save(original, path)
    torch.manual_seed(1)
    built = fs.build_model("pvt_emcad", num_classes=2, encoder="pvt_v2_b0", pretrained_file=path)
    for key, value in built.encoder.state_dict().items():
        assert torch.equal(value, source[_source_key(key)]), key


def test_grey_input_adapts_the_first_convolution_by_summing_rgb(tmp_path):
    source = _timm_state("test_resnet", seed=0)
    path = tmp_path / "resnet.pth"
    torch.save(source, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        built = fs.build_model("timm_unet", num_classes=2, in_channels=1, encoder="test_resnet", pretrained_file=path)
    first = built.encoder.state_dict()["conv1.0.weight"]
    torch.testing.assert_close(first, source["conv1.0.weight"].sum(dim=1, keepdim=True))
    assert any("conv1.0.weight" in str(w.message) for w in caught)  # the adapted tensor is reported


def test_a_file_with_foreign_key_names_is_refused(tmp_path):
    source = _timm_state("test_resnet", seed=0)
    path = tmp_path / "renamed.pth"
    torch.save({f"backbone.{k}": v for k, v in source.items()}, path)
    with pytest.raises(DataError, match=r"renamed\.pth does not fit timm encoder 'test_resnet'"):
        fs.build_model("timm_unet", num_classes=2, in_channels=3, encoder="test_resnet", pretrained_file=str(path))


def test_a_file_from_another_variant_is_refused(tmp_path):
    path = tmp_path / "convnext2.pth"
    torch.save(_timm_state("test_convnext2", seed=0), path)  # same key names, wider tensors
    with pytest.raises(DataError, match=r"convnext2\.pth does not fit timm encoder 'test_convnext'.*size mismatch"):
        fs.build_model("timm_unet", num_classes=2, in_channels=3, encoder="test_convnext", pretrained_file=str(path))


@pytest.mark.parametrize(
    ("content", "error", "text"),
    [
        (b"this is not a checkpoint", DataError, "Cannot read the weights file"),
        (None, ConfigError, "does not exist"),
    ],
)
def test_unreadable_or_missing_files(tmp_path, content, error, text):
    path = tmp_path / "weights.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=text) as info:
        fs.build_model("timm_unet", num_classes=2, encoder="test_resnet", pretrained_file=str(path))
    assert "weights.pth" in str(info.value)


def test_a_file_without_tensors_is_refused(tmp_path):
    path = tmp_path / "numbers.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(DataError, match="does not hold a state dict"):
        fs.build_model("timm_unet", num_classes=2, encoder="test_resnet", pretrained_file=str(path))


def test_pretrained_offline_without_a_file_names_both_options(tmp_path, monkeypatch):
    import huggingface_hub.constants

    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest: no network in tests
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(FusionSearchError) as info:
        fs.build_model("pvt_emcad", num_classes=2, encoder="pvt_v2_b0", pretrained=True)
    message = str(info.value)
    assert "pretrained_file" in message and "pretrained: false" in message and "HF_HUB_OFFLINE" in message
