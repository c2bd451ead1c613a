"""Correct rounding of the soup of bf16/fp16/FP8 ingredients, and of float32/float64 results.

The reference is hand-written with Python's exact fractions (tests/hf_helpers.py): the
exact weighted mean, rounded once to nearest, ties to even.
"""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
import torch
from safetensors.torch import save_file

import fedsoup
from fedsoup import io as fio
from fedsoup.rounding import exact_soup, integer_weights, round_to
from tests.hf_helpers import FORMATS, correctly_rounded_mean, round_fraction

NARROW = [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2]


def representable(value: Fraction, dtype) -> bool:
    return value == 0 or Fraction(round_fraction(value, dtype)) == value


def constructed_ties(dtype, n: int, weights: list[int], count: int, seed: int = 0):
    """Ingredients whose exact weighted mean is a midpoint of ``dtype`` (a tie) and, beside each
    tie, ingredients whose mean is a hair above or below one (a near-tie)."""
    precision, emin, _ = FORMATS[dtype]
    rng = random.Random(seed)
    total = sum(weights)
    ties, near = [], []
    for _ in range(200 * count):
        if len(ties) == count:
            break
        exponent = rng.randint(max(emin + 2, -12), 4)
        unit = Fraction(2) ** (exponent - precision + 1)
        target = (rng.randint(2 ** (precision - 1), 2**precision - 1) + Fraction(1, 2)) * unit
        others = [round_fraction(Fraction(rng.uniform(0.5, 1.5)) * target, dtype) for _ in range(n - 1)]
        rest = target * total - sum(Fraction(w) * Fraction(x) for w, x in zip(weights[:-1], others))
        last = rest / weights[-1]
        if abs(last) > FORMATS[dtype][2] or not representable(last, dtype):
            continue
        ties.append([*others, float(last)])
        # The last ingredient one unit up or down: the mean moves off the tie by w_last·unit/W.
        for step in (1, -1):
            moved = float(torch.tensor(float(last), dtype=torch.float64).to(dtype).view(
                torch.int16 if dtype.itemsize == 2 else torch.uint8).add(step).view(dtype).double())
            if abs(moved) <= FORMATS[dtype][2]:  # one unit up from the largest is inf/NaN
                near.append([*others, moved])
    assert len(ties) >= count // 4, f"only {len(ties)} ties constructed"
    return ties, near


def columns(rows, dtype):
    return [torch.tensor([row[j] for row in rows], dtype=torch.float64).to(dtype) for j in range(len(rows[0]))]


@pytest.mark.parametrize("dtype", NARROW, ids=str)
@pytest.mark.parametrize("weights", [[1, 1, 1], [1, 1], [3, 5, 1], [17, 2, 1]], ids=str)
def test_exact_ties_and_near_ties_are_rounded_once_to_nearest_even(dtype, weights):
    ties, near = constructed_ties(dtype, len(weights), weights, count=100)
    for rows in (ties, near):
        inputs = columns(rows, dtype)
        expected = correctly_rounded_mean(inputs, weights)
        got = exact_soup(inputs, weights)
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
        soup = fedsoup.soup([{"w": x} for x in inputs], weights=weights)["w"]
        assert torch.equal(soup.view(torch.uint8), expected.view(torch.uint8))
    if dtype in (torch.bfloat16, torch.float16) and weights == [1, 1, 1]:
        # Σ x_i·fl64(1/3), even rounded once, misses constructed exact ties: this test tells them apart.
        inputs = columns(ties, dtype)
        naive = round_to(sum(x.double() * (1 / 3) for x in inputs), dtype)
        assert not torch.equal(naive, correctly_rounded_mean(inputs))


