"""How many elements the soup before exact rounding left off (docs/cli.md, "Rounding").

Until commit e7b03a2 the soup of bf16/fp16 models was ``fedsoup.reference.weighted_sum``
in float32, then torch's cast into the inputs' dtype (``MergePlan.result``)::

    out = torch.mul(x_0.float(), ω_0)                  # ω_i = 1/3, a Python float
    for x_i, ω_i in ...: out.add_(x_i.float(), alpha=ω_i)

:func:`old_weighted_sum` is that code, line for line (run against the old commit's own
``fedsoup.soup`` and ``merge_files``, in memory and ``--low-memory``, it gives the same
counts). On a CPU with FMA, torch's ``add_(alpha=)`` rounds ``out + ω_i·x_i`` once, not the
product first; summing ``x_0·t + x_1·t + x_2·t`` with ``t = fl32(1/3)`` and every product
rounded is printed beside it, as is the float32 ``(x_0 + x_1 + x_2) / 3``.

The models are the tests' three-model tiny Llama (``save_clients(..., "llama", "dir")`` of
tests/test_hf_models.py, saved and read back); the reference is the exact mean rounded once
(tests/hf_helpers.correctly_rounded_mean). An element is off when its value differs (a
zero's sign aside); "one unit" counts those next to the reference, "at a tie" those whose
exact mean is the midpoint between the two, "mean 0" those whose exact mean is zero and
which kept float32's cancellation residue (bf16 holds it; fp16 underflows it to 0).

    .venv/bin/python benchmarks/old_soup_rounding.py      (needs transformers; ~20 s)
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import transformers  # noqa: E402

from fedsoup import io as fio  # noqa: E402
from tests.hf_helpers import correctly_rounded_mean, exact_mean, save_in_form, tiny_model  # noqa: E402

THIRD = torch.tensor(1 / 3, dtype=torch.float32)


def old_weighted_sum(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """fedsoup.reference.weighted_sum at e7b03a2^ (float32), then torch's cast into ``dtype``."""
    weights = [1 / len(tensors)] * len(tensors)
    out = torch.mul(tensors[0].to(None, torch.float32), weights[0])
    for tensor, weight in zip(tensors[1:], weights[1:]):
        out.add_(tensor.to(None, torch.float32), alpha=weight)
    return out.to(dtype)


def products_rounded_first(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    out = tensors[0].float() * THIRD
    for tensor in tensors[1:]:
        out = out + tensor.float() * THIRD
    return out.to(dtype)


def float32_sum_divided(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return (sum(t.float() for t in tensors[1:]) + tensors[0].float()).div(len(tensors)).to(dtype)


FORMULAS: dict[str, Callable[[list[torch.Tensor], torch.dtype], torch.Tensor]] = {
    "old code: mul, add_(alpha)": old_weighted_sum,
    "x0*t + x1*t + x2*t": products_rounded_first,
    "(x0 + x1 + x2) / 3": float32_sum_divided,
}


def ordinal(tensor: torch.Tensor) -> torch.Tensor:
    """A 16-bit float's place in the ordered list of its values (so adjacent values differ by 1)."""
    bits = tensor.view(torch.int16).int()
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def tally(states: list[dict[str, torch.Tensor]], formula, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(elements, off, one unit off, of them at a tie, off with an exact mean of 0)."""
    elements = off = one_unit = at_tie = zero_mean = 0
    for key in states[0]:
        tensors = [state[key] for state in states]
        exact, got = correctly_rounded_mean(tensors).flatten(), formula(tensors, dtype).flatten()
        elements += exact.numel()
        wrong = (got != exact).nonzero().flatten().tolist()
        if not wrong:
            continue
        means = exact_mean(tensors)
        units = (ordinal(got) - ordinal(exact)).abs()
        for j in wrong:
            off += 1
            zero_mean += means[j] == 0
            if units[j] == 1:
                one_unit += 1
                at_tie += means[j] == (Fraction(float(got[j])) + Fraction(float(exact[j]))) / 2
    return elements, off, one_unit, at_tie, zero_mean


def main() -> None:
    transformers.utils.logging.disable_progress_bar()  # (save_pretrained's "Writing model shards")
    print(f"{'dtype':9} {'formula':28} {'elements':>8} {'off':>5} {'one unit':>9} {'at a tie':>9} {'mean 0':>7}")
    for dtype in (torch.bfloat16, torch.float16):
        with tempfile.TemporaryDirectory() as folder:
            inputs = [save_in_form(tiny_model("llama", seed=i, dtype=dtype), Path(folder) / f"client{i}", "dir")
                      for i in range(3)]
            states = [fio.load_state_dict(path) for path in inputs]
        for name, formula in FORMULAS.items():
            counts = tally(states, formula, dtype)
            print(f"{str(dtype).removeprefix('torch.'):9} {name:28} " + " ".join(
                f"{n:>{w}}" for n, w in zip(counts, (8, 5, 9, 9, 7))))


if __name__ == "__main__":
    main()
