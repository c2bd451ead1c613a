"""How fast is AME next to the cheapest soup a user could write?

Prints ratios measured side by side in one run (the machine is shared and noisy, so
absolute times drift; ratios of interleaved runs do not):

- 16 models of 4 M float32 parameters: an in-place sum soup, ``fedsoup.merge`` with
  defaults (one epoch of GD = the soup), and one epoch of AME-Adam with batch size 1.
  Targets: defaults <= 1.5x the soup, one Adam epoch <= 4x.
- 300 models of 2 parameters, 200 epochs, batch 20 (the paper's Appendix F setting):
  time per AME step, which should be tens of microseconds.

Run: ``.venv/bin/python benchmarks/bench_merge.py [--repeats 5]``
"""

from __future__ import annotations

import argparse
import statistics
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    models = make_models(16)
    params = sum(v.numel() for v in models[0].values())
    cases = {
        "in-place soup": lambda: in_place_soup(models),
        "merge (defaults)": lambda: fedsoup.merge(models),
        "merge (Adam, 1 epoch, batch 1)": lambda: fedsoup.merge(models, optimizer="adam", lr=1e-3),
    }
    for fn in cases.values():  # warm up: first-touch page faults, thread pools
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():  # interleaved, so drift hits every case alike
            times[name].append(timed(fn))
    base = statistics.median(times["in-place soup"])
    print(f"16 models x {params / 1e6:.2f} M float32 parameters, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved runs")
    targets = {"merge (defaults)": 1.5, "merge (Adam, 1 epoch, batch 1)": 4.0}
    for name, samples in times.items():
        median = statistics.median(samples)
        target = f"  (target <= {targets[name]:.1f}x)" if name in targets else ""
        print(f"  {name:32s} {median * 1e3:8.1f} ms  {median / base:5.2f}x soup{target}")

    gen = torch.Generator().manual_seed(1)
    tiny = [{"w": torch.distributions.Cauchy(0.0, 1.0).sample((2,))} for _ in range(300)]
    del gen
    epochs, batch = 200, 20
    steps = epochs * -(-len(tiny) // batch)
    options = dict(optimizer="adam", lr=0.1, betas=(0.2, 0.2), eps=1e-8, epochs=epochs, batch_size=batch,
                   shuffle=True, pivot={"w": torch.tensor([10.0, 10.0])})
    fedsoup.merge(tiny, **options)
    per_step = statistics.median(timed(lambda: fedsoup.merge(tiny, **options)) for _ in range(args.repeats)) / steps
    # The floor: torch.optim's own Adam.step on the same 2-parameter tensor, measured alongside.
    param = torch.zeros(2)
    param.grad = torch.ones(2)
    bare = torch.optim.Adam([param], lr=0.1, betas=(0.2, 0.2), eps=1e-8, fused=True)
    bare_step = statistics.median(
        timed(lambda: [bare.step() for _ in range(steps)]) for _ in range(args.repeats)
    ) / steps
    print(f"300 models x 2 parameters, {epochs} epochs, batch {batch} ({steps} Adam steps): "
          f"{per_step * 1e6:.1f} us per AME step; torch.optim Adam.step alone: {bare_step * 1e6:.1f} us "
          f"({per_step / bare_step:.2f}x)")


if __name__ == "__main__":
    main()
