"""Optimizers over pseudogradients.

Everything element-wise that ``torch.optim`` has is used as it is. This module adds
only what it lacks: the server optimizers of Reddi et al., "Adaptive Federated
Optimization" (2021), with the exact conventions of Flower's message-API strategies
``FedAdam``, ``FedYogi`` and ``FedAdagrad`` (``flwr.serverapp.strategy``, flwr 1.41),
so that a FedSoup ServerStew reproduces those strategies (docs/design.md §3; paper Appendix D).

Flower works with the update ``delta = soup - x``; these optimizers take the gradient
convention of ``torch.optim``, ``p.grad = g = x - soup = -delta``, and step
``p <- p - lr * update``. Since Adam/Yogi/Adagrad moments are odd in ``g`` (first
moment) and even (second moment), the result is identical.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from fedsoup.errors import OptionError, closest_name

__all__ = [
    "FedAdam",
    "FedYogi",
    "FedAdagrad",
    "OPTIMIZERS",
    "resolve_optimizer",
    "is_elementwise",
    "is_plain_sgd",
    "make_optimizer",
    "build_optimizer",
]


class _FlowerServerOptimizer(Optimizer):
    """Shared machinery: per-parameter state, a foreach path and a plain loop."""

    def __init__(self, params, defaults: dict, foreach: bool | None) -> None:
        if not 0.0 <= defaults["lr"]:
            raise ValueError(f"invalid learning rate: {defaults['lr']}")
        if not 0.0 <= defaults["eps"]:
            raise ValueError(f"invalid eps (Flower's tau): {defaults['eps']}")
        for beta in defaults.get("betas", ()):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"invalid beta {beta}: must be in [0, 1)")
        defaults["foreach"] = foreach
        super().__init__(params, defaults)

    def _init_state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            # A tensor step, as torch.optim keeps it, so state_dict() is all tensors.
            state["step"] = torch.zeros((), dtype=torch.float64)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if self._has_first_moment:
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    _has_first_moment = True

    @staticmethod
    def _step_first_moments(group: dict, grads: list[torch.Tensor], states: list[dict]) -> tuple[list, list]:
        """The foreach start of FedAdam and FedYogi: count the step and update the first
        moment ``m_t = β₁ m_{t−1} + (1 − β₁) g_t`` of every parameter; ``(m, v)`` as lists."""
        beta1 = group["betas"][0]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        for state in states:
            state["step"] += 1
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
        return exp_avgs, exp_avg_sqs

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, states = [], [], []
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                params.append(param)
                grads.append(param.grad)
                states.append(self._init_state(param))
            if not params:
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = True
            update = self._update_foreach if foreach else self._update_single
            update(group, params, grads, states)
        return loss


class FedAdam(_FlowerServerOptimizer):
    r"""Adam with Flower's ``FedAdam`` conventions.

    With ``g_t = x_{t-1} - w_t`` (minus Flower's ``delta_t``):

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\\
        \eta'_t = \eta \sqrt{1-\beta_2^{t+1}} / (1-\beta_1^{t+1}),\quad
        x_t = x_{t-1} - \eta'_t\, m_t / (\sqrt{v_t} + \tau).

    Unlike ``torch.optim.Adam``: ``tau`` (``eps``) is added outside the square root
    *without* bias-correcting ``v``, and the bias correction uses ``t + 1`` (Flower
    uses ``server_round + 1``); ``t`` here is this optimizer's own step count, equal
    to the round number when every round steps once.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-1,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-3,
        *,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps}, foreach)

    @staticmethod
    def _step_size(group: dict, step: float) -> float:
        beta1, beta2 = group["betas"]
        return group["lr"] * math.sqrt(1.0 - beta2 ** (step + 1.0)) / (1.0 - beta1 ** (step + 1.0))

    def _update_single(self, group, params, grads, states) -> None:
        beta1, beta2 = group["betas"]
        for param, grad, state in zip(params, grads, states):
            state["step"] += 1
            state["exp_avg"].mul_(beta1).add_(grad, alpha=1.0 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
            step_size = self._step_size(group, state["step"].item())
            param.addcdiv_(state["exp_avg"], denom, value=-step_size)

    def _update_foreach(self, group, params, grads, states) -> None:
        beta2 = group["betas"][1]
        exp_avgs, exp_avg_sqs = self._step_first_moments(group, grads, states)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denoms, group["eps"])
        # Parameters of one group may have different step counts (e.g. after a
        # load_state_dict); group them by step so each gets its own step size.
        for step, idx in _indices_by_step(states).items():
            torch._foreach_addcdiv_(
                [params[i] for i in idx],
                [exp_avgs[i] for i in idx],
                [denoms[i] for i in idx],
                value=-self._step_size(group, step),
            )


