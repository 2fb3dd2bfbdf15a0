"""Criterion benchmark: forward+backward time and peak memory of the multi-scale mixing loss.

Compares, for one batch of L logits (default L=4, the ``lomix`` space with 4 operators, K=48,
B=6, C=9, 224x224, float32, CPU):

criterion        ``fs.build_criterion(space)``: vectorised mixer + fused per-term loss + weighting
criterion_plain  the same with ``loss.fused: false`` (plain autograd per-term loss)
loss_only        the fused per-term loss alone on K given logits stacked as [K,B,C,H,W] (no mixing)
loss_only_plain  the same with the plain autograd per-term loss
naive            a per-term Python loop: mix each term on its own, F.cross_entropy + one-hot Dice
floor            K separate single-term beta*CE + gamma*Dice losses with plain autograd on K given
                 logit tensors (no mixing; the one-hot target is built once and shared, so this
                 floor is as cheap as a per-term loss gets)

Every variant runs in a fresh Python process. Peak memory is the growth of the process's resident
set during the first forward+backward (the kernel's high-water mark is reset to the current RSS
just before it, via /proc/self/clear_refs), so it counts everything the step touches, including
the gradients of the inputs. Time is the median over ``--repeats`` steps after ``--warmup`` steps:
wall-clock, and the process's CPU time (user + system, all threads), which is less disturbed by
other processes on a shared machine.

    python benchmarks/cmm.py                      # the full-size table (a few minutes on 2 cores)
    python benchmarks/cmm.py --batch 2 --size 64 --repeats 3
    python benchmarks/cmm.py --threads 1          # most repeatable on a machine shared with other work
    python benchmarks/cmm.py --no-keep-freed-memory   # glibc's default allocator behaviour

With several threads on a busy machine, every parallel region waits for a descheduled thread, which
penalises variants made of many small operations (the floor, the naive loop) far more than others.

By default every variant's process first calls ``fusionsearch.allocator.keep_freed_memory()`` (as a
training process should): with glibc's defaults, tensors above a few tens of megabytes are mapped
afresh and page-faulted on every allocation, which costs about as much as the arithmetic and
varies from run to run with the history of the heap. ``--no-keep-freed-memory`` measures that
default behaviour; either way all variants run under the same setting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

VARIANTS = ("criterion", "criterion_plain", "loss_only", "loss_only_plain", "naive", "floor")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default="lomix", help="bundled space name or YAML path (default lomix)")
    parser.add_argument("--scales", type=int, default=4, help="number of scales L")
    parser.add_argument("--classes", type=int, default=9, help="number of classes C")
    parser.add_argument("--batch", type=int, default=6, help="batch size B")
    parser.add_argument("--size", type=int, default=224, help="image side (square 2D)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward+backward steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="call fusionsearch.allocator.keep_freed_memory() in every variant's process (default: on)",
    )
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# -- memory -------------------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)


# -- the variants (each returns a step: forward + backward of one batch) --------------------------
def _dice_one_term(logits, onehot):
    import torch

    probs = torch.softmax(logits, dim=1)
    dims = (0, *range(2, logits.dim()))
    intersect = (probs * onehot).sum(dims)
    denominator = (probs * probs).sum(dims) + (onehot * onehot).sum(dims)
    return 1 - ((2 * intersect + 1e-5) / (denominator + 1e-5)).mean()


def _naive_mixer(terms, num_classes: int):
    """Per-term operators written plainly (own parameters): one term = one Python call."""
    import torch
    from torch import nn

    sizes = sorted({len(t.scales) for t in terms if not t.is_original})
    awf_scores = nn.ModuleDict({str(k): nn.ModuleList(nn.Conv2d(num_classes, 1, 1) for _ in range(k)) for k in sizes})
    concat_convs = nn.ModuleDict(
        {
            t.name.replace(",", "_"): nn.Conv2d(len(t.scales) * num_classes, num_classes, 1)
            for t in terms
            if t.operator == "concat"
        }
    )

    def mix(term, logits):
        members = [logits[s] for s in term.scales]
        if term.is_original:
            return members[0]
        if term.operator == "add":
            return sum(members[1:], members[0])
        if term.operator == "mul":
            out = members[0]
            for member in members[1:]:
                out = out * member
            return out
        if term.operator == "awf":
            convs = awf_scores[str(len(members))]
            scores = torch.cat([conv(m) for conv, m in zip(convs, members, strict=True)], dim=1)
            attention = scores.softmax(dim=1)
            return sum(attention[:, j : j + 1] * m for j, m in enumerate(members))
        if term.operator == "concat":
            return concat_convs[term.name.replace(",", "_")](torch.cat(members, dim=1))
        raise ValueError(f"the naive loop does not know operator '{term.operator}'")

    return mix, nn.ModuleList([awf_scores, concat_convs])


def build_step(variant: str, args: argparse.Namespace) -> tuple[Callable[[], None], int]:
    import torch
    import torch.nn.functional as F

    import fusionsearch as fs
    from fusionsearch.loss import build_term_loss

    torch.manual_seed(0)
    space = fs.load_space(args.space)
    if variant in ("criterion_plain", "loss_only_plain"):
        space = space.model_copy(update={"loss": space.loss.model_copy(update={"fused": False})})
    criterion = fs.build_criterion(space, num_scales=args.scales, num_classes=args.classes, spatial_dims=2)
    terms = criterion.graph.terms
    k, b, c, side = len(terms), args.batch, args.classes, args.size
    beta, gamma = space.loss.ce, space.loss.dice
    target = torch.randint(0, c, (b, side, side))

    def scale_logits(count: int) -> list[torch.Tensor]:
        return [torch.randn(b, c, side, side).requires_grad_(True) for _ in range(count)]

    if variant in ("criterion", "criterion_plain"):
        logits = scale_logits(args.scales)

        def step() -> None:
            for item in logits:
                item.grad = None
            criterion.zero_grad(set_to_none=True)
            criterion(logits, target).total.backward()

    elif variant in ("loss_only", "loss_only_plain"):
        stacked = torch.randn(k, b, c, side, side).requires_grad_(True)
        term_loss = build_term_loss(space.loss)

        def step() -> None:
            stacked.grad = None
            term_loss(stacked, target).sum().backward()

    elif variant == "naive":
        logits = scale_logits(args.scales)
        mix, modules = _naive_mixer(terms, c)
        alpha = torch.zeros(k, requires_grad=True)

        def step() -> None:
            for item in logits:
                item.grad = None
            modules.zero_grad(set_to_none=True)
            alpha.grad = None
            total = 0
            for index, term in enumerate(terms):
                mixed = mix(term, logits)
                onehot = F.one_hot(target, c).permute(0, 3, 1, 2).float()
                loss = beta * F.cross_entropy(mixed, target) + gamma * _dice_one_term(mixed, onehot)
                total = total + F.softplus(alpha[index]) * loss
            total.backward()

    elif variant == "floor":
        given = scale_logits(k)

        def step() -> None:
            for item in given:
                item.grad = None
            onehot = F.one_hot(target, c).permute(0, 3, 1, 2).float()
            total = 0
            for item in given:
                total = total + beta * F.cross_entropy(item, target) + gamma * _dice_one_term(item, onehot)
            total.backward()

    else:
        raise ValueError(variant)
    return step, k


def run_worker(args: argparse.Namespace) -> dict:
    import torch

    from fusionsearch.allocator import keep_freed_memory

    allocator_kept = keep_freed_memory() if args.keep_freed_memory else False
    if args.threads:
        torch.set_num_threads(args.threads)
    step, k = build_step(args.worker, args)
    before_kb = _status_kb("VmRSS")
    _reset_peak_rss()
    started = time.perf_counter()
    step()
    first_s = time.perf_counter() - started
    peak_kb = _status_kb("VmHWM") - before_kb
    for _ in range(args.warmup):
        step()
    times, cpu_times = [], []
    for _ in range(args.repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    return {
        "variant": args.worker,
        "K": k,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "cpu_s": statistics.median(cpu_times),
        "first_s": first_s,
        "peak_mb": peak_kb / 1024,
        "threads": torch.get_num_threads(),
        "allocator_kept": allocator_kept,
    }


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", variant]
    for name in ("space", "scales", "classes", "batch", "size", "repeats", "warmup", "threads"):
        command += [f"--{name}", str(getattr(args, name))]
    command.append("--keep-freed-memory" if args.keep_freed_memory else "--no-keep-freed-memory")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"variant '{variant}' failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_table(results: list[dict]) -> str:
    floor = next((r for r in results if r["variant"] == "floor"), None)
    header = (
        f"{'variant':<16} {'fwd+bwd median s':>16} {'(min..max)':>16} {'x floor':>8} "
        f"{'CPU s':>7} {'x floor':>8} {'peak MB':>8} {'x floor':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        time_ratio = f"{r['median_s'] / floor['median_s']:.2f}" if floor else "-"
        cpu_ratio = f"{r['cpu_s'] / floor['cpu_s']:.2f}" if floor else "-"
        memory_ratio = f"{r['peak_mb'] / floor['peak_mb']:.2f}" if floor else "-"
        spread = f"({r['min_s']:.3f}..{r['max_s']:.3f})"
        lines.append(
            f"{r['variant']:<16} {r['median_s']:>16.3f} {spread:>16} {time_ratio:>8} "
            f"{r['cpu_s']:>7.2f} {cpu_ratio:>8} {r['peak_mb']:>8.0f} {memory_ratio:>8}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0
    from tqdm import tqdm

    load_before = os.getloadavg()
    results = []
    for variant in tqdm(args.variants, desc="variants", unit="variant"):
        results.append(run_variant(variant, args))
    load_after = os.getloadavg()
    first = results[0]
    print(
        f"space={args.space} L={args.scales} K={first['K']} B={args.batch} C={args.classes} "
        f"{args.size}x{args.size} float32 CPU, torch threads={first['threads']}, "
        f"{args.repeats} timed steps after {args.warmup} warm-up"
    )
    if not args.keep_freed_memory:
        allocator = "default (glibc maps large blocks afresh and trims its heap)"
    elif all(r["allocator_kept"] for r in results):
        allocator = "keep_freed_memory() in every variant (freed memory reused, no page faults)"
    else:
        allocator = "keep_freed_memory() asked for but unavailable (no glibc): default allocator"
    print(f"allocator: {allocator}")
    print(format_table(results))
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
