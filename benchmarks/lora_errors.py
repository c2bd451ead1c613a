"""The error of every LoRA merge mode on the tests' adapters (tiny GPT-2 c_attn and Llama q/v).

For three adapters of r=4 (α=8) built from configs as tests/test_lora.py builds them,
independent (each from its own seed) or drifted (three clients moved 10% from one
adapter), prints per family and case the relative Frobenius error, max over modules, of
each way of merging against the hand computation ``Σ ω_i s_i B_i A_i``:

- ``factors``: FedAvg on A and B (= the factor/product error);
- ``products`` (``cat``, rank 12) and ``products`` at ranks 4 and 8 (SVD), with its captured energy;
- PEFT's ``add_weighted_adapter`` ``linear``, ``svd`` at its default rank (4) and ``cat``.

    .venv/bin/python benchmarks/lora_errors.py       (needs transformers and peft)
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

warnings.filterwarnings("ignore")

from peft import PeftModel  # noqa: E402

from fedsoup.lora import load_adapter, merge_adapters, write_adapter  # noqa: E402
from tests.lora_helpers import (  # noqa: E402
    gpt2_base, hand_products, llama_base, make_adapter, peft_deltas, products_of, relative_error)


def worst(products, expected) -> float:
    return max(relative_error(products[path], expected[path]) for path in expected)


def peft_merge(family, directories, combination, root: Path):
    factory = gpt2_base if family == "gpt2" else llama_base
    model = PeftModel.from_pretrained(factory(), str(directories[0]), adapter_name="a0")
    for i, directory in enumerate(directories[1:], start=1):
        model.load_adapter(str(directory), adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(directories))]
    weights = [1 / len(directories)] * len(directories)
    model.add_weighted_adapter(names, weights, "merged", combination_type=combination)
    return peft_deltas(model, "merged")


def main() -> None:
    print(f"{'family':<7}{'adapters':<13}{'mode':<22}{'rel. error (max)':>17}{'SVD energy (min)':>18}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for family in ("gpt2", "llama"):
            independent = [make_adapter(root / f"{family}-i{i}", family, seed=i) for i in range(3)]
            drifted = [make_adapter(root / f"{family}-d{i}", family, seed=100 + i, drift_from=independent[0])
                       for i in range(3)]
            for case, directories in (("independent", independent), ("drifted 10%", drifted)):
                expected = hand_products(directories)
                adapters = [load_adapter(d) for d in directories]
                rows = []
                for label, mode, rank in (("factors", "factors", None), ("products cat (r=12)", "products", None),
                                          ("products svd r=8", "products", 8), ("products svd r=4", "products", 4)):
                    merged = merge_adapters(adapters, mode=mode, rank=rank)
                    out = root / f"{family}-{case}-{label}".replace(" ", "_")
                    write_adapter(out, merged.state_dict, merged.config)
                    energy = merged.report.min_energy
                    rows.append((label, worst(products_of(out), expected), energy))
                for combination in ("linear", "svd", "cat"):
                    deltas = peft_merge(family, directories, combination, root)
                    rows.append((f"PEFT {combination}", worst(deltas, expected), None))
                for label, error, energy in rows:
                    shown = "" if energy is None else f"{energy:.3f}"
                    print(f"{family:<7}{case:<13}{label:<22}{error:>17.2e}{shown:>18}")


if __name__ == "__main__":
    main()
