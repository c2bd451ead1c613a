"""How fast is AME next to the cheapest soup a user could write?

Prints, side by side in one run (the machine is shared and noisy, so absolute times
drift; ratios of interleaved runs do not):

- 16 models of 4 M float32 parameters: an in-place sum soup; ``fedsoup.merge`` with
  defaults (one epoch of GD = the soup); AME-Adam, 1 epoch, batch 1; and AME with Adam,
  AdamW, SGD-momentum and Adagrad at 15 shuffled epochs, batch 2. Targets: defaults
  <= 1.5x the soup, Adam 1 epoch <= 2.5x (aim 1.75x), 15 epochs <= 12x.
- 300 models of 2 parameters, 200 epochs, batch 20 (the paper's Appendix F setting):
  time per AME step (target <= 10 us).
- The first call's compile time of the fused kernel (fresh numba cache, in a
  subprocess) and its load time once cached.

Run: ``.venv/bin/python benchmarks/bench_merge.py [--repeats 5]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import fedsoup


def make_models(n: int, rows: int = 1000, cols: int = 1000, layers: int = 4) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        {
            name: tensor
            for layer in range(layers)
            for name, tensor in (
                (f"layers.{layer}.weight", torch.randn(rows, cols, generator=gen)),
                (f"layers.{layer}.bias", torch.randn(rows, generator=gen)),
            )
        }
        for _ in range(n)
    ]


def in_place_soup(models):
    """The cheapest soup: clone the first model, add the rest in place, divide once."""
    total = {k: v.clone() for k, v in models[0].items()}
    for model in models[1:]:
        for key, value in total.items():
            value.add_(model[key])
    for value in total.values():
        value.div_(len(models))
    return total


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_medians(cases: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each ``name -> fn`` after a warm-up call (first-touch page faults,
    thread pools, kernel cache), the cases interleaved so that drift hits every case alike."""
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(timed(fn))
    return {name: statistics.median(samples) for name, samples in times.items()}


FIRST_CALL = """
import time, torch
start = time.perf_counter()
import fedsoup
models = [{"w": torch.randn(64)} for _ in range(4)]
fedsoup.merge(models, optimizer="adam", lr=1e-3, epochs=2, batch_size=2)
print(time.perf_counter() - start)
"""


def first_call_seconds(cache_dir: str) -> float:
    """Seconds from ``import fedsoup`` to the end of a first small float32 Adam merge."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as cache_dir:
        compile_s = first_call_seconds(cache_dir)
        cached_s = first_call_seconds(cache_dir)

    models = make_models(16)
    params = sum(v.numel() for v in models[0].values())
    long = dict(epochs=15, batch_size=2, shuffle=True)
    cases = {
        "in-place soup": (lambda: in_place_soup(models), None),
        "merge (defaults)": (lambda: fedsoup.merge(models), 1.5),
        "AME-Adam, 1 epoch, batch 1": (lambda: fedsoup.merge(models, optimizer="adam", lr=1e-3), 2.5),
        "AME-Adam, 15 ep, batch 2": (lambda: fedsoup.merge(models, optimizer="adam", lr=1e-3, **long), 12),
        "AME-AdamW, 15 ep, batch 2": (lambda: fedsoup.merge(models, optimizer="adamw", lr=1e-3, **long), 12),
        "AME-SGD-momentum, 15 ep, batch 2": (
            lambda: fedsoup.merge(models, optimizer="sgd", lr=0.5, momentum=0.9, **long), 12),
        "AME-Adagrad, 15 ep, batch 2": (lambda: fedsoup.merge(models, optimizer="adagrad", lr=1e-2, **long), 12),
    }
    medians = interleaved_medians({name: fn for name, (fn, _) in cases.items()}, args.repeats)
    base = medians["in-place soup"]
    print(f"16 models x {params / 1e6:.2f} M float32 parameters, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved runs")
    for name, median in medians.items():
        target = cases[name][1]
        verdict = "" if target is None else f"  (target <= {target:g}x: {'OK' if median / base <= target else 'MISSED'})"
        print(f"  {name:34s} {median * 1e3:8.1f} ms  {median / base:5.2f}x soup{verdict}")

    tiny = [{"w": torch.distributions.Cauchy(0.0, 1.0).sample((2,))} for _ in range(300)]
    epochs, batch = 200, 20
    steps = epochs * -(-len(tiny) // batch)
    options = dict(optimizer="adam", lr=0.1, betas=(0.2, 0.2), eps=1e-8, epochs=epochs, batch_size=batch,
                   shuffle=True, pivot={"w": torch.tensor([10.0, 10.0])})
    fedsoup.merge(tiny, **options)
    per_step = statistics.median(timed(lambda: fedsoup.merge(tiny, **options)) for _ in range(args.repeats)) / steps
    print(f"300 models x 2 parameters, {epochs} epochs, batch {batch} ({steps} Adam steps): "
          f"{per_step * 1e6:.2f} us per AME step  (target <= 10 us: {'OK' if per_step <= 10e-6 else 'MISSED'})")
    print(f"first call (import fedsoup + first float32 Adam merge, fresh process): {compile_s:.1f} s with an "
          f"empty numba cache (compiles the kernel), {cached_s:.2f} s once cached")


if __name__ == "__main__":
    main()
