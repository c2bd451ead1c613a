"""An optimizer's constructor arguments, checked without building the optimizer.

Names: :func:`optimizer_arguments` reads what a constructor accepts from its signature
(an unknown name is refused with the closest valid one). Values: :data:`OPTIMIZER_CHECKS`
is one table of the ``torch.optim`` constructors' own value checks, so validating a
merge's options costs no optimizer (the first ``torch.optim`` construction in a process
costs about a second); ``tests/test_pipeline.py`` proves it agrees with every constructor
of :data:`fedsoup.OPTIMIZERS`. :func:`optimizer_settings` resolves every argument (defaults
filled in) once, for :class:`~fedsoup.options.MergeOptions` and the kernels that trust it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fedsoup.errors import OptionError, UnknownOptionError
from fedsoup.optim import OPTIMIZERS

__all__ = ["OPTIMIZER_CHECKS", "check_optimizer_values", "optimizer_settings", "optimizer_arguments",
           "check_optimizer_kwargs", "SET_BY_MERGE"]

# Constructor parameters that the merge itself sets (never user options).
SET_BY_MERGE = frozenset({"self", "params", "lr"})


def _at_least_zero(value: Any) -> bool:
    return 0.0 <= value


# The value checks of the torch.optim constructors (and fedsoup.optim's Flower optimizers), by
# argument name, with the optimizers that check it (None: every one that takes it): one table
# instead of a throw-away optimizer (tests/test_pipeline.py proves it agrees with every
# constructor of fedsoup.OPTIMIZERS on valid and invalid values). One deliberate difference:
# NaN is refused everywhere, where SGD's ``momentum < 0`` lets it through.
OPTIMIZER_CHECKS: dict[str, tuple[Callable[[Any], bool], str, tuple[type, ...] | None]] = {
    "eps": (_at_least_zero, ">= 0", None),
    "weight_decay": (_at_least_zero, ">= 0", None),
    "momentum": (_at_least_zero, ">= 0", None),
    "lr_decay": (_at_least_zero, ">= 0", None),
    "initial_accumulator_value": (_at_least_zero, ">= 0", None),
    "alpha": (_at_least_zero, ">= 0", (torch.optim.RMSprop,)),  # (ASGD's alpha is an exponent)
    "momentum_decay": (_at_least_zero, ">= 0", None),
    "rho": (lambda rho: 0.0 <= rho <= 1.0, "in [0, 1]", None),
    "betas": (lambda betas: len(betas) >= 2 and all(0.0 <= beta < 1.0 for beta in betas[:2]), "two numbers in [0, 1)",
              None),
    "etas": (lambda etas: 0.0 < etas[0] < 1.0 < etas[1], "(eta_minus, eta_plus) with 0 < eta_minus < 1 < eta_plus",
             None),
}


def check_optimizer_values(cls: type, settings: Mapping[str, Any]) -> None:
    """:data:`OPTIMIZER_CHECKS` and the constructors' joint rules on ``settings`` (defaults
    filled in); :class:`OptionError` naming the argument."""
    for name, value in settings.items():
        check = OPTIMIZER_CHECKS.get(name)
        if check is None or (check[2] is not None and not issubclass(cls, check[2])):
            continue
        try:
            valid = check[0](value)
        except (TypeError, IndexError, ValueError):
            valid = False
        if not valid:
            raise OptionError(name, value, f"invalid {name} for {cls.__name__}: {value!r} (must be {check[1]})")
    if settings.get("nesterov") and not (settings.get("momentum", 0) > 0 and settings.get("dampening", 0) == 0):
        raise OptionError("nesterov", True, "Nesterov momentum requires a momentum and zero dampening")
    if settings.get("fused") and settings.get("foreach"):
        raise OptionError("fused", True, "`fused` and `foreach` cannot be `True` together")
    if settings.get("fused") and settings.get("differentiable"):
        raise OptionError("fused", True, "`fused` does not support `differentiable`")


def optimizer_settings(cls: type, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Every constructor argument of ``cls`` but ``params`` and ``lr``: the defaults, then
    ``kwargs``, value-checked once. What the fused kernel and the scale-aware lr read."""
    if cls not in OPTIMIZERS.values():  # a class of the caller's own: its constructor is the check
        from fedsoup.optim import build_optimizer

        build_optimizer(cls, [torch.zeros(0, requires_grad=True)], lr=0.0, **kwargs)
        return dict(kwargs)
    settings = dict(_constructor_defaults(cls))
    settings.update(kwargs)
    check_optimizer_values(cls, settings)
    return settings


@functools.lru_cache(maxsize=64)
def _constructor_defaults(cls: type) -> tuple[tuple[str, Any], ...]:
    """``cls``'s constructor defaults but ``params`` and ``lr`` (read once per class: a
    signature costs ~0.3 ms, a merge's whole validation less)."""
    try:
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return ()
    return tuple((p.name, p.default) for p in parameters
                 if p.default is not inspect.Parameter.empty and p.name not in SET_BY_MERGE)


@functools.lru_cache(maxsize=64)
def optimizer_arguments(cls: type) -> frozenset[str] | None:
    """The keyword arguments ``cls(params, lr=..., **kwargs)`` accepts; ``None`` when it takes ``**kwargs``."""
    try:
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return None
    names = set()
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.add(parameter.name)
    return frozenset(names - SET_BY_MERGE)


def check_optimizer_kwargs(cls: type, kwargs: Mapping[str, Any], named: Sequence[str]) -> dict[str, Any]:
    """``kwargs`` as a dict of ``str`` keys, each an argument of ``cls``'s constructor."""
    accepted = optimizer_arguments(cls)
    checked = {}
    for key, value in kwargs.items():
        key = str(key)
        if key in SET_BY_MERGE:
            raise OptionError(key, value, f"{key!r} is not an optimizer argument here: it is set by the merge"
                              + (" (give it as the lr option)" if key == "lr" else ""))
        if accepted is not None and key not in accepted:
            raise UnknownOptionError(key, [*named, *accepted], optimizer=cls.__name__, optimizer_arguments=accepted)
        checked[key] = value
    return checked
