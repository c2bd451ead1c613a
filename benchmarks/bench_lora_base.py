"""LoRA adapters merged into a base model: streamed tensor by tensor, against the whole base in memory.

Generates a float32 Llama-shaped base model directory (``config.json`` and ``model.safetensors``:
embeddings, ``--layers`` layers of attention and MLP of width ``--size``, an ``lm_head``; about
430 MB with the defaults) and ``--adapters`` PEFT adapters on q/k/v (:func:`bench_lora.make_adapters`)
in a temporary folder, then merges them into it in fresh processes as

- ``streamed``: ``merge_adapter_files(..., base=...)`` (what ``fedsoup merge --base`` runs): the
  base read one tensor at a time, each ``W + ΔW`` written before the next is read;
- ``whole``: the whole base in memory, as merges into a base ran before they streamed:
  ``merge_into_base(adapters, load_state_dict(base))`` (every result held) then ``write_model``;

and prints the median seconds and peak RSS above the imports (``baseline``) of interleaved
rounds, with the ratios measured in the same run, and whether both wrote the same tensors, bit for bit (the headers differ: the file merge
records its report).

    .venv/bin/python benchmarks/bench_lora_base.py [--repeat 3] [--adapters 3] [--layers 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_lora import make_adapters

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import torch
from fedsoup.io.resolve import load_state_dict
from fedsoup.lora import load_adapter, merge_into_base, write_model
from fedsoup.lora.driver import merge_adapter_files
how, base, output, *inputs = sys.argv[1:]
torch.set_num_threads(1)
started = time.perf_counter()
if how == "streamed":
    merge_adapter_files(inputs, output, base=base, force=True)
elif how == "whole":
    adapters = [load_adapter(path, ingredient=i) for i, path in enumerate(inputs)]
    state_dict, _ = merge_into_base(adapters, load_state_dict(base))
    write_model(output, state_dict, base, force=True)
    del state_dict, adapters  # (its mapping unmapped inside the timing, as the streamed merge's are)
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "peak_bytes": peak}))
"""


def make_base(folder: Path, layers: int, size: int, vocab: int) -> Path:
    """A Llama-shaped float32 model directory with random weights (no transformers needed)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(1)
    tensors = {"model.embed_tokens.weight": torch.randn(vocab, size, generator=generator)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"{prefix}.self_attn.{proj}.weight"] = torch.randn(size, size, generator=generator)
        for proj, shape in (("gate_proj", (11 * size // 4, size)), ("up_proj", (11 * size // 4, size)),
                            ("down_proj", (size, 11 * size // 4))):
            tensors[f"{prefix}.mlp.{proj}.weight"] = torch.randn(shape, generator=generator)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{prefix}.{norm}.weight"] = torch.ones(size)
    tensors["model.norm.weight"] = torch.ones(size)
    tensors["lm_head.weight"] = torch.randn(vocab, size, generator=generator)
    directory = folder / "base"
    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32"}))
    return directory


def run(how: str, base: Path, output: Path, inputs: list[str]) -> dict:
    completed = subprocess.run([sys.executable, "-c", CHILD, how, str(base), str(output), *inputs],
                               capture_output=True, text=True, cwd=REPO)
    if completed.returncode != 0:
        raise SystemExit(f"{how} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--make-into", help=argparse.SUPPRESS)  # (the inputs, generated in a child process)
    args = parser.parse_args()
    if args.make_into:
        make_base(Path(args.make_into), args.layers, args.size, args.vocab)
        make_adapters(Path(args.make_into), args.adapters, args.rank, args.layers, args.size)
        return
    kinds = ["baseline", "streamed", "whole"]
    with tempfile.TemporaryDirectory(prefix="fedsoup-bench-lora-base-") as tmp:
        # Generated in a child: Linux carries a parent's peak RSS at fork into its children's
        # ru_maxrss, so this process stays small (no torch imported until every run is done).
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--make-into", tmp], check=True)
        base = Path(tmp) / "base"
        inputs = [str(Path(tmp) / f"adapter{i}") for i in range(args.adapters)]
        base_bytes = (base / "model.safetensors").stat().st_size
        results: dict[str, list[dict]] = {kind: [] for kind in kinds}
        for _ in range(args.repeat):  # interleaved rounds: the machine's noise hits both alike
            for kind in kinds:
                results[kind].append(run(kind, base, Path(tmp) / f"out-{kind}", inputs))
        import torch
        from safetensors.torch import load_file

        written = [load_file(str(Path(tmp) / f"out-{kind}" / "model.safetensors")) for kind in ("streamed", "whole")]
        same = written[0].keys() == written[1].keys() and all(
            written[0][key].dtype == tensor.dtype and torch.equal(written[0][key], tensor)
            for key, tensor in written[1].items())
        del written
    print(f"{args.adapters} adapters, r={args.rank}, into a {base_bytes / 1e6:.0f} MB float32 base "
          f"({args.layers} layers of {args.size}); median of {args.repeat}, one thread; same tensors: {same}")
    imports = statistics.median(r["peak_bytes"] for r in results["baseline"])
    whole = {key: statistics.median(r[key] for r in results["whole"]) for key in ("seconds", "peak_bytes")}
    print(f"{'':<10}{'seconds':>9}{'x whole':>9}{'peak RSS above imports MB':>27}{'x whole':>9}")
    print(f"{'imports':<10}{'':>18}{imports / 1e6:>27.0f} (peak RSS of the imports alone)")
    for kind in ("streamed", "whole"):
        seconds = statistics.median(r["seconds"] for r in results[kind])
        above = statistics.median(r["peak_bytes"] for r in results[kind]) - imports
        print(f"{kind:<10}{seconds:>9.2f}{seconds / whole['seconds']:>9.2f}{above / 1e6:>27.0f}"
              f"{above / (whole['peak_bytes'] - imports):>9.2f}")


if __name__ == "__main__":
    main()
