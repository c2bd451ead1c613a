"""The ``products`` LoRA round: the clients' updates ``ΔW_i = s_i B_i A_i`` merged, sent back at rank r.

One round (docs/strategy.md "LoRA adapters"), with ``c_i = ω_i s_i`` and the global adapter
``(B_g, A_g)`` of rank ``r`` sent this round (``ΔW_{t−1} = s B_g A_g``):

    soup:   M = Σ_i ω_i s_i B_i A_i = B_cat diag(c) A_cat        (never formed per client)
    AME:    M = fedsoup.merge([ΔW_i], ...)                       (dense ΔW_i: the optimizer's state is dense)
    stew:   ΔW_t = ΔW_{t−1} − lr · Optimizer(ΔW_{t−1} − M)         (identity: ΔW_t = M)
    back:   (B_t, A_t) = (U_r S_r / s, V_rᵀ),  U_r S_r V_rᵀ the rank-r truncated SVD of ΔW_t

The plain soup with the identity stew never forms a dense matrix: the SVD is taken through
the factors (:func:`fedsoup.lora.linalg.factored_truncated_svd`, seeded per round and
module, power iterations until the captured energy grows by at most ``lora_tolerance``).
A stateful stew needs ``ΔW`` itself: its optimizer state is dense, ``d_out × d_in`` per
module and moment (FedAdam: two), which is the price of stepping in the space where the
model lives; the SVD's factors are defined only up to a rotation, so a stew over them
would follow the factorisation, not the model.

The split ``A_t = V_rᵀ`` (orthonormal rows), ``B_t = U_r S_r / s`` keeps every rank slot
trainable: where ``σ_j = 0`` the slot is LoRA's own initialisation (``A`` row non-zero,
``B`` column zero), not a dead ``(0, 0)`` pair.

:class:`ProductSoup` and :class:`ProductStew` have the interfaces of
:class:`~strategies.client_soup.ClientSoup` and :class:`~strategies.server_stew.ServerStew`
that :func:`strategies.rounds.train_round` uses, so the round keeps its fallbacks. Each is
made for one round and records the round's SVD figures in ``metrics``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

import fedsoup
from fedsoup.lora import LORA_A_SUFFIX, LORA_B_SUFFIX, dense_deltas
from fedsoup.lora.linalg import captured_energy, factored_norm, factored_truncated_svd, randomized_svd
from fedsoup.lora.measure import stacked
from strategies.adapters import GlobalAdapter, LoraOptions, module_error, module_seed, reply_pairs
from strategies.client_soup import ClientSoup, SoupResult, non_floating_rule
from strategies.replies import UsableReply
from strategies.server_stew import ServerStew

__all__ = ["ProductSoup", "ProductStew", "GlobalProducts", "dense_products", "adapter_factors", "METRIC_SVD_ENERGY_MIN",
           "METRIC_SVD_ENERGY_MEAN", "METRIC_SVD_ITERATIONS"]

#: The smallest and mean captured energy ``Σ_{j≤r} σ_j² / ‖ΔW_t‖_F²`` over the modules.
METRIC_SVD_ENERGY_MIN = "fedsoup-lora-svd-energy-min"
METRIC_SVD_ENERGY_MEAN = "fedsoup-lora-svd-energy-mean"
#: The most power iterations one module's randomized SVD took (0: exact SVDs only).
METRIC_SVD_ITERATIONS = "fedsoup-lora-svd-iterations"


def dense_products(model: Mapping[str, torch.Tensor], adapter: GlobalAdapter) -> dict[str, torch.Tensor]:
    """``{path: s B A}`` (dense, compute dtype) for every module, and the other arrays as they are
    (:func:`fedsoup.lora.dense_deltas`, each scale the server's at the model's rank)."""
    return dense_deltas(reply_pairs(model, adapter), {key: model[key] for key in adapter.full})


@dataclasses.dataclass(eq=False)
class GlobalProducts:
    """The global adapter ``x_{t−1}`` in product space, ``{path: s B_g A_g}``, formed at most once a round.

    A ``products`` round with AME and a stateful stew needs it twice (the ClientSoup's
    ``current``, the stew's ``ΔW_{t−1}``): the round's :class:`ProductSoup` and
    :class:`ProductStew` share one of these.
    """

    adapter: GlobalAdapter
    _model: Mapping[str, torch.Tensor] | None = dataclasses.field(default=None, init=False)
    _dense: dict[str, torch.Tensor] | None = dataclasses.field(default=None, init=False)

    def of(self, model: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:func:`dense_products` of ``model`` (the round's ``current``), computed on the first call."""
        if self._model is not model:
            self._model, self._dense = model, dense_products(model, self.adapter)
        return self._dense


def adapter_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, scale: float,
                    like_a: torch.Tensor, like_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B) = (Vhᵀ rows, U S / s)`` at ``rank``, zero-padded if fewer triplets exist, in the global dtypes."""
    kept = S.numel()
    A = torch.zeros(rank, Vh.shape[1], dtype=torch.float64)
    B = torch.zeros(U.shape[0], rank, dtype=torch.float64)
    A[:kept] = Vh.double()
    B[:, :kept] = U.double() * (S.double() / scale)
    return A.to(like_a.dtype), B.to(like_b.dtype)


class _Figures:
    """The SVD figures of one round's truncations."""

    def __init__(self) -> None:
        self.energies: list[float] = []
        self.iterations = 0

    def add(self, energy: float, iterations: int) -> None:
        self.energies.append(energy)
        self.iterations = max(self.iterations, iterations)

    def metrics(self) -> dict[str, float]:
        if not self.energies:
            return {}
        return {METRIC_SVD_ENERGY_MIN: min(self.energies),
                METRIC_SVD_ENERGY_MEAN: math.fsum(self.energies) / len(self.energies),
                METRIC_SVD_ITERATIONS: float(self.iterations)}


