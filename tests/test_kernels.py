"""The fused chunk-major kernel (and every other path) against the reference loop of Algorithm 1.

Table-driven: optimizers x scenarios (schedule, pivot, adaptive or fixed, weights, order,
epochs/batch/shuffle, amplification), on small models and on models too large to stack
(several chunks per key). Tolerances: float64 atol 1e-10 / rtol 1e-9, float32 atol 1e-5 /
rtol 1e-4 -- the paths round differently (the kernel forms ``ζ Ω_B (p − x̄_B)``, the
reference ``ζ Σ ω_j (p − x_j)``). Scenarios avoid ``g ≈ 0`` (a full batch at the soup
pivot), where Adam-like optimizers divide rounding noise by rounding noise and any two
exact implementations differ by up to ``lr`` per step.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fedsoup
import fedsoup.ame as ame
from fedsoup import fused
from fedsoup.options import MergeOptions
from fedsoup.plan import make_plan

N = 6


def make_models(n=N, seed=0, dtype=torch.float64, large=False):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"big": (70_003,), "mid": (9, 1000)} if large else {"w": (4, 3), "b": (4,), "head": (2, 2, 2)}
    models = []
    for i in range(n):
        model = {k: torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for k, s in shapes.items()}
        model["count"] = torch.tensor(10 + i)
        models.append(model)
    return models


def random_weights(n=N, seed=1):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).add(0.1).tolist()


def assert_close_dicts(actual, expected, atol, rtol):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        if value.is_floating_point():
            torch.testing.assert_close(actual[key].double(), value.double(), atol=atol, rtol=rtol, msg=key)
        else:
            assert torch.equal(actual[key], value), key


def assert_same_bytes(a, b):
    for key in a:
        assert a[key].numpy().tobytes() == b[key].numpy().tobytes(), key


OPTIMIZERS = [
    ("sgd", 0.3, {}),
    ("sgd-momentum-dampening", "sgd", 0.3, {"momentum": 0.9, "dampening": 0.3}),
    ("sgd-nesterov-wd", "sgd", 0.2, {"momentum": 0.5, "nesterov": True, "weight_decay": 0.01}),
    ("adam", 0.05, {"betas": (0.8, 0.9), "eps": 1e-5}),
    ("adam-amsgrad-wd", "adam", 0.05, {"amsgrad": True, "weight_decay": 0.02}),
    ("adam-small-beta1", "adam", 0.05, {"betas": (0.3, 0.4)}),
    ("adamw", 0.05, {"weight_decay": 0.05}),
    ("adagrad", 0.1, {"lr_decay": 0.05, "initial_accumulator_value": 0.2, "weight_decay": 0.01}),
    ("rmsprop", 0.01, {"alpha": 0.9}),
    ("rmsprop-centered-momentum", "rmsprop", 0.01, {"alpha": 0.9, "momentum": 0.5, "centered": True}),
    ("adamax", 0.05, {"weight_decay": 0.01}),
    ("fedadam", 0.05, {"betas": (0.9, 0.99), "eps": 1e-3}),
    ("fedyogi", 0.05, {"eps": 1e-3}),
    ("fedadagrad", 0.05, {"eps": 1e-3}),
]
OPTIMIZERS = [(row[0], row[0], *row[1:]) if len(row) == 3 else row for row in OPTIMIZERS]

SCENARIOS = {
    "constant-soup-adaptive": dict(schedule="constant", epochs=3, batch_size=2, shuffle=True, seed=5),
    "harmonic-first-fixed-weights": dict(schedule="harmonic", pivot="first", adaptive_pivot=False,
                                         weights=random_weights(), epochs=2, batch_size=4),
    "poly-index-order-zeta": dict(schedule="poly", alpha=-0.7, pivot=2, order_by=[3, 1, 4, 1, 5, 9],
                                  amplification=2.0, epochs=2, batch_size=1),
    "callable-statedict-zeta-callable": dict(schedule=lambda k: 0.05 / k ** 0.5, pivot="state",
                                             amplification=lambda k: 1.0 + 0.1 * k, epochs=2, batch_size=3,
                                             shuffle=True, seed=3),
    "harmonic-soup-fixed-ascending": dict(schedule="harmonic", adaptive_pivot=False, order_by=[3, 1, 4, 1, 5, 9],
                                          descending=False, weights=[1, 0, 2, 1, 1, 3], epochs=4, batch_size=5,
                                          shuffle=True, seed=9),
}


def options_for(models, scenario, lr, kwargs):
    options = dict(SCENARIOS[scenario], lr=lr, **kwargs)
    if options.get("pivot") == "state":
        options["pivot"] = {k: v * 0.5 + 0.1 if v.is_floating_point() else v for k, v in models[1].items()}
    return options


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("case", OPTIMIZERS, ids=[c[0] for c in OPTIMIZERS])
def test_fused_matches_reference_small_float64(case, scenario):
    _, name, lr, kwargs = case
    models = make_models()
    options = options_for(models, scenario, lr, kwargs)
    expected = fedsoup.merge(models, optimizer=name, _path="reference", **options)
    actual = fedsoup.merge(models, optimizer=name, _path="fused", **options)
    assert_close_dicts(actual, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", OPTIMIZERS, ids=[c[0] for c in OPTIMIZERS])
def test_fused_matches_reference_large(case, dtype):
    """Models too large to stack: several chunks per key, one key not a multiple of the chunk."""
    _, name, lr, kwargs = case
    models = make_models(5, seed=2, dtype=dtype, large=True)
    options = dict(lr=lr, epochs=2, batch_size=2, shuffle=True, seed=1, weights=random_weights(5), **kwargs)
    expected = fedsoup.merge(models, optimizer=name, _path="reference", **options)
    actual = fedsoup.merge(models, optimizer=name, **options)
    if dtype == torch.float64:
        assert_close_dicts(actual, expected, atol=1e-12, rtol=1e-10)
    else:
        # amsgrad's max(v_max, v) flips on a float32 rounding near a tie and moves that
        # coordinate by ~lr·1e-3 (torch's own fused Adam differs from its loop the same way).
        atol = 5e-4 if kwargs.get("amsgrad") else 1e-5
        assert_close_dicts(actual, expected, atol=atol, rtol=1e-4)


def test_maximize_options_match_reference():
    models = make_models()
    for name, kwargs in [("sgd", {"momentum": 0.5}), ("adam", {}), ("adagrad", {}), ("rmsprop", {}), ("adamax", {})]:
        options = dict(optimizer=name, lr=0.01, epochs=2, batch_size=2, maximize=True, **kwargs)
        expected = fedsoup.merge(models, _path="reference", **options)
        assert_close_dicts(fedsoup.merge(models, _path="fused", **options), expected, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("path", ["fused", "flat", "stacked", "reference"])
def test_per_key_learning_rates(path):
    """A mapping of per-key lrs equal to one float is that float; differing ones match the reference."""
    models = make_models()
    options = dict(optimizer="adam", epochs=2, batch_size=2, shuffle=True, schedule="harmonic")
    float_keys = [k for k in models[0] if models[0][k].is_floating_point()]
    one = fedsoup.merge(models, lr=0.03, _path=path, **options)
    mapping = fedsoup.merge(models, lr={k: 0.03 for k in float_keys}, _path=path, **options)
    assert_same_bytes(one, mapping)
    lrs = {"w": 0.01, "b": 0.2, "head": 0.03}
    per_key = fedsoup.merge(models, lr=lrs, _path=path, **options)
    reference = fedsoup.merge(models, lr=lrs, _path="reference", **options)
    assert_close_dicts(per_key, reference, atol=1e-10, rtol=1e-9)
    for key, lr in lrs.items():
        alone = fedsoup.merge([{key: m[key]} for m in models], lr=lr, _path="reference", **options)
        torch.testing.assert_close(per_key[key], alone[key], atol=1e-10, rtol=1e-9)


def test_per_key_lr_must_cover_every_floating_key():
    with pytest.raises(ValueError, match="no learning rate for tensor 'head'"):
        fedsoup.merge(make_models(), optimizer="adam", lr={"w": 0.1, "b": 0.1})


def test_key_by_key_is_bit_identical_to_whole_model():
    """What --low-memory relies on: chunks are cut at key-local offsets."""
    models = make_models(5, dtype=torch.float32, large=True)
    options = dict(optimizer="adam", lr=0.01, epochs=3, batch_size=2, shuffle=True, seed=4)
    whole = fedsoup.merge(models, **options)
    for key in ("big", "mid"):
        single = fedsoup.merge([{key: m[key]} for m in models], **options)
        assert single[key].numpy().tobytes() == whole[key].numpy().tobytes()


THREADS_SCRIPT = """
import hashlib, torch, fedsoup
gen = torch.Generator().manual_seed(0)
models = [{"a": torch.randn(50_000, generator=gen), "b": torch.randn(3, 7, generator=gen)} for _ in range(5)]
merged = fedsoup.merge(models, optimizer="adam", lr=0.01, epochs=3, batch_size=2, shuffle=True, _path="fused")
print(hashlib.sha256(b"".join(merged[k].numpy().tobytes() for k in sorted(merged))).hexdigest())
"""


def test_same_bytes_with_one_and_two_numba_threads():
    digests = []
    for threads in ("1", "2"):
        env = dict(os.environ, NUMBA_NUM_THREADS=threads)
        run = subprocess.run([sys.executable, "-c", THREADS_SCRIPT], env=env, capture_output=True, text=True,
                             check=True)
        digests.append(run.stdout.split()[-1])
    assert digests[0] == digests[1]
    gen = torch.Generator().manual_seed(0)
    models = [{"a": torch.randn(50_000, generator=gen), "b": torch.randn(3, 7, generator=gen)} for _ in range(5)]
    merged = fedsoup.merge(models, optimizer="adam", lr=0.01, epochs=3, batch_size=2, shuffle=True)
    here = hashlib.sha256(b"".join(merged[k].numpy().tobytes() for k in sorted(merged))).hexdigest()
    assert here == digests[0]  # and the same in this process, whatever its thread count


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_round_trip(dtype):
    models = make_models(4, dtype=dtype)
    options = dict(optimizer="adamw", lr=0.05, epochs=2, batch_size=2)
    merged = fedsoup.merge(models, _path="fused", **options)
    upcast = [{k: v.float() if v.is_floating_point() else v for k, v in m.items()} for m in models]
    expected = fedsoup.merge(upcast, _path="fused", **options)
    for key, value in merged.items():
        assert value.dtype == models[0][key].dtype, key
        assert torch.equal(value, expected[key].to(value.dtype)), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_values_upcast_exactly_in_the_kernel(dtype):
    """Every 16-bit pattern class: zeros, subnormals, normals, the largest finite value."""
    info = torch.finfo(dtype)
    values = torch.tensor([0.0, -0.0, 1.5, -2.25, 1 / 3, info.tiny, info.tiny / 8, -info.max, info.max], dtype=dtype)
    models = [{"w": values.clone()}, {"w": values.clone()}]
    options = dict(optimizer="sgd", lr=1.0, schedule="constant", pivot="first", _path="fused")
    merged = fedsoup.merge(models, **options)
    assert merged["w"].dtype == dtype and torch.equal(merged["w"], values)
    soup, _ = fused.soup_and_distances(models, [0.5, 0.5])
    assert torch.equal(soup["w"], values.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_nan_is_reported(dtype):
    models = make_models(3, dtype=dtype)
    models[1]["head"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="ingredient 1.*'head'"):
        fedsoup.merge(models, optimizer="adam", lr=0.1, _path="fused")


def test_mixed_compute_dtypes_in_one_model():
    models = make_models(4, dtype=torch.float32)
    for m in models:
        m["head"] = m["head"].double()
    options = dict(optimizer="adam", lr=0.05, epochs=2, batch_size=2)
    merged = fedsoup.merge(models, **options)
    assert merged["head"].dtype == torch.float64 and merged["w"].dtype == torch.float32
    assert_close_dicts(merged, fedsoup.merge(models, _path="reference", **options), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------
# Dispatch: every path is taken, and a forced path that cannot run says so.
# ---------------------------------------------------------------------------


@pytest.fixture
def ran(monkeypatch):
    """Records which path functions merge called."""
    calls = []
    for name in ("merge_reference", "merge_flat", "_soup"):
        original = getattr(ame, name)
        monkeypatch.setattr(ame, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    original_fused = fused.merge_fused
    monkeypatch.setattr(fused, "merge_fused", lambda *a, **k: calls.append("merge_fused") or original_fused(*a, **k))
    return calls


@pytest.mark.parametrize(
    "options, large, expected",
    [
        ({}, False, "_soup"),
        ({"optimizer": "adam", "lr": 0.1}, False, "merge_fused"),
        ({"optimizer": "sgd", "lr": 0.5, "epochs": 2}, True, "merge_fused"),
        ({"optimizer": "nadam", "lr": 0.1}, False, "merge_flat"),  # stacked
        ({"optimizer": "nadam", "lr": 0.1}, True, "merge_flat"),
        ({"optimizer": "adam", "lr": 0.1, "project": True}, False, "merge_reference"),
        ({"optimizer": "adam", "lr": 0.1, "greedy": True, "evaluate": lambda sd: 0.0}, False, "merge_reference"),
        ({"optimizer": torch.optim.Adafactor, "lr": 0.1}, False, "merge_reference"),
    ],
)
def test_every_path_is_taken(ran, options, large, expected):
    fedsoup.merge(make_models(4, large=large), **options)
    assert ran == [expected]


def test_forcing_a_path_that_cannot_run_raises():
    with pytest.raises(ValueError, match="fused kernel cannot run"):
        fedsoup.merge(make_models(), optimizer="nadam", _path="fused")
    with pytest.raises(ValueError, match="unknown merge path"):
        fedsoup.merge(make_models(), _path="gpu")


# ---------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_device_merges_there_and_returns_there(device):
    models = make_models(4, dtype=torch.float32)
    options = dict(optimizer="adam", lr=0.05, epochs=2, batch_size=2)
    on_cpu = fedsoup.merge(models, **options)
    numpy_models = [{k: v.numpy() for k, v in m.items()} for m in models]
    merged = fedsoup.merge(numpy_models, device=device, **options)
    moved = fedsoup.merge([{k: v.to(device) for k, v in m.items()} for m in models], **options)
    for result in (merged, moved):
        assert all(v.device.type == device for v in result.values())
        assert_close_dicts({k: v.cpu() for k, v in result.items()}, on_cpu, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_inputs_back_to_cpu():
    models = [{k: v.cuda() for k, v in m.items()} for m in make_models(4, dtype=torch.float32)]
    merged = fedsoup.merge(models, optimizer="adam", lr=0.05, device="cpu")
    assert all(v.device.type == "cpu" for v in merged.values())


def test_numpy_inputs_default_to_cpu():
    models = [{k: np.asarray(v) for k, v in m.items()} for m in make_models(3)]
    merged = fedsoup.merge(models, optimizer="adam", lr=0.05)
    assert all(v.device.type == "cpu" for v in merged.values())


# ---------------------------------------------------------------------------
# Soup and spread in one pass (for scale-aware defaults)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soup_and_distances(dtype):
    models = make_models(5, dtype=dtype, large=True)
    weights = [w / sum(random_weights(5)) for w in random_weights(5)]
    soup, distances = fused.soup_and_distances(models, weights)
    expected = fedsoup.soup(models, weights)
    for key in ("big", "mid"):
        assert soup[key].dtype == dtype
        torch.testing.assert_close(soup[key], expected[key], atol=1e-6, rtol=1e-6)
        center = expected[key].double()
        want = [float(torch.sum((m[key].double() - center) ** 2)) for m in models]
        np.testing.assert_allclose(distances[key], want, rtol=1e-5)
        spread = sum(w * d for w, d in zip(weights, distances[key]))
        assert spread == pytest.approx(sum(w * d for w, d in zip(weights, want)), rel=1e-5)
    assert "count" not in distances
    again = fused.soup_and_distances(models, weights)
    assert all(np.array_equal(again[1][k], distances[k]) for k in distances)
    assert all(torch.equal(again[0][k], soup[k]) for k in soup)


# ---------------------------------------------------------------------------
# The ball guard's distances, measured in the kernel's own pass
# ---------------------------------------------------------------------------


def squared_distance(a, b) -> float:
    return float(torch.sum((a.double() - b.double()) ** 2))


@pytest.mark.parametrize("pivot", ["soup", "given"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_measures_the_guard_distances(pivot, dtype):
    models = make_models(5, dtype=dtype, large=True)
    weights = [w / sum(random_weights(5)) for w in random_weights(5)]
    start = None if pivot == "soup" else {k: v * 0.5 if v.is_floating_point() else v for k, v in models[3].items()}
    options = MergeOptions(optimizer="adam", lr=0.01, epochs=2, batch_size=2)
    problem = make_plan(models, options, weights=weights, pivot=start, path="fused")
    merged, distances = fused.merge_fused(problem, problem.kernel, [4, 0, 2])
    soup = fedsoup.soup(models, weights)
    for key in ("big", "mid"):
        w0 = soup[key] if start is None else start[key]
        want = [squared_distance(models[j][key], soup[key]) for j in (4, 0, 2)]
        want += [squared_distance(w0, soup[key]), squared_distance(merged[key], soup[key])]
        np.testing.assert_allclose(distances[key], want, rtol=1e-5 if dtype == torch.float32 else 1e-10)
    plain, none = fused.merge_fused(problem, problem.kernel)
    assert none == {} and all(torch.equal(plain[k], merged[k]) for k in merged)


def test_guard_bound_falls_back_to_every_ingredient(monkeypatch, caplog):
    # The first ingredient sits at the soup: its distance bounds nothing, the merge ends
    # outside that small ball but inside the real one -- no warning, after a second pass.
    models = [{"w": torch.tensor([0.01, 0.0])}, {"w": torch.tensor([10.0, 0.0])}, {"w": torch.tensor([-10.01, 0.0])}]
    passes = []
    measure = fedsoup.ame.measure_spreads
    monkeypatch.setattr(fedsoup.ame, "measure_spreads", lambda p: passes.append(1) or measure(p))
    with caplog.at_level("WARNING", logger="fedsoup"):
        fedsoup.merge(models, optimizer="adam", lr=1.0, schedule="constant", _path="fused")
        assert passes == [1] and not caplog.records
        fedsoup.merge(models, optimizer="adam", lr=100.0, schedule="constant", _path="fused")
        assert passes == [1, 1] and len(caplog.records) == 1
        fedsoup.merge(models, optimizer="adam", lr=1e-4, _path="fused")  # inside the bound: one pass
        assert passes == [1, 1] and len(caplog.records) == 1


@pytest.mark.parametrize("cls", list(fused._SPECS), ids=lambda c: c.__name__)
def test_kernel_spec_defaults_are_the_constructors(cls):
    """The spec reads defaults from the signature (no torch.optim import cost): the same values."""
    built = cls([torch.zeros(1)], lr=1.0).defaults
    if cls is torch.optim.AdamW:
        assert built["decoupled_weight_decay"]
    assert fused.kernel_spec(cls, MergeOptions(optimizer=cls).optimizer_settings).hyper == fused._SPECS[cls](built).hyper


@pytest.mark.parametrize("cls, kwargs", [
    (torch.optim.Adam, {"betas": (1.0, 0.9)}),
    (torch.optim.SGD, {"nesterov": True}),
    (torch.optim.Adam, {"momentum": 0.9}),
    (torch.optim.Adagrad, {"eps": -1.0}),
    (torch.optim.RMSprop, {"alpha": -0.5}),
])
def test_options_reject_what_the_constructor_rejects_before_the_kernel(cls, kwargs):
    # The kernel trusts resolved settings: the options refuse bad values when built (tests/test_pipeline.py
    # proves their table of checks agrees with every constructor).
    with pytest.raises(fedsoup.OptionError):
        MergeOptions(optimizer=cls, optimizer_kwargs=kwargs)
    with pytest.raises((ValueError, TypeError)):
        cls([torch.zeros(1)], lr=1.0, **kwargs)


def test_merge_leaves_torch_thread_count_as_it_was():
    """numba's OpenMP layer shares torch's OpenMP thread count; the merge restores it."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        fedsoup.merge(make_models(3, large=True), optimizer="adam", lr=0.01, _path="fused")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_without_numba_the_torch_path_runs(ran, monkeypatch):
    monkeypatch.setattr(fused, "available", lambda: False)
    models = make_models(4)
    merged = fedsoup.merge(models, optimizer="adam", lr=0.1, epochs=2)
    assert ran == ["merge_flat"]
    expected = fedsoup.merge(models, optimizer="adam", lr=0.1, epochs=2, _path="reference")
    assert_close_dicts(merged, expected, atol=1e-12, rtol=1e-10)