class FedYogi(_FlowerServerOptimizer):
    r"""Yogi with Flower's ``FedYogi`` conventions (no bias correction).

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = v_{t-1} - (1-\beta_2)\, g_t^2\, \mathrm{sign}(v_{t-1} - g_t^2),\\
        x_t = x_{t-1} - \eta\, m_t / (\sqrt{v_t} + \tau).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-3,
        *,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps}, foreach)

    def _update_single(self, group, params, grads, states) -> None:
        beta1, beta2 = group["betas"]
        for param, grad, state in zip(params, grads, states):
            state["step"] += 1
            state["exp_avg"].mul_(beta1).add_(grad, alpha=1.0 - beta1)
            grad_sq = grad * grad
            sign = torch.sign(state["exp_avg_sq"] - grad_sq)
            state["exp_avg_sq"].addcmul_(grad_sq, sign, value=-(1.0 - beta2))
            denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
            param.addcdiv_(state["exp_avg"], denom, value=-group["lr"])

    def _update_foreach(self, group, params, grads, states) -> None:
        beta2 = group["betas"][1]
        exp_avgs, exp_avg_sqs = self._step_first_moments(group, grads, states)
        grad_sqs = torch._foreach_mul(grads, grads)
        signs = torch._foreach_sub(exp_avg_sqs, grad_sqs)
        torch._foreach_sign_(signs)
        torch._foreach_addcmul_(exp_avg_sqs, grad_sqs, signs, value=-(1.0 - beta2))
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denoms, group["eps"])
        torch._foreach_addcdiv_(params, exp_avgs, denoms, value=-group["lr"])


class FedAdagrad(_FlowerServerOptimizer):
    r"""Adagrad with Flower's ``FedAdagrad`` conventions (no first moment, ``v_0 = 0``).

    .. math::
        v_t = v_{t-1} + g_t^2,\quad x_t = x_{t-1} - \eta\, g_t / (\sqrt{v_t} + \tau).

    ``torch.optim.Adagrad`` differs in its defaults (``initial_accumulator_value``,
    ``lr_decay``) and in adding ``eps`` the same way; this class pins Flower's form.
    """

    _has_first_moment = False

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-1,
        eps: float = 1e-3,
        *,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(params, {"lr": lr, "eps": eps}, foreach)

    def _update_single(self, group, params, grads, states) -> None:
        for param, grad, state in zip(params, grads, states):
            state["step"] += 1
            state["exp_avg_sq"].addcmul_(grad, grad)
            denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
            param.addcdiv_(grad, denom, value=-group["lr"])

    def _update_foreach(self, group, params, grads, states) -> None:
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        for state in states:
            state["step"] += 1
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denoms, group["eps"])
        torch._foreach_addcdiv_(params, grads, denoms, value=-group["lr"])


def _indices_by_step(states: list[dict]) -> dict[float, list[int]]:
    groups: dict[float, list[int]] = {}
    for i, state in enumerate(states):
        groups.setdefault(state["step"].item(), []).append(i)
    return groups


OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adagrad": torch.optim.Adagrad,
    "adadelta": torch.optim.Adadelta,
    "rmsprop": torch.optim.RMSprop,
    "nadam": torch.optim.NAdam,
    "radam": torch.optim.RAdam,
    "adamax": torch.optim.Adamax,
    "asgd": torch.optim.ASGD,
    "rprop": torch.optim.Rprop,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
}

# Optimizers whose update of a coordinate depends on that coordinate alone: they give
# the same result on one flat buffer, per tensor, or tensor by tensor (--low-memory).
# Anything else (LBFGS's line search, Adafactor's factored moments, ...) sees whole tensors.
_ELEMENTWISE: frozenset[type[Optimizer]] = frozenset(OPTIMIZERS.values())

# torch.optim classes with a fused CPU kernel (torch >= 2.4).
FUSED_ON_CPU: frozenset[type[Optimizer]] = frozenset(
    {torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad}
)


def resolve_optimizer(optimizer: str | type[Optimizer]) -> type[Optimizer]:
    """The optimizer class for a name in :data:`OPTIMIZERS` (any case) or a ``torch.optim.Optimizer``
    class itself; :class:`~fedsoup.errors.OptionError` (``option="optimizer"``, with the closest
    name as ``suggestion``) for anything else."""
    if isinstance(optimizer, str):
        cls = OPTIMIZERS.get(optimizer.lower())
        if cls is None:
            suggestion = closest_name(optimizer.lower(), OPTIMIZERS)
            known = "" if suggestion else f" (known: {', '.join(sorted(OPTIMIZERS))}, or a torch.optim.Optimizer class)"
            raise OptionError("optimizer", optimizer, f"unknown optimizer {optimizer!r}{known}", suggestion=suggestion)
        return cls
    if isinstance(optimizer, type) and issubclass(optimizer, Optimizer):
        return optimizer
    raise OptionError(
        "optimizer", optimizer,
        f"optimizer must be a name ({', '.join(sorted(OPTIMIZERS))}) or a torch.optim.Optimizer class, got {optimizer!r}",
    )


def is_elementwise(optimizer: str | type[Optimizer]) -> bool:
    """True when the optimizer updates every coordinate independently of the others."""
    return resolve_optimizer(optimizer) in _ELEMENTWISE


# SGD settings that leave `p -= lr * g` unchanged (dampening only acts on momentum).
_PLAIN_SGD = {"momentum": 0, "weight_decay": 0, "nesterov": False, "maximize": False}
_NUMERICS_ONLY = {"foreach", "fused", "differentiable", "dampening"}


def is_plain_sgd(optimizer: str | type[Optimizer], kwargs: Mapping[str, Any]) -> bool:
    """True when ``optimizer(**kwargs)`` is SGD without momentum, decay or maximisation.

    Then a step is ``p -= lr * g``, and identities (one epoch of GD with lr 1 is the
    soup; a ServerStew of lr 1 returns the ClientSoup) may replace the loop.
    """
    if resolve_optimizer(optimizer) is not torch.optim.SGD:
        return False
    return all(key in _NUMERICS_ONLY or (key in _PLAIN_SGD and value == _PLAIN_SGD[key])
               for key, value in kwargs.items())


def make_optimizer(
    optimizer: str | type[Optimizer], params: list[torch.Tensor] | list[dict], lr: float, **kwargs: Any
) -> Optimizer:
    """Build ``optimizer(params, lr=lr, **kwargs)`` on its fastest CPU path.

    Unless ``fused``/``foreach`` is given: ``fused=True`` where torch has a fused CPU
    kernel, else ``foreach=True`` where the optimizer takes it (torch picks neither on
    CPU by default). A constructor that rejects ``kwargs`` raises :class:`~fedsoup.errors.OptionError`.
    """
    cls = resolve_optimizer(optimizer)
    if "fused" not in kwargs and "foreach" not in kwargs:
        tensors = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
        if cls in FUSED_ON_CPU and all(p.device.type == "cpu" for p in tensors):
            kwargs["fused"] = True
        elif "foreach" in _init_parameters(cls):
            kwargs["foreach"] = True
    return build_optimizer(cls, params, lr=lr, **kwargs)


def build_optimizer(optimizer: str | type[Optimizer], params, **kwargs: Any) -> Optimizer:
    """``optimizer(params, **kwargs)`` as the class itself defaults it (the reference path);
    a constructor that rejects ``kwargs`` raises :class:`~fedsoup.errors.OptionError`."""
    cls = resolve_optimizer(optimizer)
    try:
        return cls(params, **kwargs)
    except (TypeError, ValueError) as error:
        shown = {k: v for k, v in kwargs.items() if k != "lr"}
        raise OptionError("optimizer_kwargs", shown, f"cannot build optimizer {cls.__name__} with {shown}: {error}") from None


def _init_parameters(cls: type) -> set[str]:
    try:
        return set(inspect.signature(cls.__init__).parameters)
    except (TypeError, ValueError):
        return set()
