"""Seconds per training step of pvt_emcad under last-layer-only, deep supervision and LoMix.

One step = forward, criterion (mixing + per-term losses + weighting), backward and the AdamW
update over model + criterion parameters: exactly what ``fusionsearch.train`` does per batch.
The spaces are timed round-robin (one step of each in turn, after warm-up), so background load on a
shared machine hits them alike. The table shows wall time (median and fastest step), process CPU
time per step, each as a ratio to last-layer-only, and the median of the ratios within a round
('paired'); with ``--threads 1`` the CPU time is the least sensitive to other load on the machine.
The process uses the CPU memory settings of the ``fusionsearch`` command (keep freed memory, huge
pages: see ``fusionsearch.allocator``); the first steps grow the heap, hence the warm-up.

    python benchmarks/train_step.py                       # B=6, 224x224, CPU, pvt_v2_b2
    python benchmarks/train_step.py --batch 2 --size 128 --encoder pvt_v2_b0 --repeats 3

Target (issue 4): LoMix <= 1.4x last-layer-only (goal 1.25x).
"""

from __future__ import annotations

import argparse
import statistics
import time

from fusionsearch.allocator import keep_freed_memory, use_huge_pages

# as the fusionsearch command does, before torch is imported (THP_MEM_ALLOC_ENABLE=0 to compare without)
HUGE_PAGES = use_huge_pages()

import torch  # noqa: E402

import fusionsearch as fs  # noqa: E402
from fusionsearch.recipe import OptimConfig  # noqa: E402
from fusionsearch.train import build_optimizer  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pvt_emcad")
    parser.add_argument("--encoder", default="pvt_v2_b2", help="encoder option of the model (pvt_v2_b0 is smaller)")
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=7, help="timed steps (rounds) per space")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps per space first (the heap grows then)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--spaces", nargs="+", default=["last_layer", "deep_supervision", "lomix"])
    return parser.parse_args()


class Setup:
    """Model, criterion and optimiser of one space, all built from the same seed."""

    def __init__(self, space: str, args: argparse.Namespace, device: torch.device) -> None:
        torch.manual_seed(0)
        self.space = space
        self.model = fs.build_model(args.model, num_classes=args.classes, in_channels=1, encoder=args.encoder)
        self.model.to(device).train()
        self.criterion = fs.build_criterion(space, self.model.num_outputs, args.classes, self.model.spatial_dims)
        self.criterion.to(device)
        self.optimizer = build_optimizer(OptimConfig(), self.model, self.criterion)
        self.terms = len(self.criterion.terms)
        self.times: list[float] = []  # wall seconds per step
        self.cpu: list[float] = []  # process CPU seconds per step (all threads)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        sync = torch.cuda.synchronize if images.device.type == "cuda" else (lambda: None)
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        out = self.criterion(self.model(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        self.optimizer.step()
        sync()
        return time.perf_counter() - start, time.process_time() - cpu_start


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # the trainer does the same on CPU (see fusionsearch.allocator); every setup gets it alike
    allocator = keep_freed_memory() if device.type == "cpu" else False
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 1, args.size, args.size, generator=generator).to(device)
    labels = torch.randint(0, args.classes, (args.batch, args.size, args.size), generator=generator).to(device)
    setups = [Setup(space, args, device) for space in args.spaces]
    for setup in setups:
        for _ in range(args.warmup):
            setup.step(images, labels)
    for _ in range(args.repeats):
        for setup in setups:
            wall, cpu = setup.step(images, labels)
            setup.times.append(wall)
            setup.cpu.append(cpu)

    print(
        f"{args.model} ({args.encoder}), B={args.batch}, {args.size}x{args.size}, C={args.classes}, "
        f"{device}, {torch.get_num_threads()} threads, keep_freed_memory={allocator}, huge_pages={HUGE_PAGES}, "
        f"median of {args.repeats} steps after {args.warmup} warm-up"
    )
    base = statistics.median(setups[0].times)
    base_min = min(setups[0].times)
    base_cpu = statistics.median(setups[0].cpu)
    print(
        f"{'space':<18} {'K':>3} {'wall med':>9} {'wall min':>9} {'cpu med':>8} "
        f"{'ratio (med)':>12} {'ratio (min)':>12} {'ratio (cpu)':>12} {'paired':>8}"
    )
    for setup in setups:
        median, fastest, cpu = statistics.median(setup.times), min(setup.times), statistics.median(setup.cpu)
        # each round times every space back to back: its own ratio cancels slow drifts of the machine
        paired = statistics.median(mine / first for mine, first in zip(setup.times, setups[0].times, strict=True))
        print(
            f"{setup.space:<18} {setup.terms:>3} {median:>9.3f} {fastest:>9.3f} {cpu:>8.3f} "
            f"{median / base:>11.2f}x {fastest / base_min:>11.2f}x {cpu / base_cpu:>11.2f}x {paired:>7.2f}x"
        )
    print(
        f"ratios are to {setups[0].space}; 'paired' is the median over rounds of the ratio within a round. "
        f"On a shared machine trust 'paired' and 'min' and, with --threads 1, 'cpu'"
    )


if __name__ == "__main__":
    main()
