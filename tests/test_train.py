"""The trainer's parts: schedules, data order, optimiser groups, atomic checkpoints, NaN and Ctrl-C handling."""

from __future__ import annotations

import hashlib
import math
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from fusionsearch.checkpoint import (
    CheckpointWriteError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from fusionsearch.data.phantoms import make_synapse
from fusionsearch.errors import FusionSearchError
from fusionsearch.recipe import OptimConfig, ScheduleConfig, load_recipe
from fusionsearch.runner import build_criterion_for, build_model_for, build_split
from fusionsearch.train import (
    Trainer,
    TrainingDiverged,
    amp_settings,
    build_optimizer,
    epoch_batches,
    lr_factor,
    resolve_device,
)


# -- schedules and data order ------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0, 1, 37, 99])
def test_constant_schedule(t: int) -> None:
    assert lr_factor(ScheduleConfig(kind="constant"), 1e-3, 100)(t) == 1.0


@pytest.mark.parametrize(("t", "min_lr"), [(0, 0.0), (25, 0.0), (50, 1e-4), (75, 1e-4), (100, 0.0), (130, 1e-4)])
def test_cosine_schedule_matches_the_closed_form(t: int, min_lr: float) -> None:
    base, total = 1e-3, 100
    factor = lr_factor(ScheduleConfig(kind="cosine", min_lr=min_lr), base, total)(t)
    lr = min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, total) / total))
    assert factor * base == pytest.approx(lr, rel=1e-12, abs=1e-18)


@pytest.mark.parametrize(("t", "power"), [(0, 0.9), (10, 0.9), (60, 2.0), (99, 0.9)])
def test_poly_schedule_matches_the_closed_form(t: int, power: float) -> None:
    factor = lr_factor(ScheduleConfig(kind="poly", power=power), 1e-2, 100)(t)
    assert factor == pytest.approx((1 - t / 100) ** power, rel=1e-12)


def test_linear_warmup_then_constant() -> None:
    factor = lr_factor(ScheduleConfig(kind="constant", warmup_iterations=4), 1e-3, 100)
    assert [factor(t) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(("items", "batch"), [(10, 3), (12, 4), (1, 6)])
def test_epoch_batches_cover_every_item_once_and_depend_only_on_seed_and_epoch(items: int, batch: int) -> None:
    batches = epoch_batches(items, batch, seed=5, epoch=2)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(items))
    assert [len(b) for b in batches[:-1]] == [batch] * (len(batches) - 1)
    assert batches == epoch_batches(items, batch, seed=5, epoch=2)
    if items > 3:
        assert batches != epoch_batches(items, batch, seed=5, epoch=3)
        assert batches != epoch_batches(items, batch, seed=6, epoch=2)


# -- optimiser, devices, precision ---------------------------------------------------------------------
def _small_parts(space: str = "lomix"):
    import fusionsearch as fs

    torch.manual_seed(0)
    model = fs.build_model("small_unet", num_classes=3, base_channels=4, depth=2, num_outputs=3)
    criterion = fs.build_criterion(space, 3, 3, 2)
    return model, criterion


def test_one_adamw_over_model_and_criterion() -> None:
    model, criterion = _small_parts()
    optimizer = build_optimizer(OptimConfig(lr=2e-4, weight_decay=3e-4), model, criterion)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert len(optimizer.param_groups) == 1
    grouped = {id(p) for p in optimizer.param_groups[0]["params"]}
    expected = {id(p) for p in model.parameters()} | {id(p) for p in criterion.parameters()}
    assert grouped == expected
    assert optimizer.param_groups[0]["lr"] == 2e-4 and optimizer.param_groups[0]["weight_decay"] == 3e-4


def test_separate_group_for_the_loss_weights() -> None:
    model, criterion = _small_parts()
    config = OptimConfig(lr=1e-4, weight_decay=1e-4, loss_weights={"lr": 1e-2, "weight_decay": 0.0})
    optimizer = build_optimizer(config, model, criterion)
    assert len(optimizer.param_groups) == 2
    main, weights = optimizer.param_groups
    assert {id(p) for p in weights["params"]} == {id(p) for p in criterion.weighting.parameters()}
    assert (weights["lr"], weights["weight_decay"]) == (1e-2, 0.0)
    assert (main["lr"], main["weight_decay"]) == (1e-4, 1e-4)
    everything = {id(p) for p in model.parameters()} | {id(p) for p in criterion.parameters()}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == everything


@pytest.mark.parametrize(
    ("amp", "enabled", "dtype", "scaler"),
    [("auto", False, torch.float32, False), ("off", False, torch.float32, False),
     ("bf16", True, torch.bfloat16, False), ("fp16", True, torch.float16, False)],
)
def test_amp_settings_on_cpu(amp: str, enabled: bool, dtype: torch.dtype, scaler: bool) -> None:
    settings = amp_settings(amp, torch.device("cpu"))
    assert (settings.enabled, settings.dtype, settings.use_scaler) == (enabled, dtype, scaler)


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(FusionSearchError, match="CUDA is not available"):
            resolve_device("cuda")


