"""Safe AME defaults: the scale-aware lr of adaptive optimizers and the ball guard (Prop. 2)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import fedsoup
from fedsoup import defaults
from fedsoup.ball import measure_spreads
from fedsoup.options import MergeOptions
from fedsoup.plan import make_plan
from fedsoup.report import MergeReport

ADAPTIVE = ("adam", "adamw", "adagrad", "rmsprop", "nadam", "radam", "adamax", "rprop",
            "fedadam", "fedyogi", "fedadagrad")


def ingredients(spread: float, n: int = 8, seed: int = 0, dtype=torch.float32) -> list[dict[str, torch.Tensor]]:
    """``n`` models around one base (|base| ~ 1); biases spread 10x less than weights."""
    gen = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(16, 8, generator=gen, dtype=dtype), "b": torch.randn(16, generator=gen, dtype=dtype)}
    return [{"w": base["w"] + spread * torch.randn(16, 8, generator=gen, dtype=dtype),
             "b": base["b"] + 0.1 * spread * torch.randn(16, generator=gen, dtype=dtype)} for _ in range(n)]


def ball(models, merged, pivot=None) -> tuple[float, float]:
    """(‖w − s‖, radius of Prop. 2's ball) in float64."""
    soup = {k: sum(m[k].double() for m in models) / len(models) for k in models[0]}

    def dist(state) -> float:
        return math.sqrt(sum(float(torch.sum((state[k].double() - soup[k]) ** 2)) for k in soup))

    radius = max([dist(m) for m in models] + ([dist(pivot)] if pivot is not None else []))
    return dist(merged), radius


@pytest.mark.parametrize("optimizer", ADAPTIVE)
def test_adaptive_defaults_stay_in_the_ball_at_any_scale(optimizer, caplog):
    ratios = []
    with caplog.at_level(logging.WARNING, logger="fedsoup"):
        for spread in (1e-4, 1e-2, 1.0):
            # float64: a step of 0.5% of a 1e-4 spread around weights of size 1 is a few
            # float32 ulps, and their rounding would blur the scale-free comparison.
            models = ingredients(spread, dtype=torch.float64)
            distance, radius = ball(models, fedsoup.merge(models, optimizer=optimizer))
            assert distance <= radius
            ratios.append(distance / radius)
    assert not caplog.records
    if optimizer not in ("fedadam", "fedyogi", "fedadagrad", "radam", "rprop"):
        # Scale-free: the same relative distance whatever the spread (Flower's tau=1e-3,
        # RAdam's un-adapted first steps and Rprop's smallest step 1e-6 are not).
        assert max(ratios) - min(ratios) < 0.05 * max(ratios)
        assert min(ratios) > 0  # and not "do nothing": it moved away from the soup


@pytest.mark.parametrize("optimizer", ("adam", "adagrad", "rmsprop"))
def test_adaptive_defaults_stay_in_the_ball_with_a_far_pivot_and_many_epochs(optimizer):
    models = ingredients(1e-2)
    pivot = {k: v + 0.5 for k, v in models[0].items()}
    merged = fedsoup.merge(models, optimizer=optimizer, pivot=pivot, epochs=5, batch_size=2, shuffle=True)
    distance, radius = ball(models, merged, pivot)
    assert distance <= radius


@pytest.mark.parametrize("path", ("soup", "reference", "stacked", "flat"))
def test_sgd_identity_holds_with_defaults(path):
    models = ingredients(0.1)
    expected = fedsoup.soup(models)
    merged = fedsoup.merge(models, _path=path)  # lr=None: 1.0 for SGD
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-6, atol=1e-6)
    fixed = fedsoup.merge(models, schedule="constant", adaptive_pivot=False, _path=path)
    for key in expected:
        torch.testing.assert_close(fixed[key], expected[key], rtol=1e-6, atol=1e-6)


def test_explicit_large_lr_leaving_the_ball_warns_once_saying_by_how_much_and_what_to_change(caplog):
    models = ingredients(1e-2)
    with caplog.at_level(logging.WARNING, logger="fedsoup"):
        merged = fedsoup.merge(models, optimizer="adam", lr=1.0)
    distance, radius = ball(models, merged)
    assert distance > 10 * radius  # the explicit lr was taken as given
    [record] = caplog.records
    assert record.levelno == logging.WARNING and record.name == "fedsoup"
    message = record.getMessage()
    assert f"{distance / radius:.3g}x" in message
    assert "lr" in message and "project=True" in message