@pytest.mark.parametrize("dtype", NARROW, ids=str)
def test_random_soups_and_far_apart_magnitudes(dtype):
    generator = torch.Generator().manual_seed(1)
    inputs = [(torch.randn(3000, generator=generator) * 0.05).to(dtype) for _ in range(3)]
    largest = float(FORMATS[dtype][2])
    # Terms whose float64 partial sums are inexact (the exact expansion path), zeros, signs.
    inputs[0][:4] = torch.tensor([largest, -largest, 1.0, -0.0], dtype=torch.float64).to(dtype)
    inputs[1][:4] = torch.tensor([2.0 ** -5, largest, -largest, -0.0], dtype=torch.float64).to(dtype)
    inputs[2][:4] = torch.tensor([-largest, 2.0 ** -6, largest, -0.0], dtype=torch.float64).to(dtype)
    # Subnormals of the format, and means that underflow into them.
    tiny = float(torch.finfo(dtype).smallest_normal) if dtype.itemsize == 2 else 2.0 ** (FORMATS[dtype][1])
    inputs[0][4:8] = torch.tensor([tiny / 2, tiny / 4, tiny, -tiny / 8], dtype=torch.float64).to(dtype)
    inputs[1][4:8] = torch.tensor([tiny / 4, 0.0, tiny / 2, tiny / 4], dtype=torch.float64).to(dtype)
    inputs[2][4:8] = torch.tensor([0.0, tiny / 8, -tiny, tiny / 8], dtype=torch.float64).to(dtype)
    for weights in ([1, 1, 1], [7, 2**24, 1]):
        expected = correctly_rounded_mean(inputs, weights)
        got = exact_soup(inputs, weights)
        assert torch.equal(got.float(), expected.float())
    assert torch.equal(exact_soup([x[3:4] for x in inputs], [1, 1, 1]).view(torch.uint8),
                       torch.tensor([-0.0]).to(dtype).view(torch.uint8))  # -0 + -0 + -0 is -0


@pytest.mark.parametrize(("inputs_dtype", "dtype"), [
    (torch.bfloat16, torch.float16), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
    (torch.float16, torch.float32), (torch.float8_e4m3fn, torch.bfloat16), (torch.bfloat16, torch.float8_e5m2),
], ids=str)
def test_exact_soup_into_another_format_is_rounded_once_not_through_the_inputs_format(inputs_dtype, dtype):
    generator = torch.Generator().manual_seed(5)
    ties, near = constructed_ties(inputs_dtype, 3, [1, 1, 1], count=40)
    inputs = [torch.cat([column, (torch.randn(2000, generator=generator) * 0.05).to(inputs_dtype)])
              for column in columns(ties + near, inputs_dtype)]
    for weights in ([1, 1, 1], [3, 5, 1]):
        expected = correctly_rounded_mean(inputs, weights, dtype)
        got = exact_soup(inputs, weights, dtype)
        assert got.dtype == dtype and torch.equal(got.double(), expected.double())
        soup = fedsoup.soup([{"w": x} for x in inputs], weights=weights, dtype=dtype)["w"]
        assert soup.dtype == dtype and torch.equal(soup.double(), expected.double())
    through_inputs = exact_soup(inputs, [1, 1, 1]).to(dtype)  # what rounding twice gives
    assert not torch.equal(through_inputs.double(), correctly_rounded_mean(inputs, [1, 1, 1], dtype).double())


def test_integer_weights_decide_the_exact_path():
    assert integer_weights(None, 3) == [1, 1, 1]
    assert integer_weights([2, 5.0, 0], 3) == [2, 5, 0]
    assert integer_weights([0.5, 0.5], 2) is None
    assert integer_weights([2**24 + 1, 1], 2) is None
    assert integer_weights([0, 0], 2) is None


def test_other_weights_are_rounded_once_from_float32():
    generator = torch.Generator().manual_seed(2)
    models = [{"w": torch.randn(500, generator=generator).to(torch.bfloat16)} for _ in range(3)]
    weights = [0.2, 0.3, 0.5]
    got = fedsoup.soup(models, weights=weights)["w"]
    in_float32 = fedsoup.soup([{"w": m["w"].float()} for m in models], weights=weights)["w"]
    assert torch.equal(got, in_float32.to(torch.bfloat16))