# -- checkpoints -----------------------------------------------------------------------------------------
def test_rng_state_round_trip(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1)  # move away from the seeded start
    save_checkpoint({"model": {}, "rng": capture_rng_state()}, tmp_path / "c.pt")
    expected = (random.random(), np.random.rand(5).tolist(), torch.rand(5).tolist(), np.random.randn())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert (random.random(), np.random.rand(5).tolist(), torch.rand(5).tolist(), np.random.randn()) == expected


def test_checkpoint_write_is_atomic_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "ck" / "last.pt"
    save_checkpoint({"model": {"w": torch.arange(4.0)}}, path)
    save_checkpoint({"model": {"w": torch.arange(8.0)}}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.arange(8.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.randn(1000)}}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(FusionSearchError, match="truncated"):
        load_checkpoint(path)
    with pytest.raises(FusionSearchError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_disk_full_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """A real write failure: the child process may not grow any file beyond 64 KiB (RLIMIT_FSIZE)."""
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.arange(16.0)}}, path)
    before = path.read_bytes()
    script = textwrap.dedent(
        f"""
        import resource, sys, torch
        from fusionsearch.checkpoint import save_checkpoint, CheckpointWriteError
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        try:
            save_checkpoint({{"model": {{"w": torch.zeros(100_000)}}}}, {str(path)!r})
        except CheckpointWriteError as exc:
            print(exc)
            sys.exit(3)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert "intact" in done.stdout and str(path) in done.stdout
    assert path.read_bytes() == before
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.arange(16.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # the partial temp file was removed


# -- the trainer on real (tiny) data ------------------------------------------------------------------
@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantoms") / "synapse"
    make_synapse(root, cases=3, test_cases=1, slices=6, size=32, seed=0, progress=False)
    return root


def _recipe(root: Path, **overrides):
    return load_recipe("demo", {**_recipe_overrides(root), "epochs": 2, **overrides})


def _trainer(recipe, run_dir: Path, train_set=None, on_epoch_end=None) -> Trainer:
    train_set = train_set if train_set is not None else build_split(recipe, "train")
    torch.manual_seed(recipe.seed)
    model = build_model_for(recipe, train_set.num_classes)
    criterion = build_criterion_for(recipe, model, train_set.num_classes)
    return Trainer(
        recipe=recipe,
        model=model,
        criterion=criterion,
        train_set=train_set,
        run_dir=run_dir,
        device=torch.device("cpu"),
        on_epoch_end=on_epoch_end,
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_nan_loss_stops_naming_the_term_and_keeps_the_last_good_checkpoint(phantom_root: Path, tmp_path: Path):
    recipe = _recipe(phantom_root)
    snapshot: dict[str, str] = {}

    def blow_up_heads(epoch: int, metrics: dict, checkpoint_dir: Path) -> None:
        # After epoch 1 is safely checkpointed, scale the output heads so that the product of all four
        # scales overflows float32 (|logit| ~ 1e11 -> 1e44) while sums and 3-products stay finite.
        snapshot["sha"] = _sha(checkpoint_dir / "last.pt")
        with torch.no_grad():
            for parameter in trainer.model.heads.parameters():
                parameter.mul_(1e11)

    trainer = _trainer(recipe, tmp_path, on_epoch_end=blow_up_heads)
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit()
    message = str(info.value)
    assert "mul(0,1,2,3)" in message
    assert "add(0,1)" not in message and "P3 (" not in message
    assert "epoch 2" in message and "kept unchanged" in message
    last = tmp_path / "checkpoints" / "last.pt"
    assert _sha(last) == snapshot["sha"]
    state = load_checkpoint(last)
    assert state["state"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


class _InterruptAt(Dataset):
    """The real training split, raising a real SIGINT while the ``at``-th item of the run is fetched."""

    def __init__(self, base: Dataset, at: int) -> None:
        self.base, self.at, self.fetched = base, at, 0
        self.num_classes = base.num_classes

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        self.fetched += 1
        if self.fetched == self.at:
            signal.raise_signal(signal.SIGINT)
        return self.base[index]


def test_ctrl_c_saves_mid_epoch_and_resume_is_bit_for_bit(phantom_root: Path, tmp_path: Path) -> None:
    recipe = _recipe(phantom_root, epochs=2)
    reference = _trainer(recipe, tmp_path / "reference")
    reference.fit()

    train_set = build_split(recipe, "train")  # 12 slices, batch 4: 3 steps per epoch
    interrupted = _trainer(recipe, tmp_path / "run", train_set=_InterruptAt(train_set, at=len(train_set) + 6))
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    # the signal came while epoch 2's second batch was loading: that batch is dropped (and reloaded on
    # resume), so the checkpoint holds epoch 1 plus one step
    assert saved["state"]["epoch"] == 1 and saved["state"]["step_in_epoch"] == 1

    resumed = _trainer(recipe, tmp_path / "run")
    result = resumed.fit(resume=True)
    assert result.epochs == 2
    for name, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    for name, value in reference.criterion.state_dict().items():
        assert torch.equal(value, resumed.criterion.state_dict()[name]), name
    assert [row["train_loss"] for row in reference.state.history] == [row["train_loss"] for row in result.history]
    assert reference.state.term_weights == resumed.state.term_weights


def test_terms_csv_holds_every_term_every_epoch(phantom_root: Path, tmp_path: Path) -> None:
    import csv

    trainer = _trainer(_recipe(phantom_root, epochs=2), tmp_path)
    trainer.fit()
    with open(tmp_path / "terms.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    terms = trainer.criterion.terms
    assert len(terms) == 48
    assert [(int(r["epoch"]), r["term"]) for r in rows] == [(e, t) for e in range(3) for t in terms]
    initial = [float(r["weight"]) for r in rows if r["epoch"] == "0"]
    assert initial == pytest.approx([math.log(2)] * 48, rel=1e-6)  # softplus(0) = ln 2
    final = torch.nn.functional.softplus(trainer.criterion.weighting.alpha.detach()).tolist()
    assert [float(r["weight"]) for r in rows if r["epoch"] == "2"] == pytest.approx(final, rel=1e-6)
    assert all(r["loss"] == "" for r in rows if r["epoch"] == "0")
    assert all(math.isfinite(float(r["loss"])) for r in rows if r["epoch"] != "0")


def test_bf16_autocast_on_cpu_trains(phantom_root: Path, tmp_path: Path) -> None:
    trainer = _trainer(_recipe(phantom_root, epochs=1, amp="bf16"), tmp_path)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    result = trainer.fit()
    assert math.isfinite(result.history[0]["train_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


def test_checkpoint_write_failure_in_training_reports_the_kept_checkpoint(phantom_root: Path, tmp_path: Path):
    """Disk full during an epoch-end checkpoint, for real: RLIMIT_FSIZE in a child process resuming the run."""
    recipe = _recipe(phantom_root, epochs=1)
    _trainer(recipe, tmp_path).fit()
    last = tmp_path / "checkpoints" / "last.pt"
    before = _sha(last)
    limit = last.stat().st_size // 2
    script = textwrap.dedent(
        f"""
        import resource, sys, torch
        from pathlib import Path
        from fusionsearch.recipe import load_recipe
        from fusionsearch.runner import build_split, build_model_for, build_criterion_for
        from fusionsearch.train import Trainer
        from fusionsearch.checkpoint import CheckpointWriteError
        recipe = load_recipe("demo", {dict(_recipe_overrides(phantom_root), epochs=2)!r})
        data = build_split(recipe, "train")
        model = build_model_for(recipe, data.num_classes)
        criterion = build_criterion_for(recipe, model, data.num_classes)
        trainer = Trainer(recipe=recipe, model=model, criterion=criterion, train_set=data,
                          run_dir=Path({str(tmp_path)!r}), device=torch.device("cpu"))
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        try:
            trainer.fit(resume=True)
        except CheckpointWriteError as exc:
            print(exc)
            sys.exit(3)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "intact" in done.stdout and "--resume" in done.stdout
    assert _sha(last) == before
    assert load_checkpoint(last)["state"]["epoch"] == 1
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".")]
    assert issubclass(CheckpointWriteError, FusionSearchError)


