"""The ``operators`` and ``inspect`` commands, and how bad input reaches the user through the CLI."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fusionsearch.cli import main

PLUGINS = Path(__file__).parent / "plugins"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, " ".join(captured.err.split())


def lomix_parameter_count(num_scales: int, classes: int) -> int:
    """awf: a C->1 conv (weight + bias) per member position per subset size; concat: a k*C->C conv per
    subset; softplus: one alpha per term."""
    awf = sum(k * classes + k for k in range(2, num_scales + 1))
    concat = sum(
        classes * k * classes + classes
        for k in range(2, num_scales + 1)
        for _ in itertools.combinations(range(num_scales), k)
    )
    terms = num_scales + 4 * (2**num_scales - 1 - num_scales)
    return awf + concat + terms


def test_operators_table(capsys):
    code, out, err = run_cli(capsys, "operators")
    assert code == 0 and err == ""
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert rows["concat"].split()[1] == "parametric" and "share='subset'" in rows["concat"]
    assert rows["awf"].split()[1] == "parametric" and "share='size'" in rows["awf"]
    assert rows["mul"].split()[1] == "stateless" and "Elementwise product of the member logits." in rows["mul"]
    assert {"add", "mean", "max"} <= set(rows)


def test_operators_table_with_plugin(capsys):
    code, out, _ = run_cli(capsys, "operators", "--plugins", str(PLUGINS / "gated_sum.py"))
    assert code == 0
    assert re.search(r"gated_sum\s+parametric\s+scale=1.0\s+Sum of the members", out)


@pytest.mark.parametrize(("num_scales", "classes", "dims"), [(4, 9, 2), (5, 4, 3), (2, 3, 2)])
def test_inspect_lomix(capsys, num_scales, classes, dims):
    code, out, _ = run_cli(
        capsys, "inspect", "lomix", "--scales", str(num_scales), "--classes", str(classes), "--dims", str(dims)
    )
    assert code == 0
    k = num_scales + 4 * (2**num_scales - 1 - num_scales)
    assert f"K = {k} terms; {lomix_parameter_count(num_scales, classes):,} trainable parameters" in out
    subsets_of_size = {
        size: len(list(itertools.combinations(range(num_scales), size))) for size in range(2, num_scales + 1)
    }
    mul_row = next(line.split() for line in out.splitlines() if line.strip().startswith("mul ") and "mul(" not in line)
    assert mul_row == ["mul", "-", *map(str, subsets_of_size.values()), str(sum(subsets_of_size.values()))]
    finest = ",".join(map(str, range(num_scales)))
    assert f"concat({finest})" in out and "P0 P1" in out


def test_inspect_last_layer(capsys):
    code, out, _ = run_cli(capsys, "inspect", "last_layer", "--scales", "4", "--classes", "9")
    assert code == 0
    assert "K = 1 terms; 0 trainable parameters" in out and "used: P3" in out


BAD_SPACES = {
    "unknown_operator": ("operators: [add, mull]\n", "operators.1", "Unknown operator 'mull'. Did you mean 'mul'?"),
    "misspelt_field": ("operators: [add]\ninclude_orignals: false\n", "include_orignals", "not a known field"),
    "wrong_type": ("operators: [add]\nloss: {ce: high}\n", "loss.ce", "valid number"),
    "empty_operators": ("operators: []\ninclude_originals: false\n", "operators", "has no terms"),
    "malformed_yaml": ("operators: [add, mul\nloss: {ce: 0.3}\n", None, "malformed YAML at line"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_bad_space_gives_one_located_message(capsys, tmp_path, monkeypatch, case):
    text, field, message = BAD_SPACES[case]
    monkeypatch.chdir(tmp_path)
    Path("space.yaml").write_text(text, encoding="utf-8")
    code, out, err = run_cli(capsys, "inspect", "space.yaml", "--scales", "4", "--classes", "9")
    assert code == 2 and out == ""
    assert err.startswith("error: space.yaml:") and err.count("error:") == 1
    assert message in err
    if field:
        assert f"field '{field}'" in err
    assert "Traceback" not in err


def test_more_than_five_scales_without_budget(capsys):
    code, out, err = run_cli(capsys, "inspect", "lomix", "--scales", "6", "--classes", "9")
    assert code == 2 and out == ""
    assert err.startswith("error: <bundled space 'lomix'>: field 'budget':")
    assert "more than 5 scales are only allowed with a term budget" in err


def test_more_than_five_scales_with_budget(capsys, tmp_path):
    path = tmp_path / "budget.yaml"
    path.write_text("operators: [add, mul]\nbudget: {max_terms: 40, strategy: prune}\n", encoding="utf-8")
    code, out, _ = run_cli(capsys, "inspect", str(path), "--scales", "6", "--classes", "3")
    assert code == 0 and "K = 40 terms" in out


def test_unknown_space_name(capsys):
    code, _, err = run_cli(capsys, "inspect", "lomx", "--scales", "4", "--classes", "9")
    assert code == 2 and "Unknown space 'lomx'. Did you mean 'lomix'?" in err


def test_bad_space_in_a_subprocess_prints_no_traceback(tmp_path):
    (tmp_path / "space.yaml").write_text("operators: [add, pow]\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "fusionsearch.cli", "inspect", "space.yaml", "--scales", "4", "--classes", "9"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: space.yaml: field 'operators.1': Unknown operator 'pow'.")
