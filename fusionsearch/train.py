"""The training loop: plain PyTorch, resumable bit for bit, honest about failures.

One AdamW trains the model and the criterion together (the criterion's parameters are the fusion
operators' and the loss weighting's), as the LoMix reference does. Every epoch the trainer logs
each term's effective weight and mean loss (``terms.csv`` + TensorBoard), validates through a
callback, and writes checkpoints atomically (``checkpoints/last.pt`` every epoch, ``best.pt`` when
validation improves). Ctrl-C finishes the current step, writes ``last.pt`` and stops; ``--resume``
then continues exactly where it stopped: the data order comes from a per-epoch seeded generator,
augmentation from ``dataset.set_epoch(epoch)``, and every random generator's state is saved.

A non-finite loss stops training with a message naming the terms that went non-finite; the last
good checkpoint is left as it was.
"""

from __future__ import annotations

import csv
import math
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from fusionsearch.allocator import keep_freed_memory
from fusionsearch.atomic import atomic_path
from fusionsearch.checkpoint import (
    BEST,
    LAST,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from fusionsearch.errors import FusionSearchError
from fusionsearch.recipe import OptimConfig, Recipe, ScheduleConfig

CHECKPOINT_FORMAT = 1

ValidateFn = Callable[[nn.Module, nn.Module], dict[str, float]]
EpochCallback = Callable[[int, dict[str, Any], Path], None]


class TrainingDiverged(FusionSearchError):
    """The loss became NaN or infinite; the message names the terms and the checkpoint kept."""


# -- set-up helpers ------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) so that a run is reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA if available, else MPS, else CPU; an unavailable explicit device is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FusionSearchError(
            f"The recipe asks for device '{name}' but CUDA is not available here. Use --set device=auto or cpu."
        )
    return device


@dataclass(frozen=True)
class AmpSettings:
    enabled: bool
    dtype: torch.dtype
    use_scaler: bool


