"""``fusionsearch inspect-model``: counts and shapes printed, user errors as one message (exit 2)."""

from __future__ import annotations

import re

import pytest

from fusionsearch.cli import main


def _double_conv(c_in: int, c_out: int, dims: int) -> int:
    kernel = 3**dims
    return c_in * c_out * kernel + 2 * c_out + c_out * c_out * kernel + 2 * c_out  # bias-free convs + BN


@pytest.mark.parametrize(("dims", "size"), [(2, 40), (3, 16)])
def test_inspect_model_prints_counts_and_shapes(capsys, dims, size):
    code = main(
        ["inspect-model", "small_unet", "--classes", "5", "--size", str(size), "--dims", str(dims)]
        + ["--set", "base_channels=2", "--set", "depth=2", "--set", "num_outputs=3"]
    )
    out = capsys.readouterr().out
    assert code == 0
    encoder = _double_conv(1, 2, dims) + _double_conv(2, 4, dims) + _double_conv(4, 8, dims)
    decoder = _double_conv(8 + 4, 4, dims) + _double_conv(4 + 2, 2, dims) + sum(c * 5 + 5 for c in (8, 4, 2))
    assert re.search(rf"encoder\s+{encoder:,}\b", out)
    assert re.search(rf"decoder\s+{decoder:,}\b", out)
    assert re.search(rf"total\s+{encoder + decoder:,}\b", out)
    for index, stride in enumerate((4, 2, 1)):
        shape = ", ".join(["1", "5", *[str(size // stride)] * dims])
        assert f"P{index}  [{shape}]" in out


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["inspect-model", "small_unet", "--set", "depht=2"], "Did you mean 'depth'"),
        (["inspect-model", "no_such_model"], "Unknown model 'no_such_model'"),
        (["inspect-model", "pvt_emcad", "--dims", "3", "--set", "encoder=test_convnext"], "use --dims 2"),
        (["inspect-model", "small_unet", "--size", "0"], "must be a positive integer"),
    ],
)
def test_inspect_model_user_errors(capsys, argv, text):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert text in " ".join(err.split()) and "Traceback" not in err
