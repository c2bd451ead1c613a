"""ServerStew: a server optimizer that lives across rounds (paper Appendix D, Algorithm 3).

Round ``t`` feeds it the pseudogradient ``g_t = x_{t-1} − w_t`` of the ClientSoup
``w_t``: ``x_t = x_{t-1} − lr · Optimizer(g_t)``. SGD with lr 1 is ``x_t = w_t``
(FedAvg); SGD with momentum is FedAvgM; ``fedadam``/``fedyogi``/``fedadagrad`` are
Flower's FedAdam/FedYogi/FedAdagrad.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

import fedsoup
from fedsoup.errors import StateError
from fedsoup.options import OptimizerOptions
from strategies._shared import format_kwargs, model_distance, optimizer_name

__all__ = ["ServerStew"]


class ServerStew:
    """``x_t = x_{t-1} − lr · Optimizer(x_{t-1} − w_t)`` with one ``torch.optim`` optimizer kept across rounds.

    ``optimizer`` is a name of :data:`fedsoup.OPTIMIZERS` or a ``torch.optim.Optimizer``
    class, ``**optimizer_kwargs`` its constructor arguments (checked now, with the
    closest name for a misspelt one), or an already validated
    :class:`~fedsoup.options.OptimizerOptions`. Only floating arrays are optimised (float16 and
    bfloat16 in float32); integer arrays are taken from ``w_t``. Every output array
    keeps the dtype of ``x_{t-1}``.

    The identity stew (SGD, lr 1, no momentum/decay) returns ``w_t`` as it is: no
    optimizer, no ``x − (x − w)`` rounding, no extra pass.

    :meth:`state_dict`/:meth:`load_state_dict` hold the optimizer's state and the
    parameters' keys, shapes and dtypes (their values are ``x_{t-1}``'s at every step,
    so they need not be stored).
    """

    def __init__(self, optimizer: Any = "sgd", lr: float = 1.0, **optimizer_kwargs: Any) -> None:
        if isinstance(optimizer, OptimizerOptions):  # validated already (from_settings)
            self.options = optimizer
        else:  # validated once, here: the optimizer's values by fedsoup.options.OPTIMIZER_CHECKS
            self.options = OptimizerOptions(optimizer=optimizer, lr=lr, optimizer_kwargs=optimizer_kwargs)
        self.is_identity = self.options.lr == 1.0 and fedsoup.is_plain_sgd(
            self.options.optimizer_class, self.options.optimizer_kwargs
        )
        self.parameters: dict[str, torch.Tensor] = {}
        self.optimizer: torch.optim.Optimizer | None = None

    @classmethod
    def from_settings(cls, stew: Mapping[str, Any] | None) -> ServerStew:
        """From FedSoup's ``stew=`` dict ``{"optimizer": ..., "lr": ..., **kwargs}``; ``None``: SGD, lr 1."""
        return cls(OptimizerOptions.from_dict(stew))

    @property
    def name(self) -> str:
        return optimizer_name(self.options.optimizer)

    def describe(self) -> str:
        return f"{self.name}({format_kwargs({'lr': self.options.lr, **self.options.optimizer_kwargs})})"

    def step(
        self, current: Mapping[str, torch.Tensor], merged: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], float]:
        """``(x_t, ‖g_t‖)`` from ``x_{t-1}`` (``current``) and the ClientSoup ``w_t`` (``merged``).

        Raises :class:`~fedsoup.errors.StateError` (a ``ValueError``) naming the first
        differing array if the floating arrays differ from those the optimizer was built
        for (its moments would be meaningless).
        """
        dtypes = {k: t.dtype for k, t in current.items()}
        if self.is_identity:
            return {k: merged[k].to(dtypes[k]) for k in dtypes}, model_distance(current, merged)
        if self.optimizer is None:
            self._build({k: (tuple(t.shape), t.dtype) for k, t in current.items() if t.is_floating_point()})
        self._check_matches(current)
        squared = []
        with torch.no_grad():
            for key, param in self.parameters.items():
                # Step from x_{t-1} as it was sent (e.g. with a DP wrapper's noise), as FedOpt does.
                param.copy_(current[key])
                grad = torch.sub(current[key].to(param.dtype), merged[key].to(param.dtype))
                squared.append(float(torch.linalg.vector_norm(grad, dtype=torch.float64)) ** 2)
                param.grad = grad
            self.optimizer.step()
        new = {}
        for key in current:
            if key in self.parameters:
                new[key] = self.parameters[key].detach().to(dtypes[key], copy=True)
                self.parameters[key].grad = None
            else:
                new[key] = merged[key].to(dtypes[key])  # integer buffers: never optimised
        return new, math.sqrt(math.fsum(squared))

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizer", "keys", "shapes", "dtypes", "state"}``; ``state`` is ``None`` before the first step."""
        return {
            "optimizer": self.name,
            "keys": list(self.parameters),
            "shapes": [list(p.shape) for p in self.parameters.values()],
            "dtypes": [str(p.dtype).removeprefix("torch.") for p in self.parameters.values()],
            "state": None if self.optimizer is None else self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; :class:`~fedsoup.errors.StateError` if it is another optimizer's
        or its parameter description is broken."""
        if state.get("optimizer") != self.name:
            raise StateError(
                f"its ServerStew optimizer is {state.get('optimizer')!r}, this ServerStew uses {self.name!r}",
                key="optimizer",
            )
        self.parameters, self.optimizer = {}, None
        if state.get("state") is None:
            return
        try:
            specs = {
                str(key): (tuple(int(n) for n in shape), getattr(torch, str(dtype)))
                for key, shape, dtype in zip(state["keys"], state["shapes"], state["dtypes"], strict=True)
            }
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise StateError(f"ServerStew state: bad parameter description ({error!r})", key="keys") from None
        self._build(specs)
        self.optimizer.load_state_dict(state["state"])

    def _build(self, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        self.parameters = {
            key: torch.zeros(shape, dtype=dtype if dtype in (torch.float32, torch.float64) else torch.float32)
            for key, (shape, dtype) in specs.items()
        }
        self.optimizer = fedsoup.make_optimizer(
            self.options.optimizer, list(self.parameters.values()), self.options.lr, **self.options.optimizer_kwargs
        )

    def _check_matches(self, current: Mapping[str, torch.Tensor]) -> None:
        floating = {k: tuple(t.shape) for k, t in current.items() if t.is_floating_point()}
        expected = {k: tuple(p.shape) for k, p in self.parameters.items()}
        if floating != expected:
            changed = sorted(set(floating.items()) ^ set(expected.items()))
            raise StateError(
                "the global model's floating arrays changed since the ServerStew was created "
                f"(first difference: array {changed[0][0]!r})",
                key=changed[0][0],
                what="array",
            )