def amp_settings(amp: str, device: torch.device) -> AmpSettings:
    """Mixed precision: ``auto`` = bf16 (or fp16 + loss scaling) on CUDA, off on CPU."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return AmpSettings(False, torch.float32, False)
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "bf16":
        return AmpSettings(True, torch.bfloat16, False)
    return AmpSettings(True, torch.float16, device.type == "cuda")


def loss_weight_parameters(criterion: nn.Module) -> list[nn.Parameter]:
    """The learnable loss weights (the criterion's ``weighting`` module), if any."""
    weighting = getattr(criterion, "weighting", None)
    return [p for p in weighting.parameters() if p.requires_grad] if isinstance(weighting, nn.Module) else []


def build_optimizer(config: OptimConfig, model: nn.Module, criterion: nn.Module) -> torch.optim.AdamW:
    """One AdamW over model + criterion; the loss weights get their own group when the recipe asks."""
    weights = loss_weight_parameters(criterion)
    separate = config.loss_weights.lr is not None or config.loss_weights.weight_decay is not None
    weight_ids = {id(p) for p in weights} if separate else set()
    main = [p for p in (*model.parameters(), *criterion.parameters()) if p.requires_grad and id(p) not in weight_ids]
    groups: list[dict[str, Any]] = [{"params": main}]
    if separate and weights:
        group: dict[str, Any] = {"params": weights}
        if config.loss_weights.lr is not None:
            group["lr"] = config.loss_weights.lr
        if config.loss_weights.weight_decay is not None:
            group["weight_decay"] = config.loss_weights.weight_decay
        groups.append(group)
    return torch.optim.AdamW(
        groups, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas, eps=config.eps
    )


def lr_factor(schedule: ScheduleConfig, base_lr: float, total_iterations: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at iteration ``t`` (0-based), for ``LambdaLR``."""
    floor = min(1.0, schedule.min_lr / base_lr) if base_lr > 0 else 0.0
    warmup = schedule.warmup_iterations
    span = max(1, total_iterations - warmup)

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        progress = min(1.0, (t - warmup) / span)
        if schedule.kind == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule.kind == "poly":
            return max(floor, (1.0 - progress) ** schedule.power)
        return 1.0

    return factor


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled batches of one epoch, a pure function of (seed, epoch): resumable without state."""
    generator = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    order = torch.randperm(num_items, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, num_items, batch_size)]


def write_csv_atomic(path: Path, rows: list[dict[str, Any]], fieldnames: list[str]) -> None:
    """Write a CSV through a temporary file + ``os.replace`` so readers never see half a file."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# -- state --------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Everything besides module/optimiser states that a resumed run needs."""

    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # >0 only in a checkpoint written on interrupt
    iteration: int = 0
    loss_sum: float = 0.0
    term_loss_sum: torch.Tensor | None = None
    best_epoch: int | None = None
    best_val: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    term_weights: list[list[float]] = field(default_factory=list)  # row e: weights after epoch e (0 = init)
    term_losses: list[list[float]] = field(default_factory=list)  # row e-1: mean losses during epoch e

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "iteration": self.iteration,
            "loss_sum": self.loss_sum,
            "term_loss_sum": self.term_loss_sum,
            "best_epoch": self.best_epoch,
            "best_val": self.best_val,
            "history": self.history,
            "term_weights": torch.tensor(self.term_weights, dtype=torch.float64),
            "term_losses": torch.tensor(self.term_losses, dtype=torch.float64),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        return cls(
            epoch=int(data["epoch"]),
            step_in_epoch=int(data["step_in_epoch"]),
            iteration=int(data["iteration"]),
            loss_sum=float(data["loss_sum"]),
            term_loss_sum=data["term_loss_sum"],
            best_epoch=data["best_epoch"],
            best_val=data["best_val"],
            history=list(data["history"]),
            term_weights=data["term_weights"].tolist(),
            term_losses=data["term_losses"].tolist(),
        )


@dataclass
class TrainResult:
    """What the runner needs after training: the selected checkpoint and the history."""

    best_checkpoint: Path
    last_checkpoint: Path
    best_epoch: int | None
    best_val: float | None
    epochs: int
    history: list[dict[str, Any]]


class _InterruptFlag:
    """Turns the first Ctrl-C into a request honoured at the next step boundary (second one aborts)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> _InterruptFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)


# -- the trainer --------------------------------------------------------------------------------
class Trainer:
    """Trains ``model`` with ``criterion`` on ``train_set`` as the recipe says; see the module doc."""

    def __init__(
        self,
        *,
        recipe: Recipe,
        model: nn.Module,
        criterion: nn.Module,
        train_set: Dataset,
        run_dir: Path,
        device: torch.device,
        validate: ValidateFn | None = None,
        on_epoch_end: EpochCallback | None = None,
        checkpoint_extra: dict[str, Any] | None = None,
    ) -> None:
        self.recipe = recipe
        self.model = model.to(device)
        self.criterion = criterion.to(device)
        self.train_set = train_set
        self.run_dir = Path(run_dir)
        self.device = device
        self.validate = validate
        self.on_epoch_end = on_epoch_end
        self.checkpoint_extra = checkpoint_extra or {}
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.amp = amp_settings(recipe.amp, device)
        self.optimizer = build_optimizer(recipe.optim, self.model, self.criterion)
        if len(train_set) == 0:  # type: ignore[arg-type]
            raise FusionSearchError("The training split is empty: check data.root, data.fraction and the lists.")
        self.batches_per_epoch = math.ceil(len(train_set) / recipe.batch_size)  # type: ignore[arg-type]
        self.total_iterations = recipe.max_iterations(self.batches_per_epoch)
        self.num_epochs = recipe.num_epochs(self.batches_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(recipe.schedule, recipe.optim.lr, self.total_iterations)
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp.use_scaler)
        self.terms: list[str] = list(getattr(criterion, "terms", []))
        self.state = TrainState()
        self._epoch_seconds = 0.0
        self._saved: tuple[int, int] | None = None  # (epochs, steps) in the last.pt written by this session

    # -- checkpoints ------------------------------------------------------------------------------
    def _checkpoint(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "criterion": self.criterion.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": self.state.to_dict(),
            "rng": capture_rng_state(),
            "terms": self.terms,
            **self.checkpoint_extra,
        }

    def _save_last(self, path: Path) -> None:
        save_checkpoint(self._checkpoint(), path)
        self._saved = (self.state.epoch, self.state.step_in_epoch)

    def _best_checkpoint(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "criterion": self.criterion.state_dict(),
            "epoch": self.state.epoch,
            "val_dice": self.state.best_val,
            "terms": self.terms,
            **self.checkpoint_extra,
        }

    def restore(self, path: Path) -> None:
        """Load a ``last.pt`` written by this trainer: modules, optimiser, RNG streams, history."""
        # on the CPU: RNG states must stay CPU tensors; load_state_dict copies onto the modules' device
        data = load_checkpoint(path, map_location="cpu")
        if data.get("format") != CHECKPOINT_FORMAT or "optimizer" not in data:
            raise FusionSearchError(f"{path} is not a resumable fusionsearch checkpoint (need last.pt of a run).")
        if list(data.get("terms", [])) != self.terms:
            raise FusionSearchError(
                f"{path} was trained with a different set of terms ({len(data.get('terms', []))} vs "
                f"{len(self.terms)} now): the recipe's space changed. Resume with the run's own recipe.yaml."
            )
        self.model.load_state_dict(data["model"])
        self.criterion.load_state_dict(data["criterion"])
        self.optimizer.load_state_dict(data["optimizer"])
        self.scheduler.load_state_dict(data["scheduler"])
        self.scaler.load_state_dict(data["scaler"])
        self.state = TrainState.from_dict(data["state"])
        restore_rng_state(data["rng"])

    # -- logging ------------------------------------------------------------------------------------
    def _effective_weights(self, fallback: torch.Tensor | None = None) -> list[float]:
        getter = getattr(self.criterion, "effective_weights", None)
        weights = getter() if callable(getter) else fallback
        if weights is None:
            return [float("nan")] * len(self.terms)
        return [float(w) for w in weights.detach().float().cpu().tolist()]

    def _write_logs(self) -> None:
        history_fields = ["epoch", "iteration", "train_loss", "lr", "seconds", "validated", "val_dice"]
        for row in self.state.history:
            history_fields += [k for k in row if k not in history_fields]
        write_csv_atomic(self.run_dir / "history.csv", self.state.history, history_fields)
        rows = []
        for epoch, weights in enumerate(self.state.term_weights):
            losses = self.state.term_losses[epoch - 1] if epoch > 0 else [float("nan")] * len(self.terms)
            for term, weight, loss in zip(self.terms, weights, losses, strict=True):
                rows.append({"epoch": epoch, "term": term, "weight": weight, "loss": "" if epoch == 0 else loss})
        write_csv_atomic(self.run_dir / "terms.csv", rows, ["epoch", "term", "weight", "loss"])

    def _log_tensorboard(self, writer: Any, epoch: int, metrics: dict[str, Any]) -> None:
        keys = ["train_loss", "lr"] + (["val_dice", "val_hd95"] if metrics.get("validated") else [])
        for key in keys:
            value = metrics.get(key)
            if value is not None and math.isfinite(float(value)):
                writer.add_scalar(f"train/{key}", float(value), epoch)
        weights = self.state.term_weights[epoch]
        losses = self.state.term_losses[epoch - 1]
        for term, weight, loss in zip(self.terms, weights, losses, strict=True):
            writer.add_scalar(f"weight/{term}", weight, epoch)
            writer.add_scalar(f"loss/{term}", loss, epoch)
        writer.flush()

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self, *, resume: bool = False) -> TrainResult:
        """Train to the recipe's length (continuing from ``last.pt`` when ``resume``)."""
        from torch.utils.tensorboard import SummaryWriter

        if self.device.type == "cpu":
            # reuse freed CPU memory instead of page-faulting it afresh every step (fusionsearch.allocator)
            keep_freed_memory()
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        last_path = self.checkpoint_dir / LAST
        best_path = self.checkpoint_dir / BEST
        if resume:
            if not last_path.is_file():
                raise FusionSearchError(
                    f"Nothing to resume in {self.run_dir}: {last_path} does not exist. Run without --resume."
                )
            self.restore(last_path)
        if not self.state.term_weights:
            self.state.term_weights.append(self._effective_weights())
        writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.state.epoch + 1)
        seed = self.recipe.data_seed()
        bar = tqdm(
            total=self.total_iterations,
            initial=self.state.iteration,
            desc=f"train {self.recipe.run_name}",
            unit="step",
            dynamic_ncols=True,
            disable=None,
        )
        try:
            with _InterruptFlag() as interrupt:
                while self.state.epoch < self.num_epochs and self.state.iteration < self.total_iterations:
                    self._train_epoch(self.state.epoch, seed, bar, interrupt, last_path)
                    self._end_epoch(writer, last_path, best_path)
                    if interrupt.requested:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            bar.close()
            where = (
                f"it holds {self._saved[0]} completed epoch(s) and {self._saved[1]} step(s) of the next"
                if self._saved
                else "no checkpoint was written in this session"
            )
            print(f"\nInterrupted. Last checkpoint: {last_path} ({where}); continue with --resume.")
            raise
        finally:
            bar.close()
            writer.close()
        if not best_path.is_file():  # no validation ran: the final weights are the selection
            save_checkpoint(self._best_checkpoint(), best_path)
        return TrainResult(
            best_checkpoint=best_path,
            last_checkpoint=last_path,
            best_epoch=self.state.best_epoch if self.state.best_epoch is not None else self.state.epoch,
            best_val=self.state.best_val,
            epochs=self.state.epoch,
            history=self.state.history,
        )

    def _train_epoch(self, epoch: int, seed: int, bar: Any, interrupt: _InterruptFlag, last_path: Path) -> None:
        recipe = self.recipe
        set_epoch = getattr(self.train_set, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        batches = epoch_batches(len(self.train_set), recipe.batch_size, seed, epoch)  # type: ignore[arg-type]
        remaining = self.total_iterations - self.state.iteration
        batches = batches[self.state.step_in_epoch :][: max(0, remaining)]
        loader = DataLoader(
            self.train_set,
            batch_sampler=batches,
            num_workers=recipe.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(int(seed) * 7_919 + epoch),
        )
        self.model.train()
        self.criterion.train()
        if self.state.term_loss_sum is None:
            self.state.term_loss_sum = torch.zeros(len(self.terms), dtype=torch.float64)
        term_loss_sum = self.state.term_loss_sum.to(self.device)
        epoch_start = time.perf_counter()
        for batch in loader:
            if interrupt.requested:
                break
            out = self._step(batch, epoch)
            term_loss_sum += out.losses.detach().to(torch.float64)
            self.state.step_in_epoch += 1
            self.state.iteration += 1
            self.scheduler.step()
            bar.update(1)
            steps = self.state.step_in_epoch
            bar.set_postfix(epoch=f"{epoch + 1}/{self.num_epochs}", loss=f"{self.state.loss_sum / steps:.4f}")
        self.state.term_loss_sum = term_loss_sum.cpu()
        self._epoch_seconds = time.perf_counter() - epoch_start
        if interrupt.requested:
            self._save_last(last_path)
            raise KeyboardInterrupt

    def _step(self, batch: dict[str, Any], epoch: int) -> Any:
        images = batch["image"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp.dtype, enabled=self.amp.enabled):
            logits = self.model(images)
            out = self.criterion(logits, labels)
        loss = float(out.total.detach())
        if not math.isfinite(loss):
            self._diverged(out, epoch, loss)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.total).backward()
        if self.recipe.optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.recipe.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state.loss_sum += loss
        return out

    def _diverged(self, out: Any, epoch: int, loss: float) -> None:
        losses = out.losses.detach().float().cpu()
        weights = out.weights.detach().float().cpu()
        names = list(out.terms)
        bad_loss = [f"{names[i]} (loss {losses[i].item()})" for i in range(len(names)) if not torch.isfinite(losses[i])]
        bad_weight = [
            f"{names[i]} (weight {weights[i].item()})" for i in range(len(names)) if not torch.isfinite(weights[i])
        ]
        culprits = bad_loss + bad_weight
        shown = ", ".join(culprits[:8]) + (f" and {len(culprits) - 8} more" if len(culprits) > 8 else "")
        what = f"in term(s) {shown}" if culprits else "in the weighting's regulariser (every term is finite)"
        last = self.checkpoint_dir / LAST
        kept = (
            f"The last good checkpoint {last} (end of epoch {self.state.epoch}) was kept unchanged"
            if last.is_file()
            else "No checkpoint had been written yet"
        )
        raise TrainingDiverged(
            f"Training stopped at epoch {epoch + 1}, iteration {self.state.iteration + 1}: the loss became "
            f"non-finite ({loss}) {what}. {kept}. Lower optim.lr, set optim.grad_clip, use amp: off, or drop the "
            f"operator that overflows (e.g. 'mul' of many scales) from the space."
        )

    def _end_epoch(self, writer: Any, last_path: Path, best_path: Path) -> None:
        state = self.state
        steps = max(1, state.step_in_epoch)
        epoch = state.epoch + 1
        term_means = (state.term_loss_sum / steps).tolist() if state.term_loss_sum is not None else []
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "iteration": state.iteration,
            "train_loss": state.loss_sum / steps,
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": round(self._epoch_seconds, 3),
        }
        due = epoch % self.recipe.evaluation.every == 0 or epoch >= self.num_epochs
        due = due or state.iteration >= self.total_iterations
        validated = self.validate is not None and due
        if validated:
            metrics.update(self.validate(self.model, self.criterion))  # type: ignore[misc]
            self.model.train()
        elif state.history:  # carry the last known value so per-epoch schedulers always see one
            metrics["val_dice"] = state.history[-1].get("val_dice")
        metrics["validated"] = int(validated)
        improved = validated and metrics.get("val_dice") is not None and (
            state.best_val is None or float(metrics["val_dice"]) > state.best_val
        )
        state.epoch = epoch
        state.step_in_epoch = 0
        state.loss_sum = 0.0
        state.term_loss_sum = None
        state.history.append(metrics)
        state.term_losses.append(term_means)
        state.term_weights.append(self._effective_weights())
        if improved:
            state.best_val = float(metrics["val_dice"])
            state.best_epoch = epoch
        if improved or self.validate is None:
            if self.validate is None:
                state.best_epoch = epoch
            save_checkpoint(self._best_checkpoint(), best_path)  # before last.pt: see docs/recipes.md
        metrics["best_val_dice"] = state.best_val
        self._save_last(last_path)
        self._write_logs()
        self._log_tensorboard(writer, epoch, metrics)
        if self.on_epoch_end is not None:
            self.on_epoch_end(epoch, dict(metrics), self.checkpoint_dir)