def _truncate_dense(dense: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor], adapter: GlobalAdapter,
                    seed: int, figures: _Figures) -> dict[str, torch.Tensor]:
    """A product-space model (dense ``ΔW`` per module) back to the global adapter's factors."""
    model: dict[str, torch.Tensor] = {}
    for index, (path, (_, _, rank)) in enumerate(adapter.modules.items()):
        delta = dense[path]
        kept = min(rank, min(delta.shape))
        u, s, vh = randomized_svd(delta, kept, seed=module_seed(seed, index))
        figures.add(captured_energy(s, kept, total=float(delta.double().square().sum())), 0)
        a_key, b_key = path + LORA_A_SUFFIX, path + LORA_B_SUFFIX
        model[a_key], model[b_key] = adapter_factors(u, s, vh, rank, adapter.scale(path),
                                                     current[a_key], current[b_key])
    model.update({key: dense[key].to(current[key].dtype) for key in adapter.full})
    return model


@dataclasses.dataclass(eq=False)
class _ProductRoundPart:
    """What the soup and the stew of a ``products`` round share: the global adapter, the
    round's seed (each module's SVD is seeded from it), the global adapter's dense ``ΔW_{t−1}``
    (one :class:`GlobalProducts` for both) and the last step's SVD figures."""

    adapter: GlobalAdapter
    seed: int
    global_products: GlobalProducts
    figures: _Figures = dataclasses.field(default_factory=_Figures, init=False)  # the last step's, reset by each


