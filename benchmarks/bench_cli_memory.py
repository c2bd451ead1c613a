"""Peak memory of `fedsoup merge` with and without --low-memory.

Generates 8 safetensors checkpoints of 128 MiB each (16 float32 layers of 2048 x 1024
plus biases) in a temporary folder, merges them with AME-Adam (2 epochs, batch 2)
once in memory and once tensor by tensor, and prints each run's peak resident memory
as the operating system counts it, its wall time, and how far apart the two results are.

Every mode runs in a fresh helper process that starts the CLI as its own child and
reads ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``: so each number is the peak of
that one CLI run (the Python interpreter and torch included), nothing else.

    .venv/bin/python benchmarks/bench_cli_memory.py            # ~1 GiB of temporary files
    .venv/bin/python benchmarks/bench_cli_memory.py --inputs 4 --layers 4   # quicker

Target (issue 3): the low-memory peak stays under 700 MB for the 1 GiB of inputs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MERGE_OPTIONS = ["--optimizer", "adam", "--lr", "1e-3", "--epochs", "2", "--batch-size", "2"]


def measure_child(command: list[str]) -> None:
    """Run ``command`` as our only child; print its exit code, peak RSS and wall time as JSON."""
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    scale = 1 if sys.platform == "darwin" else 1024
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    print(json.dumps({
        "returncode": completed.returncode, "peak_bytes": peak, "seconds": seconds,
        "stdout": completed.stdout.strip(), "stderr": completed.stderr.strip()[-2000:],
    }))


def run_measured(command: list[str]) -> dict:
    """A fresh helper process per measurement, so RUSAGE_CHILDREN holds this run alone."""
    helper = [sys.executable, str(Path(__file__).resolve()), "--measure-child", "--", *command]
    completed = subprocess.run(helper, capture_output=True, text=True, check=True, cwd=REPO)
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    if result["returncode"] != 0:
        raise SystemExit(f"command failed ({result['returncode']}): {' '.join(command)}\n{result['stderr']}")
    return result


def make_inputs(folder: Path, inputs: int, layers: int, rows: int, cols: int) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    paths = []
    generator = torch.Generator().manual_seed(0)
    for i in range(inputs):
        state = {}
        for layer in range(layers):
            state[f"layers.{layer}.weight"] = torch.randn(rows, cols, generator=generator)
            state[f"layers.{layer}.bias"] = torch.randn(rows, generator=generator)
        path = folder / f"client{i}.safetensors"
        save_file(state, path)
        del state
        paths.append(path)
    return paths


def max_difference(a: Path, b: Path) -> float:
    from safetensors import safe_open

    worst = 0.0
    with safe_open(str(a), "pt") as left, safe_open(str(b), "pt") as right:
        for key in left.keys():
            worst = max(worst, float((left.get_tensor(key) - right.get_tensor(key)).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=8, help="number of checkpoints (default 8)")
    parser.add_argument("--layers", type=int, default=16, help="layers per checkpoint (default 16)")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--target-mb", type=float, default=700.0, help="low-memory peak target (MB)")
    args = parser.parse_args()

    model_bytes = args.layers * (args.rows * args.cols + args.rows) * 4
    with tempfile.TemporaryDirectory(prefix="fedsoup-bench-") as tmp:
        folder = Path(tmp)
        print(f"generating {args.inputs} checkpoints of {model_bytes / 2**20:.1f} MiB "
              f"({args.layers} layers of {args.rows}x{args.cols} float32) in {folder} ...", flush=True)
        inputs = [str(p) for p in make_inputs(folder, args.inputs, args.layers, args.rows, args.cols)]
        cli = [sys.executable, "-m", "fedsoup", "merge", *inputs, "--quiet", *MERGE_OPTIONS]

        baseline = run_measured([sys.executable, "-c", "import fedsoup.cli"])
        results = {}
        for mode in ("--in-memory", "--low-memory"):
            output = folder / f"merged{mode.replace('-', '_')}.safetensors"
            results[mode] = run_measured([*cli, "-o", str(output), mode])
            results[mode]["output"] = output
        difference = max_difference(results["--in-memory"]["output"], results["--low-memory"]["output"])
    # (the temporary checkpoints are deleted here)

    print(f"\nfedsoup merge of {args.inputs} x {model_bytes / 2**20:.0f} MiB safetensors, "
          f"{' '.join(MERGE_OPTIONS)}")
    print(f"{'mode':<14} {'peak RSS':>10} {'time':>8}")
    print(f"{'(import only)':<14} {baseline['peak_bytes'] / 1e6:>7.0f} MB {baseline['seconds']:>6.1f} s")
    for mode, result in results.items():
        print(f"{mode.strip('-'):<14} {result['peak_bytes'] / 1e6:>7.0f} MB {result['seconds']:>6.1f} s")
    low_peak_mb = results["--low-memory"]["peak_bytes"] / 1e6
    print(f"max |in-memory - low-memory| = {difference:.3g}")
    verdict = "OK" if low_peak_mb < args.target_mb else "OVER TARGET"
    print(f"low-memory peak {low_peak_mb:.0f} MB vs target {args.target_mb:.0f} MB: {verdict}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--measure-child" and sys.argv[2] == "--":
        measure_child(sys.argv[3:])
    else:
        main()
