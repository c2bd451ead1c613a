"""``FedSoup``: a Flower strategy that merges client models by AME and stews them on the server.

Round ``t`` with global model ``x_{t-1}`` sent to the clients (docs/design.md §3; paper
Appendix D, "FedOPT as nested ensembling", Algorithm 3 "FedSoup"):

* **ClientSoup** (:mod:`strategies.client_soup`) merges the usable replies ``x_i``
  with weights ``ω_i`` (the ``weighted_by_key`` metric): ``w_t = fedsoup.merge([x_i],
  weights=ω, **soup)``; ``soup=None`` is the plain weighted soup, FedAvg's aggregate.
* **ServerStew** (:mod:`strategies.server_stew`) steps one optimizer kept across
  rounds on ``g_t = x_{t-1} − w_t``: ``x_t = x_{t-1} − lr · Optimizer(g_t)``.

Replies are checked in :mod:`strategies.replies`; a round with its fallbacks runs in
:mod:`strategies.rounds`; state and checkpoints live in :mod:`strategies.state`, resuming
in :mod:`strategies.resume`. This module is the Flower Strategy API only.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from fedsoup.errors import OptionError, StateError
from fedsoup.state import STATE_JSON
from strategies.adapters import GlobalAdapter, adapter_structure_check, array_bytes, lora_options, split_soup
from strategies.arrays import OutputCache, to_tensor_dict
from strategies.client_soup import ClientSoup
from strategies.lora_round import adapter_round, global_adapter
from strategies.replies import ReplyChecker, log_received
from strategies.resume import resumed_start
from strategies.rounds import METRIC_BYTES_RECEIVED, METRIC_BYTES_SENT, aggregate_metrics, round_metrics
from strategies.server_stew import ServerStew
from strategies.threads import aggregation_threads
from strategies.state import RunState, read_checkpoint, write_checkpoint

__all__ = ["FedSoup"]


class FedSoup(FedAvg):
    """Federated learning by Amortized Model Ensembling: ClientSoup + ServerStew.

    A drop-in replacement for :class:`flwr.serverapp.strategy.FedAvg`: positional and
    keyword arguments go to FedAvg unchanged (``FedSoup(0.5, 0.5)`` samples half of
    the nodes, as ``FedAvg(0.5, 0.5)`` does), and with the defaults it computes
    FedAvg's model.

    Parameters
    ----------
    *fedavg_args, **fedavg_kwargs
        FedAvg's arguments (``fraction_train``, ``min_train_nodes``,
        ``weighted_by_key``, ``train_metrics_aggr_fn``, ...).
    soup : dict, optional
        Keyword arguments of :func:`fedsoup.merge` for the per-round ClientSoup
        (``optimizer``, ``lr``, ``schedule``, ``epochs``, ``batch_size``, ``shuffle``,
        ``adaptive_pivot``, ``amplification``, ``descending``, ``greedy``/``evaluate``,
        ``project``, ``device`` and optimizer arguments such as ``betas``), checked now.
        ``None``: the plain weighted soup (FedAvg). ``weights``, ``pivot``,
        ``order_by`` and ``seed`` are set by FedSoup. With ``adapter_config``, two more
        keys configure the LoRA round: ``"lora"``, ``"factors"`` (default: ``A`` and ``B``
        merged as tensors, as FedAvg does) or ``"products"`` (the updates ``s·B·A``
        merged, sent back at the configured rank by a seeded randomized SVD), and
        ``"lora_tolerance"`` (products: the SVD's power iterations stop when the captured
        energy grew by at most this, relative; default 1e-3). docs/strategy.md, "LoRA adapters".
    stew : dict, optional
        The ServerStew optimizer: ``{"optimizer": name or torch.optim class, "lr": η,
        **kwargs}`` (``optimizer`` defaults to ``"sgd"``, ``lr`` to 1.0). ``None``: SGD
        with lr 1 (``x_t = w_t``, FedAvg). The optimizer persists across rounds.
    soup_pivot : {"soup", "global"}
        AME pivot initialisation ``w_0``: the weighted soup of the replies (default; an
        untuned adaptive ClientSoup then stays at FedAvg's aggregate, docs/defaults.md) or
        the model sent this round (``x_{t-1}``; the soup when no model was sent).
    order_by : str, optional
        A client metric key (e.g. ``"val-acc"``): AME visits the replies sorted by it
        (descending unless ``soup={"descending": False}``). Replies lacking it are left out.
    tie_break_key : str, optional
        A stable value each client reports (in its MetricRecord or a ConfigRecord of
        its reply), e.g. its ``"partition-id"``. Replies are visited by ``order_by``,
        ties broken by this value, then by node id; it is never aggregated as a metric.
    checkpoint_dir : str or Path, optional
        Write :meth:`state_dict` there atomically after every round. If it already
        holds a checkpoint, it is restored now and :meth:`start` continues at the
        next round.
    seed : int
        Seeds AME shuffling; round ``t`` uses a seed derived from ``(seed, t)``.
    max_weight_share : float, optional
        The largest share ``ω_i / Σ ω`` of the round one reply may get (e.g. ``0.2``);
        the excess goes to the others pro rata. ``None`` (default): weights as claimed,
        as FedAvg takes them. Recommended where clients are not trusted
        (docs/deployment.md, threat model).
    adapter_config : dict, path or peft.LoraConfig, optional
        The server's LoRA adapter configuration (``adapter_config.json`` as a dict, its
        path or its directory, or PEFT's ``LoraConfig``): target modules, ``r``,
        ``lora_alpha``, rsLoRA. Given, replies are PEFT adapters
        (``get_peft_model_state_dict``) merged by the ``soup["lora"]`` mode, scaled by this
        configuration, never by anything a client sends; ``start()`` refuses a global
        model that does not match it (:class:`fedsoup.OptionError`).
    """

    def __init__(
        self,
        *fedavg_args: Any,
        soup: Mapping[str, Any] | None = None,
        stew: Mapping[str, Any] | None = None,
        soup_pivot: str = "soup",
        order_by: str | None = None,
        tie_break_key: str | None = "partition-id",
        checkpoint_dir: str | Path | None = None,
        seed: int = 0,
        max_weight_share: float | None = None,
        adapter_config: Any = None,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(*fedavg_args, **fedavg_kwargs)
        for name, value in (("order_by", order_by), ("tie_break_key", tie_break_key)):
            if value is not None and not isinstance(value, str):
                raise OptionError(name, value, f"{name} must name a client metric (a str), got {value!r}")
        soup, soup_lora = split_soup(soup)
        self.lora = lora_options(soup_lora, adapter_config)
        self.client_soup = ClientSoup(soup, pivot=soup_pivot, seed=seed, max_weight_share=max_weight_share)
        self.server_stew = ServerStew.from_settings(stew)
        self.order_by = order_by
        self.tie_break_key = tie_break_key
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None

        self._round = 0  # last completed server round
        self._current: dict[str, torch.Tensor] | None = None  # x_{t-1} when aggregating; x_t after
        self._cache = OutputCache()  # our last output ArrayRecord and its tensors
        self._round_offset = 0  # rounds done before start() was called (resume)
        self._bytes_sent = 0  # by this round's configure_train
        self._resumed = False

        if self.checkpoint_dir is not None:
            restored = read_checkpoint(self.checkpoint_dir)
            if restored is not None:
                try:
                    self._apply_state(restored)
                except StateError as error:
                    raise error.at(str(self.checkpoint_dir / STATE_JSON)) from None
                self._resumed = True
                log(INFO, "FedSoup: restored round %d from checkpoint '%s'", self._round, self.checkpoint_dir)

    # ------------------------------------------------------------------
    # Flower Strategy API
    # ------------------------------------------------------------------

    def summary(self) -> None:
        """Log the FedSoup settings, then FedAvg's, in Flower's style."""
        log(INFO, "\t├──> FedSoup settings:")
        log(INFO, "\t│\t├── ClientSoup: %s", self.client_soup.describe())
        order = f"by client metric '{self.order_by}', then " if self.order_by else ""
        order += f"by '{self.tie_break_key}', then " if self.tie_break_key else ""
        log(INFO, "\t│\t├── Soup pivot: %s | visiting order: %sby node id", self.client_soup.pivot, order)
        log(
            INFO,
            "\t│\t├── ServerStew: %s%s",
            self.server_stew.describe(),
            " = FedAvg's server step" if self.server_stew.is_identity else "",
        )
        if self.lora is not None:
            log(INFO, "\t│\t├── Adapters: %s", self.lora.describe())
        share = self.client_soup.max_weight_share
        log(INFO, "\t│\t├── Weights: %s | mean aggregate (DP): %s",
            "as claimed" if share is None else f"one reply's share capped at {share:g}", self.mean_aggregate)
        log(INFO, "\t│\t├── Seed: %d", self.client_soup.seed)
        if self.checkpoint_dir is None:
            log(INFO, "\t│\t└── Checkpoint dir: (none)")
        elif self._resumed:
            log(INFO, "\t│\t└── Checkpoint dir: '%s' (resuming after round %d)", self.checkpoint_dir, self._round)
        else:
            log(INFO, "\t│\t└── Checkpoint dir: '%s'", self.checkpoint_dir)
        super().summary()

    @property
    def mean_aggregate(self) -> bool:
        """True when each round's model is the weighted mean of the round's replies, as Flower's
        DP wrappers assume when they calibrate their noise (docs/strategy.md, "Differential
        privacy"): a plain soup (``soup=None``), no ``order_by``, the identity stew
        (SGD, lr 1, no momentum), and, for adapters, the ``factors`` mode (the ``products``
        mode's adapter is a truncated SVD of the mean of the products, not the mean of the
        replies). Read-only."""
        linear = self.lora is None or self.lora.mode == "factors"
        return self.client_soup.is_plain and self.order_by is None and self.server_stew.is_identity and linear

    @property
    def current_arrays(self) -> ArrayRecord | None:
        """The global model as FedSoup knows it: ``x_{t-1}`` once sent, ``x_t`` once aggregated.

        Settable (an ArrayRecord or a dict of arrays), as Flower's FedAvgM/FedOpt
        ``current_arrays``, to aggregate without a prior ``configure_train``.
        """
        return None if self._current is None else self._cache.to_arrays(self._current)

    @current_arrays.setter
    def current_arrays(self, arrays: ArrayRecord | Mapping[str, Any] | None) -> None:
        if arrays is None or isinstance(arrays, ArrayRecord):
            self._current = None if arrays is None else self._cache.to_tensors(arrays)
        else:
            self._current = {str(k): torch.as_tensor(np.asarray(v)) for k, v in arrays.items()}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the model sent this round (``x_{t-1}``), then configure as FedAvg does.

        With ``adapter_config``, the model must be an adapter that matches it
        (:class:`fedsoup.OptionError` otherwise, before any message is sent).
        """
        self._current = self._cache.to_tensors(arrays)
        if self.lora is not None:
            GlobalAdapter.of(self._current, self.lora)
        messages = list(super().configure_train(server_round + self._round_offset, arrays, config, grid))
        self._bytes_sent = array_bytes(messages)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's, at the round number the run has reached."""
        return super().configure_evaluate(server_round + self._round_offset, arrays, config, grid)

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """ClientSoup of the usable replies, then one ServerStew step.

        Bad replies are left out with one WARNING each; with none left the global
        model stays as it was (``None`` arrays, as Flower's strategies signal it).
        """
        server_round += self._round_offset
        replies = log_received("aggregate_train", replies)
        bytes_sent, self._bytes_sent = self._bytes_sent, 0
        with aggregation_threads():  # checks and merge: no more threads than idle cores
            adapter = global_adapter(self.lora, self._current)
            checker = self._checker(adapter)
            usable = checker.check("aggregate_train", replies, reference=self._current, train=True)
            outcome, lora_metrics = adapter_round(
                self.client_soup, self.server_stew, self.lora, adapter, usable, server_round, self._current
            )

        metrics = round_metrics(outcome, len(replies), server_round, self.train_metrics_aggr_fn, self.weighted_by_key)
        metrics.update(lora_metrics)
        metrics[METRIC_BYTES_SENT] = bytes_sent
        metrics[METRIC_BYTES_RECEIVED] = array_bytes(replies)
        arrays: ArrayRecord | None = None
        if outcome.model is not None:
            arrays = self._cache.to_arrays(outcome.model)
            self._current = outcome.model

        self._round = server_round
        if self.checkpoint_dir is not None:
            write_checkpoint(self.checkpoint_dir, self.state_dict(), server_round)
        return arrays, metrics

    def aggregate_evaluate(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> MetricRecord | None:
        """FedAvg's weighted metric average, leaving bad replies out instead of raising."""
        replies = log_received("aggregate_evaluate", replies)
        usable = self._checker().check("aggregate_evaluate", replies, train=False)
        if not usable:
            return None
        return aggregate_metrics(self.evaluate_metrics_aggr_fn, usable, self.weighted_by_key, "aggregate_evaluate")

    def start(self, *args: Any, **kwargs: Any) -> Result:
        """Flower's ``Strategy.start``; after a restore, it continues at the next round.

        Takes ``Strategy.start``'s arguments. ``num_rounds`` counts all rounds,
        including those done before a restart: a FedSoup restored after round 3 of 10
        has Flower's loop run the 7 remaining rounds from the checkpointed global model
        (``initial_arrays`` is then only used if the checkpoint has none), numbered
        4..10 in the messages, the checkpoints, the ``[ROUND r/10]`` log lines and the
        returned ``Result``. ``evaluate_fn`` sees the run's round numbers; its
        "initial" evaluation is the restored model's, as round 3. A run already
        complete (restored at or past ``num_rounds``) runs nothing: it logs so and
        returns a ``Result`` holding the saved model.
        """
        if self.lora is not None:  # a LoRA mode that cannot apply is refused before round 1
            call = inspect.signature(super().start).bind(*args, **kwargs)
            initial = call.arguments.get("initial_arrays")
            if isinstance(initial, ArrayRecord) and (self._round == 0 or self._current is None):
                GlobalAdapter.of(to_tensor_dict(initial), self.lora)
        if self._round == 0 or self._current is None:
            return super().start(*args, **kwargs)
        return resumed_start(
            super().start, args, kwargs, done=self._round, restored=self._cache.to_arrays(self._current),
            checkpoint_dir=self.checkpoint_dir, set_round_offset=lambda offset: setattr(self, "_round_offset", offset),
        )

    # ------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (see :mod:`strategies.state`)."""
        stew = self.server_stew.state_dict()
        return RunState(
            round=self._round,
            seed=self.client_soup.seed,
            global_model=self._current,
            stew=None if stew["state"] is None else stew,
            settings={
                "soup": self.client_soup.describe(),
                "stew": self.server_stew.describe(),
                "soup_pivot": self.client_soup.pivot,
                "order_by": self.order_by,
                "tie_break_key": self.tie_break_key,
                "weighted_by_key": self.weighted_by_key,
                "lora": None if self.lora is None else self.lora.describe(),
                "lora_mode": None if self.lora is None else self.lora.mode,
            },
        ).to_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the next round is ``state["round"] + 1``.

        Raises :class:`fedsoup.errors.StateError` (a ``ValueError``) if the state is not a
        FedSoup state, was written under another LoRA mode (``key`` ``"lora"``; checked
        before anything is restored: its stew and global model live in another space), holds
        a global adapter that does not match ``adapter_config`` (``key`` ``"global"``) or
        its ServerStew optimizer differs from this FedSoup's (``key`` ``"optimizer"``: its
        moments would be meaningless). A FedSoup created on a checkpoint raises the same,
        located at its ``state.json`` (``path``).
        """
        self._apply_state(RunState.from_dict(state))

    def _apply_state(self, state: RunState) -> None:
        mode, saved = (None if self.lora is None else self.lora.mode), state.lora_mode
        if saved != mode:  # the stew's state and the global model mean something else in another mode
            same = "without adapter_config" if saved is None else f"with adapter_config and soup={{'lora': {saved!r}}}"
            raise StateError(
                f"FedSoup state: written under LoRA mode {saved!r}, this FedSoup's is {mode!r} (None: no "
                f"adapter_config); resume {same}, or start afresh with another checkpoint_dir",
                key="lora",
            )
        if self.lora is not None and state.global_model is not None:
            try:  # what start() checks of initial_arrays, checked of the restored model
                GlobalAdapter.of(state.global_model, self.lora)
            except OptionError as error:
                raise StateError(f"FedSoup state: {error.reason}", key="global") from None
        try:
            self.server_stew.load_state_dict(state.stew or {"optimizer": self.server_stew.name, "state": None})
        except StateError as error:
            raise error.because(f"FedSoup state: {error.reason}") from None
        self._round = state.round
        self.client_soup.seed = state.seed
        self._current = state.global_model
        self._cache = OutputCache()

    # ------------------------------------------------------------------
    # Internals
    # ------------------------------------------------------------------

    def _checker(self, adapter: GlobalAdapter | None = None) -> ReplyChecker:
        structure = None if adapter is None else adapter_structure_check(adapter, self.lora.mode)
        return ReplyChecker(self.weighted_by_key, self.order_by, self.tie_break_key, structure)


def _signature_with_fedavgs_arguments() -> inspect.Signature:
    """FedAvg's parameters (whatever this Flower version has), then FedSoup's keyword-only ones.

    ``FedSoup.__init__`` forwards ``*args, **kwargs`` to FedAvg; this signature is what
    ``help()``, IDEs and ``inspect.signature(FedSoup)`` show.
    """
    fedavg = list(inspect.signature(FedAvg.__init__).parameters.values())
    ours = [p for p in inspect.signature(FedSoup.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
    return inspect.Signature(fedavg + ours, return_annotation=None)


FedSoup.__init__.__signature__ = _signature_with_fedavgs_arguments()  # type: ignore[attr-defined]
