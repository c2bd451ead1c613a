"""What the checkpoint checksum costs: fedsoup.state's save/load beside plain safetensors.

Saves and loads the same generated training state (a model of ``--mib`` MiB plus Adam's two
moment buffers, i.e. 3 x that many bytes) with

* plain ``safetensors.torch.save_file`` / ``load_file`` (no checksum, no JSON), and
* ``fedsoup.state.save_checkpoint`` (SHA-256 computed while streaming the tensor file out)
  / ``load_checkpoint`` (the file hashed and compared before it is loaded),

alternating the two, ``--repeats`` times each, in one run (the machine is shared and noisy).
``load_file`` maps the file lazily, so both load rows also read every tensor once (a sum),
as restoring a state does. It prints the median wall times, their ratios, and what hashing
the bytes alone takes. The page cache is warm for both.

    .venv/bin/python benchmarks/bench_checkpoint.py            # a 128 MiB model (384 MiB of state), 5 repeats
    .venv/bin/python benchmarks/bench_checkpoint.py --mib 32 --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch

from fedsoup.state import load_checkpoint, save_checkpoint


def make_state(mib: int) -> dict:
    g = torch.Generator().manual_seed(0)
    layers = max(1, mib // 4)  # 4 MiB per float32 layer of 1024 x 1024
    model = {f"layer{i}.weight": torch.randn(1024, 1024, generator=g) for i in range(layers)}
    moments = {i: {"step": torch.tensor(3.0), "exp_avg": torch.randn(1024, 1024, generator=g),
                   "exp_avg_sq": torch.rand(1024, 1024, generator=g)} for i in range(layers)}
    return {"round": 3, "global": model, "stew": {"state": moments, "param_groups": [{"lr": 0.1}]}}


def flat(state: dict) -> dict[str, torch.Tensor]:
    tensors = {f"global/{k}": v for k, v in state["global"].items()}
    for i, moments in state["stew"]["state"].items():
        tensors.update({f"stew/{i}/{k}": v for k, v in moments.items()})
    return tensors


def touch(state) -> float:
    """Read every tensor of a (nested) state once."""
    if isinstance(state, torch.Tensor):
        return float(state.float().sum())
    if isinstance(state, dict):
        return sum(touch(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(touch(value) for value in state)
    return 0.0


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128, help="model size in MiB (the state is 3x)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    state = make_state(args.mib)
    tensors = flat(state)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    times = {name: [] for name in ("plain save", "fedsoup save", "plain load", "fedsoup load", "sha256")}
    with tempfile.TemporaryDirectory() as folder:
        plain = Path(folder) / "plain.safetensors"
        checkpoint = Path(folder) / "checkpoint"
        for _ in range(args.repeats):
            times["plain save"].append(timed(lambda: safetensors.torch.save_file(tensors, str(plain))))
            times["fedsoup save"].append(timed(lambda: save_checkpoint(checkpoint, state, tag="round-00003")))
            times["plain load"].append(timed(lambda: touch(safetensors.torch.load_file(str(plain)))))
            times["fedsoup load"].append(timed(lambda: touch(load_checkpoint(checkpoint))))
            times["sha256"].append(timed(lambda: hashlib.sha256(plain.read_bytes()).hexdigest()))
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"state: {size / 2**20:.0f} MiB in {len(tensors)} tensors, {args.repeats} repeats, median wall time")
    for operation in ("save", "load"):
        ours, theirs = median[f"fedsoup {operation}"], median[f"plain {operation}"]
        print(f"  {operation}: fedsoup (with SHA-256) {ours * 1000:7.0f} ms   plain safetensors {theirs * 1000:7.0f} ms"
              f"   ratio {ours / theirs:.2f}")
    print(f"  SHA-256 of the same bytes alone: {median['sha256'] * 1000:.0f} ms ({size / 2**20 / median['sha256']:.0f} MiB/s),"
          f" the checksum's share of a fedsoup load: {median['sha256'] / median['fedsoup load']:.2f}")


if __name__ == "__main__":
    main()
