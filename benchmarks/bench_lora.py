"""Merging LoRA adapters: seconds and peak memory of each mode, side by side.

Generates 8 PEFT-format adapter directories (r=16, lora_alpha=32) on 24 modules of
1024 x 1024 (8 layers x q/k/v) in a temporary folder, then merges them with
``fedsoup.lora.driver.merge_adapter_files`` as

- ``factors`` (FedAvg on A and B, scales folded),
- ``products`` written exactly at rank 128 (``cat``),
- ``products`` at rank 16 (the SVD taken from the factors: thin QR of B_cat and A_catᵀ and a
  128 x 128 SVD, no dense 1024 x 1024 product formed),

and, for contrast, the naive way to the same rank-16 adapter: every adapter's dense product
s_i·B_i·A_i formed, summed, and a dense SVD per module (``dense-svd``, not in the package).
Every run is a fresh process (the imports' memory counted once, in ``baseline``); the
rounds are interleaved and the median of ``--repeat`` is printed, with ratios to
``factors`` measured in the same run.

    .venv/bin/python benchmarks/bench_lora.py [--repeat 3] [--adapters 8] [--rank 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import torch
from fedsoup.lora.driver import merge_adapter_files
from fedsoup.options import MergeOptions
mode, rank, output, *inputs = sys.argv[1:]
torch.set_num_threads(1)
started = time.perf_counter()
if mode == "baseline":
    report = None
elif mode == "dense-svd":
    from safetensors.torch import load_file
    totals = {}
    for path in inputs:
        config = json.load(open(path + "/adapter_config.json"))
        tensors = load_file(path + "/adapter_model.safetensors")
        s = config["lora_alpha"] / config["r"]
        for key, a in tensors.items():
            if key.endswith("lora_A.weight"):
                b = tensors[key.replace("lora_A", "lora_B")]
                delta = s * (b @ a) / len(inputs)
                totals[key] = totals[key] + delta if key in totals else delta
    for key, delta in totals.items():
        u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
    report = None
else:
    how, _, r = mode.partition("-")
    report = merge_adapter_files(inputs, output, mode=how, rank=int(rank) if r else None,
                                 options=MergeOptions(), force=True).lora
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "peak_bytes": peak,
                  "summary": report.summary() if report else ""}))
"""


def make_adapters(folder: Path, count: int, rank: int, layers: int, size: int) -> list[str]:
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "k_proj", "v_proj"],
              "use_rslora": False, "fan_in_fan_out": False, "bias": "none", "task_type": "CAUSAL_LM",
              "base_model_name_or_path": "synthetic"}
    paths = []
    for i in range(count):
        tensors = {}
        for layer in range(layers):
            for proj in ("q_proj", "k_proj", "v_proj"):
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
                tensors[prefix + ".lora_A.weight"] = torch.randn(rank, size, generator=generator) / size ** 0.5
                tensors[prefix + ".lora_B.weight"] = torch.randn(size, rank, generator=generator) / rank ** 0.5
        directory = folder / f"adapter{i}"
        directory.mkdir()
        save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
        (directory / "adapter_config.json").write_text(json.dumps(config))
        paths.append(str(directory))
    return paths


def run(mode: str, rank: int, output: Path, inputs: list[str]) -> dict:
    completed = subprocess.run([sys.executable, "-c", CHILD, mode, str(rank), str(output), *inputs],
                               capture_output=True, text=True, cwd=REPO)
    if completed.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8, help="3 modules (q, k, v) per layer")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    modes = ["baseline", "factors", "products", f"products-{args.rank}", "dense-svd"]
    with tempfile.TemporaryDirectory(prefix="fedsoup-bench-lora-") as tmp:
        inputs = make_adapters(Path(tmp), args.adapters, args.rank, args.layers, args.size)
        results: dict[str, list[dict]] = {mode: [] for mode in modes}
        for _ in range(args.repeat):  # interleaved rounds: the machine's noise hits every mode alike
            for mode in modes:
                results[mode].append(run(mode, args.rank, Path(tmp) / f"out-{mode}", inputs))
    print(f"{args.adapters} adapters, r={args.rank}, {3 * args.layers} modules of {args.size}x{args.size}; "
          f"median of {args.repeat}, one thread")
    base_rss = statistics.median(r["peak_bytes"] for r in results["baseline"])
    factors = statistics.median(r["seconds"] for r in results["factors"])
    print(f"{'mode':<14}{'seconds':>9}{'x factors':>11}{'peak RSS MB':>13}{'above imports MB':>18}")
    for mode in modes:
        seconds = statistics.median(r["seconds"] for r in results[mode])
        peak = statistics.median(r["peak_bytes"] for r in results[mode])
        print(f"{mode:<14}{seconds:>9.3f}{seconds / factors:>11.2f}{peak / 2**20:>13.0f}{(peak - base_rss) / 2**20:>18.0f}")
    for mode in modes:
        if results[mode][0]["summary"]:
            print(f"  {mode}: {results[mode][0]['summary']}")


if __name__ == "__main__":
    main()