def test_float64_results_are_rounded_once_not_through_float32():
    value = 1 + 2.0**-8 + 2.0**-30  # torch's float64 -> bf16 cast gives 1.0 (rounded twice)
    assert round_to(torch.tensor([value], dtype=torch.float64), torch.bfloat16).item() == 1 + 2.0**-7
    assert torch.tensor([value], dtype=torch.float64).to(torch.bfloat16).item() == 1.0
    # A merge computed in float64 (one input is float64) written in bf16 (the first's dtype).
    merged = fedsoup.soup([{"w": torch.tensor([1.0], dtype=torch.bfloat16)},
                           {"w": torch.tensor([1 + 2.0**-7 + 2.0**-29], dtype=torch.float64)}])["w"]
    assert merged.dtype == torch.bfloat16 and merged.item() == 1 + 2.0**-7
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(5000, generator=generator, dtype=torch.float64) * torch.exp(
        torch.randn(5000, generator=generator, dtype=torch.float64) * 8)
    for dtype in NARROW:
        expected = [round_fraction(Fraction(v), dtype) for v in values.tolist()]
        got = round_to(values, dtype).double().tolist()
        assert all(g == e or (e in (float("inf"), float("-inf")) and g != g) for g, e in zip(got, expected)), dtype


def test_ame_results_are_rounded_once_from_their_float32_result():
    generator = torch.Generator().manual_seed(4)
    models = [{"w": torch.randn(300, generator=generator).to(torch.bfloat16)} for _ in range(3)]
    got = fedsoup.merge(models, optimizer="adam", lr=0.01, epochs=2)["w"]
    in_float32 = fedsoup.merge([{"w": m["w"].float()} for m in models], optimizer="adam", lr=0.01, epochs=2)["w"]
    assert torch.equal(got, in_float32.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_fp8_checkpoints_without_scales_merge_correctly_rounded(tmp_path, dtype):
    from fedsoup import cli

    generator = torch.Generator().manual_seed(5)
    models = [{"layer.weight": torch.randn(16, 16, generator=generator).to(dtype),
               "layer.bias": torch.randn(16, generator=generator).to(dtype)} for _ in range(3)]
    paths = []
    for i, model in enumerate(models):
        path = tmp_path / f"m{i}.safetensors"
        fio.write_checkpoint(path, {k: fio.TensorInfo(tuple(v.shape), v.dtype) for k, v in model.items()},
                             model.__getitem__)
        paths.append(str(path))
    # (this crashed with "sum_cpu" not implemented for 'Float8_e4m3fn', exit 1)
    assert cli.main(["merge", *paths, "-o", str(tmp_path / "soup.safetensors"), "-q"]) == 0
    merged = fio.load_state_dict(tmp_path / "soup.safetensors")
    for key in models[0]:
        assert merged[key].dtype == dtype
        assert torch.equal(merged[key].float(), correctly_rounded_mean([m[key] for m in models]).float())
    assert cli.main(["merge", *paths, "-o", str(tmp_path / "adam.safetensors"), "--optimizer", "adam", "-q"]) == 0
    assert fio.load_state_dict(tmp_path / "adam.safetensors")["layer.weight"].dtype == dtype


def test_ame_results_with_a_dtype_are_rounded_once_into_it_not_through_the_inputs_dtype(tmp_path):
    generator = torch.Generator().manual_seed(6)
    models = [{"w": torch.randn(3000, generator=generator).to(torch.bfloat16)} for _ in range(3)]
    in_float32 = fedsoup.merge([{"w": m["w"].float()} for m in models], optimizer="adam", lr=0.01)["w"]
    got = fedsoup.merge(models, optimizer="adam", lr=0.01, dtype="fp16")["w"]
    assert got.dtype == torch.float16 and torch.equal(got, in_float32.to(torch.float16))
    assert not torch.equal(got, in_float32.to(torch.bfloat16).to(torch.float16))  # rounding twice differs
    paths = []
    for i, model in enumerate(models):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file(model, paths[-1])
    for low_memory in (False, True):
        out = tmp_path / f"out-{low_memory}.safetensors"
        fedsoup.merge_files(paths, out, optimizer="adam", lr=0.01, dtype="float16", low_memory=low_memory)
        with fio.open_checkpoint(out) as written:
            assert torch.equal(written.get("w"), got)


@pytest.mark.parametrize("options", [{}, {"optimizer": "adam", "lr": 0.01}], ids=["soup", "adam"])
def test_a_dtype_too_narrow_for_the_values_is_an_option_error_naming_dtype(options):
    models = [{"w": torch.tensor([1e5, 1.0]), "b": torch.tensor([1.0])} for _ in range(2)]
    with pytest.raises(fedsoup.OptionError) as info:
        fedsoup.merge(models, dtype="fp16", **options)
    assert info.value.option == "dtype" and info.value.value == "float16" and "'w'" in str(info.value)
