"""Merging three GPT-2-small-shaped language models: fedsoup against a plain torch loop.

Three random models with GPT-2 small's shapes (124 M parameters, `GPT2Config()`, the tied
`lm_head` not stored, as `save_pretrained` writes them) are saved as model directories
(`config.json` + `model.safetensors`), in float32 and in bfloat16. Each is merged

- by `fedsoup.merge_files` (what `fedsoup merge` runs): the soup, and AME-Adam (one epoch,
  the default scale-aware lr), each in memory and with `low_memory=True`;
- by a plain torch loop that loads the same files (`safetensors.torch.load_file`), averages
  in float32 (`sum / 3`, cast back) and saves (`save_file`);
- by `mergekit-yaml` (linear merge) only where mergekit is installed (an optional column).

Every run is a fresh process: it imports what it needs, notes its resident memory
(`VmRSS`), runs, and reports its wall time and its peak resident memory (`VmHWM`) above
that baseline. Every run starts from the same memory state: no dirty pages waiting to be
written, and `--settle` seconds (default 12) after the previous run's output was removed.
On a virtual machine that reports free pages to its host (Linux's free page reporting,
on here), pages freed a moment ago are cheap to reuse, and ones freed seconds ago cost a
fault in the host each: writing a new 500 MB file takes 0.13 s right after another was
deleted and 1.1-1.5 s once the freed pages have been handed back. Without the settling,
whichever run started sooner after the previous one's deletion (a child whose imports
are shorter, as the torch loop's are) wrote its output at the cheap rate. Runs alternate between the tools, in a new order every round, so that the shared
machine's noise falls on all of them alike; each row is the median of its runs, and
ratios are to the torch loop's median of the same dtype, in the same run.

    .venv/bin/python benchmarks/bench_language_models.py              # ~2.2 GB of temporary files, ~20 min
    .venv/bin/python benchmarks/bench_language_models.py --repeats 9  # median of nine per row

The "numba started" rows run the soup in a process whose compiled kernels have already
started (a server, a notebook, a second merge): numba's one-time start, 0.3-0.45 s here,
is paid before the clock. The float32 soup never starts numba; bf16's exact rounding does.

Bars (issue 25): the soup within 1.2x of the torch loop's time; with `--low-memory` the
soup's peak above baseline at most 2x one model (AME-Adam's reported too: it keeps
optimizer state for the largest tensor).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
N_MODELS = 3


def _memory(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(mode: str, inputs: list[str], output: str, dtype: str) -> None:
    """One measured run (a fresh process): imports, baseline, run, report JSON."""
    if mode == "torch":
        import torch
        from safetensors.torch import load_file, save_file
    else:
        import fedsoup
    if mode.endswith("-warm"):  # numba's one-time start (~0.3-0.45 s per process) paid before the clock
        import torch
        from fedsoup.rounding import exact_soup

        exact_soup([torch.zeros(2, dtype=torch.bfloat16)] * 3, [1, 1, 1])
        mode = mode.removesuffix("-warm")
    baseline = _memory("VmRSS")
    started = time.perf_counter()
    if mode == "torch":
        states = [load_file(path) for path in inputs]
        merged = {}
        for key in states[0]:
            # A fresh float32 buffer (as for bf16): adding into the first file's mapped tensor
            # would pay a copy-on-write fault per page and make the loop look slower than it is.
            total = states[0][key].to(torch.float32, copy=True)
            for state in states[1:]:
                total += state[key].float()
            merged[key] = (total / len(states)).to(states[0][key].dtype)
        del states
        os.makedirs(output, exist_ok=True)
        save_file(merged, os.path.join(output, "model.safetensors"))
    elif mode == "mergekit":
        config = os.path.join(output + ".yml")
        with open(config, "w", encoding="utf-8") as handle:
            handle.write("merge_method: linear\ndtype: " + dtype + "\nmodels:\n" + "".join(
                f"  - model: {os.path.dirname(path)}\n    parameters:\n      weight: 1.0\n" for path in inputs))
        subprocess.run(["mergekit-yaml", config, output, "--lazy-unpickle"], check=True, capture_output=True)
    else:
        optimizer, low = mode.split("-")
        fedsoup.merge_files([os.path.dirname(path) for path in inputs], output, force=True,
                            low_memory=low == "low", optimizer="adam" if optimizer == "adam" else "sgd")
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "peak_above_baseline": _memory("VmHWM") - baseline, "baseline": baseline}))


def measure(mode: str, inputs: list[Path], output: Path, dtype: str, settle: float) -> dict:
    if output.exists():
        shutil.rmtree(output)
    # The previous run's 0.25-0.5 GB of dirty pages would otherwise be written back during
    # this run (whichever tool it is): every run starts with nothing waiting to be written,
    # and with the pages freed by the previous run handed back to the host (module docstring).
    os.sync()
    time.sleep(settle)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--dtype", dtype, "--output",
               str(output), *map(str, inputs)]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if completed.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def make_models(folder: Path, dtype_name: str) -> tuple[list[Path], int]:
    """Three GPT-2 small model directories with random weights; returns their weight files and one model's bytes."""
    import torch
    import transformers
    from safetensors.torch import save_file

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    config = transformers.GPT2Config()
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in transformers.GPT2LMHeadModel(config).state_dict().items()
                  if k != "lm_head.weight"}
    generator = torch.Generator().manual_seed(0)
    paths, nbytes = [], 0
    for i in range(N_MODELS):
        directory = folder / f"{dtype_name}-client{i}"
        directory.mkdir()
        config.save_pretrained(directory)
        state = {key: (torch.randn(shape, generator=generator) * 0.02).to(dtype) for key, shape in shapes.items()}
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
        del state
        paths.append(directory / "model.safetensors")
    return paths, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=5, help="runs per row (their median, and the best, are shown)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--settle", type=float, default=12.0,
                        help="seconds between removing the previous output and the next run (0: no settling)")
    parser.add_argument("inputs", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.inputs, args.output, args.dtype)
        return
    modes = ["torch", "soup-mem", "soup-low", "soup-mem-warm", "soup-low-warm", "adam-mem", "adam-low"]
    if shutil.which("mergekit-yaml"):
        modes.append("mergekit")
    print(f"{N_MODELS} GPT-2-small-shaped models (124 M parameters); one fresh process per run; "
          f"median of {args.repeats}, each started {args.settle:g} s after the previous output was removed; "
          f"ratios of medians to the torch loop of the same dtype")
    with tempfile.TemporaryDirectory(prefix="fedsoup-bench-lm-") as tmp:
        folder = Path(tmp)
        for dtype in args.dtypes.split(","):
            inputs, model_bytes = make_models(folder, dtype)
            results: dict[str, list[dict]] = {mode: [] for mode in modes}
            for repeat in range(args.repeats):
                # Interleaved, in a new order every round: a run right after one that freed gigabytes
                # allocates faster (the kernel has free pages at hand), so no tool keeps one place.
                order = list(modes)
                random.Random(repeat).shuffle(order)
                for mode in order:
                    results[mode].append(measure(mode, inputs, folder / f"out-{dtype}-{mode}", dtype, args.settle))
            base = statistics.median(r["seconds"] for r in results["torch"])
            print(f"\n{dtype}: one model is {model_bytes / 1e6:.0f} MB")
            print(f"{'run':<42}{'median s':>9}{'x torch':>9}{'best s':>8}{'peak above baseline':>22}{'x one model':>13}")
            for mode in modes:
                seconds = [r["seconds"] for r in results[mode]]
                peak = min(r["peak_above_baseline"] for r in results[mode])
                label = {"torch": "torch load/avg/save", "soup-mem": "fedsoup soup",
                         "soup-low": "fedsoup soup --low-memory", "adam-mem": "fedsoup AME-Adam",
                         "soup-mem-warm": "fedsoup soup, numba started",
                         "soup-low-warm": "fedsoup soup --low-memory, numba started",
                         "adam-low": "fedsoup AME-Adam --low-memory", "mergekit": "mergekit linear"}[mode]
                print(f"{label:<42}{statistics.median(seconds):>9.2f}{statistics.median(seconds) / base:>9.2f}"
                      f"{min(seconds):>8.2f}{peak / 1e6:>19.0f} MB{peak / model_bytes:>13.2f}")
            for path in folder.glob(f"{dtype}-client*"):
                shutil.rmtree(path)


if __name__ == "__main__":
    main()
