"""Wall time of an N-trial sweep (1 and 2 concurrent trials) against the same runs in a plain loop.

Every variant trains the same N configurations of the shrunk demo recipe on Synapse-form phantoms
(the learning rates are given as points to try, and early stopping is switched off with a grace
period longer than the run), so the difference between a sweep and the loop is the sweep's own
cost: starting Ray or worker processes, shipping and persisting checkpoints, bookkeeping.

    python benchmarks/sweep.py                    # 8 trials, 2 epochs, 32 px phantoms
    python benchmarks/sweep.py --trials 4 --epochs 1 --backends ray
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

TINY = {
    "data.size": 32,
    "evaluation.size": 32,
    "evaluation.overlays": 0,
    "evaluation.test": False,
    "model.options": {"base_channels": 8, "depth": 2, "num_outputs": 3},
    "batch_size": 4,
    "space.tune": {},
    "space.operators": ["add", "mul"],
    "tune": {"optim.lr": {"loguniform": [1.0e-4, 1.0e-1]}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--size", type=int, default=32, help="phantom and training size in pixels")
    parser.add_argument("--backends", nargs="+", choices=["ray", "optuna"], default=["ray", "optuna"])
    parser.add_argument("--workdir", default=None, help="keep data and sweeps here (default: a temporary folder)")
    args = parser.parse_args()

    import torch

    import fusionsearch as fs
    from fusionsearch.data.phantoms import make_synapse
    from fusionsearch.sweeps.api import sweep

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fs-sweep-bench-"))
    data = make_synapse(workdir / "data", cases=4, test_cases=1, slices=8, size=args.size, progress=False,
                        overwrite=True)
    overrides = {**TINY, "data.size": args.size, "evaluation.size": args.size, "epochs": args.epochs,
                 "data.root": str(data)}
    rates = np.geomspace(1e-3, 3e-2, args.trials)
    points = [{"optim.lr": float(lr)} for lr in rates]
    no_early_stop = args.epochs + 1

    rows = []
    startup = None
    if "ray" in args.backends:  # what starting and stopping a local Ray costs on its own
        import ray

        start = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
        ray.shutdown()
        startup = time.perf_counter() - start
    # the plain loop: the same runs, one after the other, one thread each (a trial gets one CPU)
    torch.set_num_threads(1)
    base = fs.load_recipe("demo", overrides=overrides)
    fs.run(base.with_overrides(points[0]), run_dir=workdir / "loop" / "warm-up", progress=False)  # imports, caches
    start = time.perf_counter()
    for index, point in enumerate(points):
        fs.run(base.with_overrides(point), run_dir=workdir / "loop" / f"run{index}", progress=False)
    loop = time.perf_counter() - start
    rows.append(("plain loop (fs.run)", 1, loop))

    for backend in args.backends:
        for concurrent in (1, 2):
            options = {"max_concurrent": concurrent} if backend == "ray" else {"workers": concurrent}
            start = time.perf_counter()
            result = sweep(
                "demo",
                num_samples=args.trials,
                backend=backend,
                overrides=overrides,
                storage=workdir / "sweeps",
                name=f"{backend}-{concurrent}",
                grace_period=no_early_stop,
                points=points,
                verbose=False,
                **options,
            )
            wall = time.perf_counter() - start
            done = sum(1 for row in result.table if row["status"] == "completed")
            if done != args.trials:
                raise SystemExit(f"{backend} with {concurrent} concurrent: only {done}/{args.trials} trials completed")
            rows.append((f"{backend} sweep", concurrent, wall))

    load = os.getloadavg()
    print(f"\n{args.trials} trials x {args.epochs} epochs, demo recipe shrunk to {args.size} px, "
          f"{os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f}")
    header = (f"{'variant':<22} {'concurrent':>10} {'wall s':>8} {'s / trial':>10} {'overhead / trial s':>19} "
              f"{'excl. Ray start':>16}")
    print(header)
    print("-" * len(header))
    for name, concurrent, wall in rows:
        per_trial = wall / args.trials
        overhead = excluded = "-"
        if not name.startswith("plain"):
            overhead = f"{(wall - loop / concurrent) / args.trials:+.2f}"
            if name.startswith("ray") and startup is not None:
                excluded = f"{(wall - startup - loop / concurrent) / args.trials:+.2f}"
        print(f"{name:<22} {concurrent:>10} {wall:>8.1f} {per_trial:>10.2f} {overhead:>19} {excluded:>16}")
    if startup is not None:
        print(f"starting and stopping a local Ray alone: {startup:.1f} s")
    print("overhead / trial = (sweep wall - loop wall / concurrent) / trials: what the sweep machinery costs each "
          "trial beyond an ideal parallel speed-up of the loop")
    print(f"data and sweeps in {workdir}")


if __name__ == "__main__":
    main()