def _recipe_overrides(root: Path) -> dict:
    return {
        "data.root": str(root),
        "data.size": 32,
        "model.options.base_channels": 4,
        "model.options.depth": 3,
        "batch_size": 4,
        "evaluation.size": 32,
    }


def test_loader_workers_do_not_change_the_result(phantom_root: Path, tmp_path: Path) -> None:
    """Augmentation depends on (seed, epoch, index) only, so worker processes see the same samples."""
    in_process = _trainer(_recipe(phantom_root, epochs=2, space="last_layer"), tmp_path / "w0")
    in_process.fit()
    with_workers = _trainer(_recipe(phantom_root, epochs=2, space="last_layer", num_workers=2), tmp_path / "w2")
    with_workers.fit()
    for name, value in in_process.model.state_dict().items():
        assert torch.equal(value, with_workers.model.state_dict()[name]), name


def test_iterations_budget_and_cosine_schedule_in_training(phantom_root: Path, tmp_path: Path) -> None:
    recipe = _recipe(
        phantom_root, epochs=None, iterations=4, space="last_layer", **{"schedule.kind": "cosine", "optim.lr": 1e-3}
    )
    trainer = _trainer(recipe, tmp_path)
    result = trainer.fit()
    # 12 slices / batch 4 = 3 steps per epoch: 4 iterations = one full epoch + one step
    assert [row["iteration"] for row in result.history] == [3, 4]
    for row in result.history:  # the learning rate after `iteration` scheduler steps, from the closed form
        expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * row["iteration"] / 4))
        assert row["lr"] == pytest.approx(expected, abs=1e-12)
