"""What do the safe defaults (``fedsoup.defaults``) cost next to the merge itself?

Side by side in one run, on bench_merge's 16 models of 4 M float32 parameters:
the in-place soup; the fused Adam kernel called directly (no input checks, no
defaults: what the merge cost before them); ``measure_spreads`` alone (the pass both the scale-aware lr and the
ball guard need: the soup and every ``‖x_i − s‖²``, per key); the final ball check
(``‖w − s‖`` per key); and AME-Adam, 1 epoch, batch 1, with an explicit lr and with
``lr=None`` (both include the pass and the check).

Run: ``.venv/bin/python benchmarks/bench_defaults.py [--repeats 5]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fedsoup  # noqa: E402
from bench_merge import in_place_soup, interleaved_medians, make_models  # noqa: E402
from fedsoup import defaults, fused  # noqa: E402
from fedsoup.ball import measure_spreads  # noqa: E402
from fedsoup.options import MergeOptions  # noqa: E402
from fedsoup.plan import make_plan  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    models = make_models(16)
    params = sum(v.numel() for v in models[0].values())
    problem = make_plan(models, MergeOptions(optimizer="adam"))
    spreads = measure_spreads(problem)
    merged = fedsoup.merge(models, optimizer="adam")
    bare = make_plan(models, MergeOptions(optimizer="adam", lr=1e-5), path="fused")
    spec = bare.kernel
    cases = {
        "in-place soup": lambda: in_place_soup(models),
        "fused Adam kernel alone (no checks, no defaults)": lambda: fused.merge_fused(bare, spec)[0],
        "measure_spreads (soup + ‖x_i − s‖²)": lambda: measure_spreads(problem),
        "ball check (‖w − s‖)": lambda: spreads.ball(merged),
        "AME-Adam, 1 epoch, explicit lr": lambda: fedsoup.merge(models, optimizer="adam", lr=1e-5),
        "AME-Adam, 1 epoch, lr=None": lambda: fedsoup.merge(models, optimizer="adam"),
    }
    medians = interleaved_medians(cases, args.repeats)
    base = medians["in-place soup"]
    print(f"16 models x {params / 1e6:.2f} M float32 parameters, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved runs")
    for name, median in medians.items():
        print(f"  {name:50s} {median * 1e3:8.1f} ms  {median / base:5.2f}x soup")


if __name__ == "__main__":
    main()