@dataclasses.dataclass(eq=False)
class ProductSoup(_ProductRoundPart):
    """The ClientSoup of a ``products`` round (module docstring), for :func:`strategies.rounds.train_round`.

    With the identity stew its model is the round's global adapter (truncated here);
    otherwise the product-space model ``{path: M (dense), other arrays}`` for :class:`ProductStew`.
    """

    client_soup: ClientSoup
    lora: LoraOptions
    truncate: bool
    #: The factor/product error per module of the replies :meth:`soup` merged (measured on its
    #: stacks, :func:`strategies.adapters.module_error`); ``None`` until it ran.
    errors: dict[str, float | None] | None = dataclasses.field(default=None, init=False)

    @property
    def is_plain(self) -> bool:
        return self.client_soup.is_plain

    def merge(self, replies: list[UsableReply], server_round: int,
              current: Mapping[str, torch.Tensor] | None) -> SoupResult | None:
        """The configured merge: the soup of products, or AME over the dense ``ΔW_i``."""
        if self.client_soup.is_plain:
            return self.soup(replies, current)
        self.figures = _Figures()
        dense = [dataclasses.replace(reply, arrays=dense_products(reply.arrays, self.adapter)) for reply in replies]
        dense_current = None if current is None else self.global_products.of(current)
        result = self.client_soup.merge(dense, server_round, dense_current)
        if result is None:
            return None
        by_id = {id(d): original for d, original in zip(dense, replies)}
        used = [by_id[id(d)] for d in result.used]
        model = result.model
        if self.truncate:
            model = _truncate_dense(model, current, self.adapter, self.seed, self.figures)
        return SoupResult(model, result.ame_distance, used, result.report)

    def soup(self, replies: list[UsableReply], current: Mapping[str, torch.Tensor] | None) -> SoupResult:
        """``M = B_cat diag(ω_i s_i) A_cat`` per module (truncated through its factors, or dense for the stew)."""
        self.figures = _Figures()
        weights = self.client_soup.weights(replies)
        total = math.fsum(weights)
        omega = [w / total for w in weights]
        pairs = [reply_pairs(reply.arrays, self.adapter) for reply in replies]
        model: dict[str, torch.Tensor] = {}
        self.errors = {}
        for index, path in enumerate(self.adapter.modules):
            module_pairs = [p[path] for p in pairs]
            stack = stacked(module_pairs, omega)  # one stack a module: the merge's and the error's
            self.errors[path] = module_error(module_pairs, omega, self.seed, index, stack=stack)
            if not self.truncate:
                model[path] = stack.scaled_B() @ stack.A
                continue
            rank = self.adapter.modules[path][2]
            svd = factored_truncated_svd(stack.B, stack.A, rank, scale=stack.weights(),
                                         seed=module_seed(self.seed, index), tolerance=self.lora.tolerance)
            self.figures.add(svd.energy, svd.iterations)
            a_key, b_key = path + LORA_A_SUFFIX, path + LORA_B_SUFFIX
            model[a_key], model[b_key] = adapter_factors(svd.U, svd.S, svd.Vh, rank, self.adapter.scale(path),
                                                         current[a_key], current[b_key])
        if self.adapter.full:
            full = [{key: reply.arrays[key] for key in self.adapter.full} for reply in replies]
            merged = {k: t.cpu() for k, t in fedsoup.soup(full, weights).items()}
            model.update(non_floating_rule(merged, full, current))
        return SoupResult(model, 0.0, list(replies))


@dataclasses.dataclass(eq=False)
class ProductStew(_ProductRoundPart):
    """The ServerStew of a ``products`` round: it steps on ``ΔW`` and sends back rank-r factors.

    Wraps the run's :class:`~strategies.server_stew.ServerStew` (its state lives there, keyed
    by module path: ``d_out × d_in`` per module and moment). The identity stew takes the
    ClientSoup's truncated adapter as it is; its ``‖g_t‖`` is measured in product space,
    ``(Σ_m ‖s B_g A_g − s B_t A_t‖_F²)^{1/2}``, from the factors.
    """

    stew: ServerStew

    @property
    def is_identity(self) -> bool:
        return self.stew.is_identity

    def state_dict(self) -> dict[str, Any]:
        return self.stew.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stew.load_state_dict(state)

    def step(self, current: Mapping[str, torch.Tensor],
             merged: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        """``(x_t, ‖g_t‖)``: ``x_t`` the global adapter's factors, ``g_t`` in product space."""
        if self.stew.is_identity:
            model = {key: merged[key].to(current[key].dtype) for key in current}
            return model, self._product_distance(current, model)
        self.figures = _Figures()
        stepped, grad_norm = self.stew.step(self.global_products.of(current), merged)
        return _truncate_dense(stepped, current, self.adapter, self.seed, self.figures), grad_norm

    def _product_distance(self, before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> float:
        squares = []
        for path in self.adapter.modules:
            scale = self.adapter.scale(path)
            a_key, b_key = path + LORA_A_SUFFIX, path + LORA_B_SUFFIX
            b = torch.cat([scale * before[b_key].double(), -scale * after[b_key].double()], dim=1)
            a = torch.cat([before[a_key].double(), after[a_key].double()], dim=0)
            squares.append(factored_norm(b, a.T) ** 2)
        for key in self.adapter.full:
            if before[key].is_floating_point():
                squares.append(float(torch.dist(before[key].double(), after[key].double())) ** 2)
        return math.sqrt(math.fsum(squares))
