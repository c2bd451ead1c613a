"""The Flower-convention server optimizers against Flower's formulas (flwr 1.41 message API)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fedsoup
from fedsoup.optim import FedAdagrad, FedAdam, FedYogi


def flower_fedopt(kind, x0, soups, eta, beta_1, beta_2, tau):
    """Flower's FedAdam / FedYogi / FedAdagrad aggregate_train, written out in numpy.

    Round t (server_round = t, from 1): delta = soup - x; m = b1 m + (1-b1) delta;
    Adam: v = b2 v + (1-b2) delta^2, x += eta*sqrt(1-b2^(t+1))/(1-b1^(t+1)) * m/(sqrt(v)+tau);
    Yogi: v = v - (1-b2) delta^2 sign(v - delta^2), x += eta m/(sqrt(v)+tau);
    Adagrad (b1 = 0): v = v + delta^2, x += eta m/(sqrt(v)+tau).
    """
    x = x0.copy()
    m = np.zeros_like(x)
    v = np.zeros_like(x)
    history = []
    for server_round, soup in enumerate(soups, start=1):
        delta = soup - x
        if kind == "fedadagrad":
            beta_1 = 0.0
        m = beta_1 * m + (1 - beta_1) * delta
        if kind == "fedadam":
            v = beta_2 * v + (1 - beta_2) * delta**2
            eta_norm = eta * np.sqrt(1 - beta_2 ** (server_round + 1.0)) / (1 - beta_1 ** (server_round + 1.0))
        elif kind == "fedyogi":
            v = v - (1.0 - beta_2) * delta**2 * np.sign(v - delta**2)
            eta_norm = eta
        else:
            v = v + delta**2
            eta_norm = eta
        x = x + eta_norm * m / (np.sqrt(v) + tau)
        history.append(x.copy())
    return history


def run_stew(cls, x0, soups, foreach, **kwargs):
    param = torch.tensor(x0)
    optimizer = cls([param], foreach=foreach, **kwargs)
    history = []
    for soup in soups:
        param.grad = param - torch.tensor(soup)  # g_t = x_{t-1} - w_t
        optimizer.step()
        history.append(param.numpy().copy())
    return history


CASES = [
    ("fedadam", FedAdam, {"lr": 0.1, "betas": (0.9, 0.99), "eps": 1e-3}, (0.1, 0.9, 0.99, 1e-3)),
    ("fedadam-tiny-tau", FedAdam, {"lr": 0.3, "betas": (0.5, 0.8), "eps": 1e-9}, (0.3, 0.5, 0.8, 1e-9)),
    ("fedyogi", FedYogi, {"lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-3}, (0.01, 0.9, 0.99, 1e-3)),
    ("fedyogi-strong", FedYogi, {"lr": 0.5, "betas": (0.3, 0.6), "eps": 1e-2}, (0.5, 0.3, 0.6, 1e-2)),
    ("fedadagrad", FedAdagrad, {"lr": 0.1, "eps": 1e-3}, (0.1, 0.0, 0.0, 1e-3)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
def test_matches_flower_formulas_round_after_round(case, foreach):
    name, cls, kwargs, (eta, b1, b2, tau) = case
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(5, 3))
    soups = [x0 + rng.normal(scale=0.1 * (t + 1), size=x0.shape) for t in range(6)]
    expected = flower_fedopt(name.split("-")[0], x0, soups, eta, b1, b2, tau)
    actual = run_stew(cls, x0, soups, foreach, **kwargs)
    for t, (a, e) in enumerate(zip(actual, expected), start=1):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-14, err_msg=f"round {t}")


@pytest.mark.parametrize("cls", [FedAdam, FedYogi, FedAdagrad])
def test_foreach_equals_loop_on_several_tensors(cls):
    gen = torch.Generator().manual_seed(3)
    shapes = [(4, 3), (7,), (2, 2, 2)]
    results = []
    for foreach in (True, False):
        params = [torch.zeros(s, dtype=torch.float64) for s in shapes]
        optimizer = cls(params, foreach=foreach)
        gen.manual_seed(3)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            optimizer.step()
        results.append(params)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("cls", [FedAdam, FedYogi, FedAdagrad])
def test_state_dict_round_trip_continues_identically(cls):
    def steps(optimizer, param, grads):
        for g in grads:
            param.grad = g.clone()
            optimizer.step()

    grads = [torch.full((3,), float(i + 1)) * (-1) ** i for i in range(6)]
    straight = torch.ones(3)
    opt = cls([straight])
    steps(opt, straight, grads)

    resumed = torch.ones(3)
    first = cls([resumed])
    steps(first, resumed, grads[:3])
    saved = first.state_dict()
    second = cls([resumed])
    second.load_state_dict(saved)
    steps(second, resumed, grads[3:])
    torch.testing.assert_close(resumed, straight, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [({"lr": -1.0}, "invalid learning rate"), ({"eps": -1.0}, "invalid eps"), ({"betas": (1.0, 0.9)}, "invalid beta")],
)
def test_invalid_hyperparameters(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        FedAdam([torch.zeros(1)], **kwargs)


def test_registry_and_elementwise_flags():
    assert fedsoup.resolve_optimizer("AdamW") is torch.optim.AdamW
    assert fedsoup.resolve_optimizer("fedyogi") is FedYogi
    assert fedsoup.resolve_optimizer(torch.optim.Rprop) is torch.optim.Rprop
    assert all(fedsoup.is_elementwise(name) for name in fedsoup.OPTIMIZERS)
    assert not fedsoup.is_elementwise(torch.optim.LBFGS)


def test_flower_defaults():
    """Defaults are those of flwr.serverapp.strategy FedAdam / FedYogi / FedAdagrad."""
    def defaults(cls):
        return {k: v for k, v in cls([torch.zeros(1)]).defaults.items() if k != "foreach"}

    assert defaults(FedAdam) == {"lr": 0.1, "betas": (0.9, 0.99), "eps": 1e-3}
    assert defaults(FedYogi) == {"lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-3}
    assert defaults(FedAdagrad) == {"lr": 0.1, "eps": 1e-3}


@pytest.mark.parametrize(
    "optimizer, kwargs, plain",
    [
        ("sgd", {}, True),
        (torch.optim.SGD, {"momentum": 0.0, "dampening": 0.5, "foreach": True}, True),
        ("sgd", {"momentum": 0.9}, False),
        ("sgd", {"weight_decay": 1e-4}, False),
        ("sgd", {"nesterov": True, "momentum": 0.9}, False),
        ("sgd", {"maximize": True}, False),
        ("adam", {}, False),
    ],
)
def test_is_plain_sgd(optimizer, kwargs, plain):
    assert fedsoup.is_plain_sgd(optimizer, kwargs) is plain


def test_make_optimizer_picks_the_fast_path_and_names_bad_arguments():
    params = [torch.zeros(3)]
    assert fedsoup.make_optimizer("adam", params, 0.1).defaults["fused"] is True
    assert fedsoup.make_optimizer("rmsprop", params, 0.1).defaults["foreach"] is True
    assert fedsoup.make_optimizer("fedadam", params, 0.1).defaults["foreach"] is True
    assert fedsoup.make_optimizer("adam", params, 0.1, foreach=False).defaults["fused"] in (None, False)
    with pytest.raises(ValueError, match="cannot build optimizer Adam"):
        fedsoup.make_optimizer("adam", params, 0.1, momentum=0.9)


def test_find_non_finite_names_the_first_bad_floating_tensor():
    state = {"n": torch.tensor([1, 2]), "a": torch.ones(3), "b": torch.tensor([1.0, float("inf")])}
    assert fedsoup.find_non_finite(state) == "b"
    state["b"] = torch.tensor([1e38, 1e38, 1e38])  # the sum overflows; the values are finite
    assert fedsoup.find_non_finite(state) is None
