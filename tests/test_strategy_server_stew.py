"""ServerStew by itself: x_t = x_{t-1} − lr·Optimizer(x_{t-1} − w_t), state that survives files."""

from __future__ import annotations

import math

import pytest
import torch

from fedsoup.errors import OptionError, UnknownOptionError
from fedsoup.state import load_checkpoint, save_checkpoint
from strategies import ServerStew


def model(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 4, generator=g).to(dtype),
        "b": torch.randn(4, generator=g).to(dtype),
        "steps": torch.tensor(seed, dtype=torch.int64),
    }


def run(stew: ServerStew, rounds: range, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for t in rounds:
        x, _ = stew.step(x, model(100 + t, x["w"].dtype))
    return x


def test_identity_stew_returns_the_soup_without_an_optimizer():
    stew = ServerStew()
    assert stew.is_identity
    current, merged = model(0), model(1, torch.float64)
    new, grad_norm = stew.step(current, merged)
    assert stew.optimizer is None
    for key in current:
        assert new[key].dtype == current[key].dtype  # x_{t-1}'s dtypes are kept
        torch.testing.assert_close(new[key], merged[key].to(current[key].dtype))
    expected_norm = math.sqrt(sum(float(torch.dist(current[k], merged[k])) ** 2 for k in ("w", "b")))
    assert grad_norm == pytest.approx(expected_norm)


@pytest.mark.parametrize("kwargs", [{"lr": 0.5}, {"momentum": 0.9}, {"weight_decay": 0.1}])
def test_sgd_with_other_settings_is_not_the_identity(kwargs):
    assert not ServerStew("sgd", **kwargs).is_identity


def test_momentum_stew_is_fedavgm_closed_form():
    lr, mu = 0.7, 0.9
    stew = ServerStew("sgd", lr=lr, momentum=mu)
    x = {k: v.double() if v.is_floating_point() else v for k, v in model(0).items()}
    velocity = None
    for t in range(3):
        merged = {k: v.double() if v.is_floating_point() else v for k, v in model(10 + t).items()}
        g = x["w"] - merged["w"]
        velocity = g if velocity is None else mu * velocity + g
        expected_w = x["w"] - lr * velocity
        x, grad_norm = stew.step(x, merged)
        torch.testing.assert_close(x["w"], expected_w, rtol=1e-12, atol=1e-12)
        assert x["steps"] == merged["steps"]  # integer arrays come from w_t, never stepped
    assert list(stew.parameters) == ["w", "b"]


def test_half_precision_is_stepped_in_float32_and_returned_in_its_dtype():
    stew = ServerStew("fedadam", lr=0.1)
    x = run(stew, range(2), model(0, torch.float16))
    assert x["w"].dtype == torch.float16 and x["steps"].dtype == torch.int64
    assert stew.parameters["w"].dtype == torch.float32


def test_state_survives_a_checkpoint_and_continues_exactly(tmp_path):
    settings = {"optimizer": "fedyogi", "lr": 0.05, "betas": (0.9, 0.99), "eps": 1e-3}
    reference = ServerStew.from_settings(settings)
    expected = run(reference, range(4), model(0))

    first = ServerStew.from_settings(settings)
    x = run(first, range(2), model(0))
    save_checkpoint(tmp_path, {"stew": first.state_dict(), "x": x}, tag="stew")
    state = load_checkpoint(tmp_path)
    assert state["stew"]["keys"] == ["w", "b"] and state["stew"]["shapes"] == [[3, 4], [4]]
    second = ServerStew.from_settings(settings)
    second.load_state_dict(state["stew"])
    got = run(second, range(2, 4), state["x"])
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_state_before_the_first_step_has_no_optimizer_state():
    state = ServerStew("adam", lr=0.1).state_dict()
    assert state["optimizer"] == "adam" and state["state"] is None and state["keys"] == []
    again = ServerStew("adam", lr=0.1)
    again.load_state_dict(state)
    assert again.optimizer is None


def test_loading_another_optimizers_state_is_refused():
    stew = ServerStew("fedadam", lr=0.1)
    run(stew, range(1), model(0))
    with pytest.raises(ValueError, match="ServerStew optimizer is 'fedadam'"):
        ServerStew("sgd", lr=0.5, momentum=0.9).load_state_dict(stew.state_dict())


def test_a_model_with_other_arrays_is_refused():
    stew = ServerStew("sgd", lr=0.5, momentum=0.9)
    run(stew, range(1), model(0))
    other = {"w": torch.zeros(3, 4), "head": torch.zeros(2)}
    with pytest.raises(ValueError, match="floating arrays changed"):
        stew.step(other, other)


def test_bad_settings_are_typed_errors():
    with pytest.raises(UnknownOptionError, match="did you mean 'momentum'") as raised:
        ServerStew("sgd", lr=0.5, momentun=0.9)
    assert raised.value.option == "momentun"
    with pytest.raises(OptionError, match="unknown optimizer"):
        ServerStew.from_settings({"optimizer": "sgdd"})
    with pytest.raises(OptionError, match="invalid betas for Adam"):
        ServerStew("adam", lr=0.1, betas=(0.9,))