def test_no_warning_when_the_merge_stays_in_the_ball(caplog):
    models = ingredients(1e-2)
    with caplog.at_level(logging.WARNING, logger="fedsoup"):
        fedsoup.merge(models, optimizer="adam", lr=1e-5)
        fedsoup.merge(models, optimizer="sgd", lr=0.5, momentum=0.5)
        fedsoup.merge(models, optimizer="adam", lr=1.0, project=True)  # inside by construction
    assert not caplog.records


def test_explicit_lr_is_taken_as_given():
    models = ingredients(1e-2)
    explicit = fedsoup.merge(models, optimizer="adam", lr=1e-3)
    per_key = fedsoup.merge(models, optimizer="adam", lr={"w": 1e-3, "b": 1e-3})
    for key in explicit:
        torch.testing.assert_close(explicit[key], per_key[key], rtol=0, atol=0)


def test_default_lr_is_per_tensor_so_tensor_by_tensor_merges_are_identical():
    models = ingredients(1e-2)
    pivot = {k: v + 0.01 for k, v in models[3].items()}
    kwargs = {"optimizer": "adam", "epochs": 3, "batch_size": 3, "shuffle": True, "pivot": pivot}
    whole = fedsoup.merge(models, **kwargs)
    for key in whole:
        part = fedsoup.merge([{key: m[key]} for m in models], **{**kwargs, "pivot": {key: pivot[key]}})
        torch.testing.assert_close(part[key], whole[key], rtol=0, atol=0)


def test_tensor_by_tensor_guard_checks_the_whole_model_once(caplog):
    models = ingredients(1e-2)
    # The bias ingredients agree 10x more than the weights: a per-tensor ball would flag
    # a bias that moves as far as the weights do; the model's ball does not.
    lr = {"w": 1e-4, "b": 5e-4}
    with caplog.at_level(logging.WARNING, logger="fedsoup"):
        whole = fedsoup.merge(models, optimizer="adam", lr=lr)
        in_memory_warned = bool(caplog.records)
        # each part's merge measures its ball and leaves the check to the caller (_part)
        parts = [fedsoup.merge([{key: m[key]} for m in models], optimizer="adam", lr=lr[key], report=True,
                               _part=True)[1] for key in models[0]]
        assert not caplog.records
        guard = MergeReport.of_parts(parts).ball
        assert guard.outside() == in_memory_warned
        distance, radius = ball(models, whole)
        assert guard.distance == pytest.approx(distance, rel=1e-4)
        assert guard.radius == pytest.approx(radius, rel=1e-4)
        caplog.clear()
        parts = [fedsoup.merge([{key: m[key]} for m in models], optimizer="adam", lr=1.0, report=True,
                               _part=True)[1] for key in models[0]]
    assert not caplog.records and MergeReport.of_parts(parts).outside_ball


def test_a_tensor_every_input_agrees_on_gets_lr_zero_and_stays():
    models = ingredients(1e-2)
    for model in models:
        model["frozen"] = torch.full((4,), 0.25)
    merged = fedsoup.merge(models, optimizer="adam")
    assert torch.equal(merged["frozen"], torch.full((4,), 0.25))


def test_default_lr_formula():
    # Ingredients 0 and 2 (weights 1/4, 3/4) around the soup 1.5 on one coordinate.
    problem = make_plan([{"x": torch.tensor([0.0])}, {"x": torch.tensor([2.0])}], MergeOptions(optimizer="adam"),
                        weights=[0.25, 0.75])
    spreads = measure_spreads(problem)
    torch.testing.assert_close(spreads.soups["x"], torch.tensor([1.5]))
    spread = spreads.keys["x"]
    assert spread.ingredient_sq == pytest.approx((2.25, 0.25))
    omega = [0.25, 0.75]
    assert spread.mean_sq_to_pivot(omega) == pytest.approx(0.25 * 2.25 + 0.75 * 0.25)
    rho = math.sqrt(0.75)
    assert defaults.default_lr(spread, omega, gain=2.0, peak=4.0, fraction=0.5) == pytest.approx(0.5 * rho / 8)
    # harmonic, batch 1: the peak is 1/V_1 = 4; Adam's gain is 1
    assert defaults.scale_aware_lr(problem, spreads, fraction=0.5) == {"x": pytest.approx(0.5 * rho / 4)}
    # A pivot adds its squared distance to the soup (parallel-axis identity).
    problem.pivot = {"x": torch.tensor([3.5])}
    moved = measure_spreads(problem).keys["x"]
    assert moved.mean_sq_to_pivot(omega) == pytest.approx(0.25 * 3.5**2 + 0.75 * 1.5**2)


def test_first_step_gain_and_schedule_peak():
    # The gain is what one step of the optimizer itself does (torch.optim as the reference).
    for cls, kwargs in ((torch.optim.Adam, {}), (torch.optim.RMSprop, {"alpha": 0.9}),
                        (torch.optim.RMSprop, {"centered": True}), (torch.optim.Adagrad, {}),
                        (fedsoup.FedYogi, {}), (fedsoup.FedAdam, {}), (torch.optim.NAdam, {})):
        param = torch.zeros(1, dtype=torch.float64)
        param.grad = torch.ones(1, dtype=torch.float64)
        cls([param], lr=1.0, **kwargs).step()
        # (the gain ignores eps: Flower's tau = 1e-3 takes 1% off a unit gradient's step)
        assert defaults.first_step_gain(cls, kwargs) == pytest.approx(abs(float(param)), rel=2e-2), cls
    assert defaults.first_step_gain(torch.optim.Adam, {}) == pytest.approx(1.0, rel=1e-6)
    assert defaults.first_step_gain(torch.optim.Adagrad, {}) == pytest.approx(1.0, rel=1e-6)
    assert defaults.first_step_gain(torch.optim.RMSprop, {}) == pytest.approx(10.0, rel=1e-6)
    assert defaults.first_step_gain(torch.optim.RMSprop, {"alpha": 0.75}) == pytest.approx(2.0, rel=1e-6)
    assert defaults.first_step_gain(fedsoup.FedYogi, {"betas": (0.9, 0.99)}) == pytest.approx(1.0)
    assert defaults.first_step_gain(fedsoup.FedYogi, {"betas": (0.8, 0.99)}) == pytest.approx(2.0)
    assert defaults.schedule_peak("harmonic", -1.1, 0.25, 10) == 4.0
    assert defaults.schedule_peak("constant", -1.1, 0.25, 10) == 1.0
    assert defaults.schedule_peak("poly", 0.5, 0.25, 16) == 4.0
    assert defaults.is_scale_free(torch.optim.Adam) and defaults.is_scale_free(fedsoup.FedYogi)
    assert not defaults.is_scale_free(torch.optim.SGD) and not defaults.is_scale_free(torch.optim.LBFGS)


def test_default_lr_end_to_end():
    # Soup (1, -1), every coordinate 1 from it: rho = 1; harmonic, batch 1 of 2: peak 1/V_1 = 2.
    models = [{"x": torch.tensor([0.0, 0.0])}, {"x": torch.tensor([2.0, -2.0])}]
    c = defaults.DEFAULT_LR_FRACTION
    for optimizer, gain in (("adam", 1.0), ("rmsprop", 10.0)):
        expected = fedsoup.merge(models, optimizer=optimizer, lr=c * 1.0 / (gain * 2))
        torch.testing.assert_close(fedsoup.merge(models, optimizer=optimizer)["x"], expected["x"], rtol=1e-6, atol=1e-7)
    # Adam's first step is sign(g) * eta_1: the largest step moves a coordinate by c * rho.
    once = fedsoup.merge(models[:1], optimizer="adam", pivot={"x": torch.tensor([1.0, -1.0])})
    torch.testing.assert_close(once["x"], torch.tensor([1.0 - c, -1.0 + c]))


def test_merge_files_low_memory_equals_in_memory_with_defaults_and_guards_the_whole_model(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    models = ingredients(1e-2, n=4)
    inputs = []
    for i, model in enumerate(models):
        inputs.append(tmp_path / f"m{i}.safetensors")
        save_file(model, inputs[-1])
    kwargs = {"optimizer": "adam", "epochs": 2, "shuffle": True, "progress": False}
    fedsoup.merge_files(inputs, tmp_path / "mem.safetensors", low_memory=False, **kwargs)
    fedsoup.merge_files(inputs, tmp_path / "low.safetensors", low_memory=True, **kwargs)
    mem, low = load_file(tmp_path / "mem.safetensors"), load_file(tmp_path / "low.safetensors")
    for key in mem:
        torch.testing.assert_close(low[key], mem[key], rtol=0, atol=0)
    with caplog.at_level(logging.WARNING, logger="fedsoup"):
        fedsoup.merge_files(inputs, tmp_path / "far.safetensors", low_memory=True, lr=1.0, **kwargs)
    assert len([r for r in caplog.records if "Proposition 2" in r.getMessage()]) == 1
