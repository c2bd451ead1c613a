"""``FedSoup``: a Flower strategy that merges client models by AME and stews them on the server.

Round ``t`` with global model ``x_{t-1}`` sent to the clients (SPEC §3; paper Appendix D,
"FedOPT as nested ensembling", Algorithm 3 "FedSoup"):

* **ClientSoup** merges the valid client replies ``x_i`` with weights ``ω_i`` (the
  ``weighted_by_key`` metric, ``num-examples`` by default) by Amortized Model
  Ensembling: ``w_t = fedsoup.merge([x_i], weights=ω, **soup)``. With ``soup=None``
  this is the plain weighted soup ``Σ ω_i x_i``, i.e. FedAvg's aggregate.
* **ServerStew** keeps one ``torch.optim`` optimizer alive across rounds and feeds it
  the round pseudogradient ``g_t = x_{t-1} − w_t``:
  ``x_t = x_{t-1} − lr · Optimizer(g_t)``. ``stew=None`` is SGD with lr 1, so
  ``x_t = w_t``; SGD with momentum is FedAvgM, ``fedadam``/``fedyogi``/``fedadagrad``
  are Flower's FedAdam/FedYogi/FedAdagrad.

Unlike Flower's built-in strategies, FedSoup keeps every array's dtype, never
optimises integer buffers, never raises on a bad client reply (it leaves the reply
out with one WARNING naming the node), and can checkpoint and resume.
"""

from __future__ import annotations

import io
import math
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.common.constant import SType
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info

import fedsoup
from fedsoup.state import has_checkpoint, load_checkpoint, save_checkpoint

__all__ = [
    "FedSoup",
    "METRIC_CLIENTS_USED",
    "METRIC_CLIENTS_LEFT_OUT",
    "METRIC_STEW_GRAD_NORM",
    "METRIC_AME_SOUP_DISTANCE",
]

#: Keys FedSoup adds to the aggregated train MetricRecord of every round.
METRIC_CLIENTS_USED = "fedsoup-clients-used"
METRIC_CLIENTS_LEFT_OUT = "fedsoup-clients-left-out"
#: ‖g_t‖ = ‖x_{t-1} − w_t‖ over the floating arrays: how far the round moved the model.
METRIC_STEW_GRAD_NORM = "fedsoup-stew-grad-norm"
#: ‖AME merge − plain soup‖ of the same replies: what AME changed (0 for the plain soup).
METRIC_AME_SOUP_DISTANCE = "fedsoup-ame-soup-distance"

# `merge` arguments that FedSoup sets itself from the replies and its own options.
_SOUP_RESERVED = {
    "models": "the client replies are the models",
    "weights": "weights come from `weighted_by_key`",
    "pivot": "use FedSoup(soup_pivot=...)",
    "order_by": "use FedSoup(order_by='<client metric key>')",
    "seed": "use FedSoup(seed=...); each round derives its own seed from it",
}
_STATE_FORMAT = "fedsoup.strategies.FedSoup"
# np.save headers are padded to a multiple of 64 bytes and numpy refuses any above
# 10 000 bytes by default: this many bytes always hold the whole header.
_NPY_HEADER_PEEK = 16384


@dataclass
class _ArraySpec:
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def floating(self) -> bool:
        return np.issubdtype(self.dtype, np.floating)


@dataclass
class _Reply:
    node_id: int
    content: RecordDict
    weight: float
    score: float | None
    arrays: dict[str, torch.Tensor] | None = None


class _LeftOut(Exception):
    """A reply that cannot take part in the round; the message is the reason."""


class FedSoup(FedAvg):
    """Federated learning by Amortized Model Ensembling: ClientSoup + ServerStew.

    A drop-in replacement for :class:`flwr.serverapp.strategy.FedAvg`: it accepts all
    of FedAvg's keyword arguments, and with the defaults it computes FedAvg's model.

    Parameters
    ----------
    soup : dict, optional
        Keyword arguments of :func:`fedsoup.merge` for the per-round ClientSoup
        (``optimizer``, ``lr``, ``schedule``, ``epochs``, ``batch_size``, ``shuffle``,
        ``adaptive_pivot``, ``amplification``, ``descending``, ``greedy``/``evaluate``,
        ``project`` and optimizer kwargs such as ``betas``). ``None``: the plain
        weighted soup (FedAvg). ``weights``, ``pivot``, ``order_by`` and ``seed`` are
        set by FedSoup.
    stew : dict, optional
        The ServerStew optimizer: ``{"optimizer": name or torch.optim class, "lr": η,
        **kwargs}`` (``optimizer`` defaults to ``"sgd"``, ``lr`` to 1.0). ``None``: SGD
        with lr 1 (``x_t = w_t``, FedAvg). The optimizer persists across rounds.
    soup_pivot : {"global", "soup"}
        AME pivot initialisation ``w_0``: the model sent this round (``x_{t-1}``) or the
        weighted soup of the replies.
    order_by : str, optional
        A client metric key (e.g. ``"val-acc"``): AME visits the replies sorted by it
        (descending unless ``soup={"descending": False}``). Without it: by node id.
        Replies lacking the metric are left out. Never by arrival order.
    checkpoint_dir : str or Path, optional
        Write :meth:`state_dict` there atomically after every round (safetensors +
        JSON). If it already holds a checkpoint, it is restored now and :meth:`start`
        continues at the next round.
    seed : int
        Seeds AME shuffling; round ``t`` uses a seed derived from ``(seed, t)``.
    **fedavg_kwargs
        ``fraction_train``, ``min_train_nodes``, ``weighted_by_key``, ... as in FedAvg.
    """

    # pylint: disable=too-many-arguments,too-many-instance-attributes,too-many-locals
    def __init__(
        self,
        *,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        soup: Mapping[str, Any] | None = None,
        stew: Mapping[str, Any] | None = None,
        soup_pivot: str = "global",
        order_by: str | None = None,
        checkpoint_dir: str | Path | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.soup = _check_soup(soup)
        self.stew_optimizer, self.stew_lr, self.stew_kwargs = _check_stew(stew)
        if soup_pivot not in ("global", "soup"):
            raise ValueError(f"soup_pivot must be 'global' or 'soup', got {soup_pivot!r}")
        if order_by is not None and not isinstance(order_by, str):
            raise ValueError(f"order_by must name a client metric (a str), got {order_by!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.soup_pivot = soup_pivot
        self.order_by = order_by
        self.seed = int(seed)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        # The identity stew (SGD, lr 1, no momentum/decay) is x_t = w_t exactly: skip the
        # optimizer, which would compute x - (x - w) with a rounding error and two passes.
        self._stew_is_identity = self.stew_lr == 1.0 and fedsoup.is_plain_sgd(self.stew_optimizer, self.stew_kwargs)

        self._round = 0  # last completed server round
        self._global: dict[str, torch.Tensor] | None = None  # latest global model (x_{t-1} or x_t)
        self._sent: dict[str, torch.Tensor] | None = None  # x_{t-1}: the model sent this round
        self._output_cache: tuple[ArrayRecord, dict[str, Array], dict[str, torch.Tensor]] | None = None
        self._stew: torch.optim.Optimizer | None = None
        self._stew_params: dict[str, torch.Tensor] = {}
        self._resumed_from: int | None = None

        if self.checkpoint_dir is not None and has_checkpoint(self.checkpoint_dir):
            self.load_state_dict(load_checkpoint(self.checkpoint_dir))
            self._resumed_from = self._round
            log(INFO, "FedSoup: restored round %d from checkpoint '%s'", self._round, self.checkpoint_dir)

    # ------------------------------------------------------------------
    # Flower Strategy API
    # ------------------------------------------------------------------

    def summary(self) -> None:
        """Log the FedSoup settings, then FedAvg's, in Flower's style."""
        log(INFO, "\t├──> FedSoup settings:")
        if self.soup is None:
            log(INFO, "\t│\t├── ClientSoup: plain weighted soup (FedAvg)")
        else:
            log(INFO, "\t│\t├── ClientSoup: fedsoup.merge(%s)", _format_kwargs(self.soup))
        log(
            INFO,
            "\t│\t├── Soup pivot: %s | visiting order: %s",
            self.soup_pivot,
            f"by client metric '{self.order_by}'" if self.order_by else "by node id",
        )
        stew = _format_kwargs({"lr": self.stew_lr, **self.stew_kwargs})
        log(
            INFO,
            "\t│\t├── ServerStew: %s(%s)%s",
            _optimizer_name(self.stew_optimizer),
            stew,
            " = FedAvg's server step" if self._stew_is_identity else "",
        )
        log(INFO, "\t│\t├── Seed: %d", self.seed)
        if self.checkpoint_dir is None:
            log(INFO, "\t│\t└── Checkpoint dir: (none)")
        elif self._resumed_from is not None:
            log(INFO, "\t│\t└── Checkpoint dir: '%s' (resuming after round %d)", self.checkpoint_dir, self._round)
        else:
            log(INFO, "\t│\t└── Checkpoint dir: '%s'", self.checkpoint_dir)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the model sent this round (``x_{t-1}``), then configure as FedAvg does."""
        self._sent = self._arrays_to_tensors(arrays)
        self._global = self._sent
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """ClientSoup of the valid replies, then one ServerStew step.

        Bad replies are left out with one WARNING each; with none left the global
        model stays as it was (``None`` arrays, as Flower's strategies signal it).
        """
        replies = _log_received("aggregate_train", replies)
        valid = self._valid_replies(replies)

        arrays: ArrayRecord | None = None
        metrics: MetricRecord | None = None
        soup = self._client_soup(valid, server_round) if valid else None
        if soup is not None:
            merged, distance, valid = soup
            new_global, grad_norm = self._server_stew(merged)
            arrays = self._tensors_to_arrays(new_global)
            self._global = new_global
            metrics = _aggregate_metrics(self.train_metrics_aggr_fn, valid, self.weighted_by_key, "aggregate_train")
            metrics[METRIC_CLIENTS_USED] = len(valid)
            metrics[METRIC_CLIENTS_LEFT_OUT] = len(replies) - len(valid)
            if grad_norm is not None:
                metrics[METRIC_STEW_GRAD_NORM] = grad_norm
            metrics[METRIC_AME_SOUP_DISTANCE] = distance
            log(
                INFO,
                "aggregate_train: FedSoup merged %d replies (%d left out), ‖g_t‖ = %s",
                len(valid),
                len(replies) - len(valid),
                "n/a" if grad_norm is None else f"{grad_norm:.6g}",
            )
        else:
            metrics = MetricRecord({METRIC_CLIENTS_USED: 0, METRIC_CLIENTS_LEFT_OUT: len(replies)})
            if replies:
                log(WARNING, "aggregate_train: no usable reply in round %d; global model unchanged", server_round)

        self._round = server_round
        if self.checkpoint_dir is not None:
            save_checkpoint(
                self.checkpoint_dir,
                self.state_dict(),
                tag=f"round-{server_round:05d}",
                metadata={"round": str(server_round)},
            )
        return arrays, metrics

    def aggregate_evaluate(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> MetricRecord | None:
        """FedAvg's weighted metric average, leaving bad replies out instead of raising."""
        replies = _log_received("aggregate_evaluate", replies)
        valid = self._valid_replies(replies, train=False)
        if not valid:
            return None
        return _aggregate_metrics(self.evaluate_metrics_aggr_fn, valid, self.weighted_by_key, "aggregate_evaluate")

    # pylint: disable=too-many-arguments,too-many-positional-arguments
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's round loop (``Strategy.start``), resuming after the restored round.

        ``num_rounds`` counts all rounds, including those done before a restart: a
        FedSoup restored after round 3 of 10 runs rounds 4..10 from the checkpointed
        global model (``initial_arrays`` is then only used if the checkpoint has none).
        """
        first_round = self._round + 1
        arrays = initial_arrays
        if self._round > 0 and self._global is not None:
            arrays = self._tensors_to_arrays(self._global)
            if {k: tuple(a.shape) for k, a in initial_arrays.items()} != {k: tuple(a.shape) for k, a in arrays.items()}:
                log(
                    WARNING,
                    "FedSoup: the checkpointed model has other arrays than initial_arrays; "
                    "continuing from the checkpoint in '%s'",
                    self.checkpoint_dir,
                )
        log(INFO, "Starting %s strategy:", self.__class__.__name__)
        log_strategy_start_info(num_rounds, arrays, train_config, evaluate_config)
        self.summary()
        log(INFO, "")

        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result()
        result.arrays = arrays

        t_start = time.time()
        if first_round > 1:
            log(INFO, "Resuming at round %d/%d from the FedSoup checkpoint", first_round, num_rounds)
        elif evaluate_fn:
            res = evaluate_fn(0, arrays)
            log(INFO, "Initial global evaluation results: %s", res)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res

        for current_round in range(first_round, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", current_round, num_rounds)

            train_replies = grid.send_and_receive(
                messages=self.configure_train(current_round, arrays, train_config, grid),
                timeout=timeout,
            )
            agg_arrays, agg_train_metrics = self.aggregate_train(current_round, train_replies)
            if agg_arrays is not None:
                result.arrays = agg_arrays
                arrays = agg_arrays
            if agg_train_metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", agg_train_metrics)
                result.train_metrics_clientapp[current_round] = agg_train_metrics

            evaluate_replies = grid.send_and_receive(
                messages=self.configure_evaluate(current_round, arrays, evaluate_config, grid),
                timeout=timeout,
            )
            agg_evaluate_metrics = self.aggregate_evaluate(current_round, evaluate_replies)
            if agg_evaluate_metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", agg_evaluate_metrics)
                result.evaluate_metrics_clientapp[current_round] = agg_evaluate_metrics

            if evaluate_fn:
                log(INFO, "Global evaluation")
                res = evaluate_fn(current_round, arrays)
                log(INFO, "\t└──> MetricRecord: %s", res)
                if res is not None:
                    result.evaluate_metrics_serverapp[current_round] = res

        log(INFO, "")
        log(INFO, "Strategy execution finished in %.2fs", time.time() - t_start)
        log(INFO, "")
        log(INFO, "Final results:")
        log(INFO, "")
        for line in io.StringIO(str(result)):
            log(INFO, "\t%s", line.strip("\n"))
        log(INFO, "")
        return result

    # ------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: round, global model, stew optimizer, seed.

        Tensors are returned by reference (as ``torch.nn.Module.state_dict`` does);
        :func:`fedsoup.state.save_checkpoint` stores it without pickle.
        """
        stew = None
        if self._stew is not None:
            stew = {
                "optimizer": _optimizer_name(self.stew_optimizer),
                "keys": list(self._stew_params),
                "state": self._stew.state_dict(),
            }
        return {
            "format": _STATE_FORMAT,
            "round": self._round,
            # Round t's AME seed is derived from (seed, t): this is the whole RNG state.
            "rng": {"seed": self.seed},
            "global": None if self._global is None else dict(self._global),
            "stew": stew,
            "settings": {
                "soup": None if self.soup is None else _format_kwargs(self.soup),
                "stew": _format_kwargs({"optimizer": _optimizer_name(self.stew_optimizer), "lr": self.stew_lr, **self.stew_kwargs}),
                "soup_pivot": self.soup_pivot,
                "order_by": self.order_by,
                "weighted_by_key": self.weighted_by_key,
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the next round is ``state["round"] + 1``.

        Raises ``ValueError`` if the state is not a FedSoup state or its stew optimizer
        differs from this FedSoup's (its moments would be meaningless).
        """
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise ValueError("not a FedSoup state (missing format 'fedsoup.strategies.FedSoup')")
        round_ = state.get("round")
        if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
            raise ValueError(f"FedSoup state: invalid round {round_!r}")
        global_ = state.get("global")
        stew = state.get("stew")
        if stew is not None:
            expected = _optimizer_name(self.stew_optimizer)
            if stew.get("optimizer") != expected:
                raise ValueError(
                    f"FedSoup state: its ServerStew optimizer is {stew.get('optimizer')!r}, "
                    f"this FedSoup uses {expected!r}"
                )
            if global_ is None:
                raise ValueError("FedSoup state: a stew state without a global model")
        self._round = round_
        self.seed = int(state.get("rng", {}).get("seed", self.seed))
        self._global = None if global_ is None else {str(k): torch.as_tensor(v).clone() for k, v in global_.items()}
        self._sent = None
        self._output_cache = None
        self._stew, self._stew_params = None, {}
        if stew is not None:
            keys = list(stew["keys"])
            missing = [k for k in keys if k not in self._global]
            if missing:
                raise ValueError(f"FedSoup state: stew array {missing[0]!r} is not in the global model")
            self._build_stew({k: self._global[k] for k in keys})
            self._stew.load_state_dict(stew["state"])

    # ------------------------------------------------------------------
    # Internals
    # ------------------------------------------------------------------

    def _arrays_to_tensors(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        cache = self._output_cache
        if (
            cache is not None
            and cache[0] is arrays
            and arrays.keys() == cache[1].keys()
            and all(arrays[k] is cache[1][k] for k in arrays)
        ):
            return cache[2]  # our own last output: no need to deserialise it again
        return {key: _to_tensor(_array_view(array)) for key, array in arrays.items()}

    def _tensors_to_arrays(self, tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
        record = ArrayRecord({key: Array(t.detach().cpu().numpy()) for key, t in tensors.items()})
        self._output_cache = (record, dict(record.items()), dict(tensors))
        return record

    def _reference_spec(self, candidates: list[tuple[int, RecordDict]]) -> dict[str, _ArraySpec] | None:
        """The arrays every reply must have: the model sent this round, else the majority."""
        if self._sent is not None:
            return {k: _ArraySpec(tuple(t.shape), _numpy_dtype(t)) for k, t in self._sent.items()}
        signatures = []
        for _, content in candidates:
            if len(content.array_records) == 1:
                record = next(iter(content.array_records.values()))
                signatures.append(tuple((k, tuple(a.shape), a.dtype) for k, a in record.items()))
        if not signatures:
            return None
        signature, _ = Counter(signatures).most_common(1)[0]
        return {k: _ArraySpec(shape, np.dtype(dtype)) for k, shape, dtype in signature}

    def _valid_replies(self, replies: list[Message], train: bool = True) -> list[_Reply]:
        """Validate replies in node-id order; log one WARNING per reply left out.

        Train replies need one ArrayRecord matching the global model; all replies need
        one MetricRecord with a positive weight and the keys most replies have (where
        Flower's FedAvg raises on inconsistent replies, the offenders are left out).
        """
        stage = "aggregate_train" if train else "aggregate_evaluate"
        replies = sorted(replies, key=lambda msg: msg.metadata.src_node_id)

        def leave_out(msg: Message, reason: str) -> None:
            log(WARNING, "%s: left out reply from node %d: %s", stage, msg.metadata.src_node_id, reason)

        candidates: list[tuple[Message, RecordDict]] = []
        for msg in replies:
            if msg.has_error():
                leave_out(msg, f"error reply (code {msg.error.code}: {msg.error.reason})")
            elif not msg.has_content():
                leave_out(msg, "reply without content")
            elif train and len(msg.content.array_records) != 1:
                leave_out(msg, f"expected exactly one ArrayRecord, found {len(msg.content.array_records)}")
            elif len(msg.content.metric_records) != 1:
                leave_out(msg, f"expected exactly one MetricRecord, found {len(msg.content.metric_records)}")
            else:
                candidates.append((msg, msg.content))

        metric_keys = Counter(
            frozenset(next(iter(c.metric_records.values())).keys()) for _, c in candidates
        ).most_common(1)
        majority_keys = metric_keys[0][0] if metric_keys else frozenset()
        reference = self._reference_spec([(m.metadata.src_node_id, c) for m, c in candidates]) if train else None

        valid: list[_Reply] = []
        for msg, content in candidates:
            try:
                metrics = next(iter(content.metric_records.values()))
                if frozenset(metrics.keys()) != majority_keys:
                    raise _LeftOut(
                        "MetricRecord keys differ from the other replies: "
                        + _key_diff(metrics.keys(), majority_keys, "metric")
                    )
                weight = _number(metrics, self.weighted_by_key, "weight")
                if weight <= 0:
                    raise _LeftOut(f"weight '{self.weighted_by_key}' = {weight:g} is not positive")
                score = None
                arrays = None
                if train:
                    score = _number(metrics, self.order_by, "order_by metric") if self.order_by else None
                    arrays = _read_arrays(next(iter(content.array_records.values())), reference)
            except _LeftOut as reason:
                leave_out(msg, str(reason))
                continue
            valid.append(_Reply(msg.metadata.src_node_id, content, weight, score, arrays))
        return valid

    def _client_soup(
        self, replies: list[_Reply], server_round: int
    ) -> tuple[dict[str, torch.Tensor], float, list[_Reply]] | None:
        """``(w_t, ‖w_t − soup‖, replies used)``: the AME merge of the replies.

        Replies with NaN/Inf values are left out and the merge is redone without them.
        """
        replies = list(replies)
        kwargs: dict[str, Any] = dict(self.soup or {})
        if self.soup is not None:
            kwargs["seed"] = _round_seed(self.seed, server_round)
            if self.soup_pivot == "global":
                if self._sent is None:
                    raise AggregationError(
                        "soup_pivot='global' needs the model sent this round: call configure_train first"
                    )
                kwargs["pivot"] = self._sent
        while replies:
            models = [r.arrays for r in replies]
            weights = [r.weight for r in replies]
            order_by = [r.score for r in replies] if self.order_by else None
            try:
                merged = fedsoup.merge(models, weights=weights, order_by=order_by, **kwargs)
            except ValueError as error:
                # Non-finite replies only show up in the merge's (cheap) check of its
                # result; find the culprits now, leave them out and merge again.
                bad_keys = [fedsoup.find_non_finite(r.arrays) for r in replies]
                if all(key is None for key in bad_keys):
                    log(WARNING, "aggregate_train: ClientSoup failed (%s); global model unchanged", error)
                    return None
                for reply, key in zip(replies, bad_keys):
                    if key is not None:
                        log(
                            WARNING,
                            "aggregate_train: left out reply from node %d: array '%s' contains NaN or Inf",
                            reply.node_id,
                            key,
                        )
                replies = [r for r, key in zip(replies, bad_keys) if key is None]
                continue
            if self.soup is None:
                return merged, 0.0, replies
            plain = fedsoup.soup(models, weights)
            return merged, _distance(merged, plain), replies
        return None

    def _build_stew(self, model: Mapping[str, torch.Tensor]) -> None:
        # float16/bfloat16 arrays are optimised in float32; float32/float64 as they are.
        self._stew_params = {
            key: t.detach().to(t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32, copy=True)
            for key, t in model.items()
            if t.is_floating_point()
        }
        self._stew = fedsoup.make_optimizer(
            self.stew_optimizer, list(self._stew_params.values()), self.stew_lr, **self.stew_kwargs
        )

    def _server_stew(self, merged: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float | None]:
        """``x_t = x_{t-1} − lr·Optimizer(x_{t-1} − w_t)``; returns ``(x_t, ‖g_t‖)``."""
        sent = self._sent
        dtypes = {k: t.dtype for k, t in (sent or merged).items()}
        if self._stew_is_identity:
            grad_norm = None
            if sent is not None:
                grad_norm = _distance(sent, merged)
            return {k: merged[k].to(dtypes[k]) for k in dtypes}, grad_norm
        if sent is None:
            raise AggregationError(
                "The ServerStew needs the model sent this round: call configure_train before aggregate_train"
            )
        if self._stew is None:
            self._build_stew(sent)
        float_keys = [k for k, t in sent.items() if t.is_floating_point()]
        if set(float_keys) != set(self._stew_params):
            raise AggregationError(
                "The global model's floating arrays changed since the ServerStew was created: "
                + _key_diff(float_keys, self._stew_params.keys(), "array")
            )
        squared = []
        with torch.no_grad():
            for key, param in self._stew_params.items():
                # x_{t-1} is what was sent, which may differ from our last output
                # (e.g. a DP wrapper added noise to it): step from there, as FedOpt does.
                param.copy_(sent[key])
                grad = torch.sub(sent[key].to(param.dtype), merged[key].to(param.dtype))
                squared.append(float(torch.linalg.vector_norm(grad, dtype=torch.float64)) ** 2)
                param.grad = grad
            self._stew.step()
        new_global = {}
        for key in sent:
            if key in self._stew_params:
                new_global[key] = self._stew_params[key].detach().to(dtypes[key], copy=True)
                self._stew_params[key].grad = None
            else:
                new_global[key] = merged[key].to(dtypes[key])  # integer buffers: never optimised
        return new_global, math.sqrt(math.fsum(squared))


# ----------------------------------------------------------------------
# Helpers (pure functions)
# ----------------------------------------------------------------------


def _log_received(stage: str, replies: Iterable[Message]) -> list[Message]:
    """Log results and failures as Flower's strategies do; return the replies as a list."""
    replies = list(replies)
    num_errors = sum(1 for msg in replies if msg.has_error())
    log(INFO, "%s: Received %s results and %s failures", stage, len(replies) - num_errors, num_errors)
    return replies


def _aggregate_metrics(aggregate: Callable, replies: list[_Reply], weighted_by_key: str, stage: str) -> MetricRecord:
    """The metrics aggregation function on the valid replies; a failure costs the metrics, not the round."""
    try:
        metrics = aggregate([r.content for r in replies], weighted_by_key)
    except Exception as error:  # noqa: BLE001 - e.g. list metrics of different lengths
        log(WARNING, "%s: could not aggregate the client metrics (%r); reporting FedSoup's only", stage, error)
        return MetricRecord()
    return MetricRecord(dict(metrics)) if metrics is not None else MetricRecord()


def _check_soup(soup: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if soup is None:
        return None
    if not isinstance(soup, Mapping):
        raise ValueError(f"soup must be a dict of fedsoup.merge arguments, got {type(soup).__name__}")
    for key in soup:
        if key in _SOUP_RESERVED:
            raise ValueError(f"soup[{key!r}] is set by FedSoup: {_SOUP_RESERVED[key]}")
    soup = dict(soup)
    if not soup.get("greedy"):
        # Fail now, with fedsoup's message, rather than in round 1 on the server.
        probe = [{"w": torch.zeros(2)}, {"w": torch.ones(2)}]
        try:
            fedsoup.merge(probe, **soup)
        except Exception as error:  # noqa: BLE001 - whatever merge rejects, say so now
            raise ValueError(f"invalid soup settings {soup!r}: {error!r}") from None
    return soup


def _check_stew(stew: Mapping[str, Any] | None) -> tuple[Any, float, dict[str, Any]]:
    stew = dict(stew or {})
    optimizer = stew.pop("optimizer", "sgd")
    lr = float(stew.pop("lr", 1.0))
    try:
        fedsoup.make_optimizer(optimizer, [torch.zeros(2, requires_grad=True)], lr, **stew)
    except Exception as error:  # noqa: BLE001 - whatever the optimizer rejects, say so now
        raise ValueError(f"invalid stew settings: {error!r}") from None
    return optimizer, lr, stew


def _optimizer_name(optimizer: Any) -> str:
    return optimizer if isinstance(optimizer, str) else f"{optimizer.__module__}.{optimizer.__qualname__}"


def _format_kwargs(kwargs: Mapping[str, Any]) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, type):
            return value.__qualname__
        if callable(value):
            return getattr(value, "__qualname__", repr(value))
        return repr(value)

    return ", ".join(f"{k}={fmt(v)}" for k, v in kwargs.items())


def _round_seed(seed: int, server_round: int) -> int:
    """A seed per (seed, round): rounds shuffle independently and reproducibly."""
    return int(np.random.SeedSequence([seed, server_round]).generate_state(1)[0])


def _numpy_dtype(tensor: torch.Tensor) -> np.dtype:
    return torch.empty((), dtype=tensor.dtype).numpy().dtype


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    with warnings.catch_warnings():
        # Read-only views of a message's bytes: torch warns that it cannot mark the
        # tensor read-only. Nothing here writes to its inputs (fedsoup.merge is pure).
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        return torch.from_numpy(array)


def _array_view(array: Array) -> np.ndarray:
    """A zero-copy, read-only NumPy view of a Flower ``Array`` (``Array.numpy()`` copies).

    Flower serialises arrays with ``np.save`` (no pickle); the data follows the .npy
    header, so ``np.frombuffer`` can point into it. Anything unusual (another
    serialisation type, an object dtype, a header we do not know) goes through
    Flower's own ``Array.numpy()``.
    """
    if array.stype != SType.NUMPY:
        return array.numpy()
    head = io.BytesIO(array.data[:_NPY_HEADER_PEEK])
    try:
        version = np.lib.format.read_magic(head)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(head)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(head)
        else:
            return array.numpy()
    except ValueError:
        return array.numpy()
    if dtype.hasobject:
        raise ValueError(f"object dtype {dtype} is not an array of numbers")
    count = math.prod(shape)
    flat = np.frombuffer(array.data, dtype=dtype, count=count, offset=head.tell())
    return flat.reshape(shape, order="F" if fortran_order else "C")


def _number(metrics: MetricRecord, key: str, what: str) -> float:
    if key not in metrics:
        raise _LeftOut(f"no {what} '{key}' in its MetricRecord")
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _LeftOut(f"{what} '{key}' is not a single number: {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise _LeftOut(f"{what} '{key}' is {value}")
    return value


def _key_diff(keys: Iterable[str], expected: Iterable[str], what: str) -> str:
    keys, expected = set(keys), set(expected)
    parts = []
    missing, extra = sorted(expected - keys), sorted(keys - expected)
    if missing:
        parts.append(f"missing {what} {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        parts.append(f"unexpected {what} {extra[0]!r}" + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""))
    return ", ".join(parts) or "different order"


def _read_arrays(record: ArrayRecord, reference: dict[str, _ArraySpec] | None) -> dict[str, torch.Tensor]:
    """Check a reply's arrays against the reference (metadata first), then deserialise them."""
    if reference is not None:
        if record.keys() != reference.keys():
            raise _LeftOut(_key_diff(record.keys(), reference.keys(), "array"))
        for key, spec in reference.items():
            array = record[key]
            if tuple(array.shape) != spec.shape:
                raise _LeftOut(f"array '{key}' has shape {tuple(array.shape)}, expected {spec.shape}")
            try:
                floating = np.issubdtype(np.dtype(array.dtype), np.floating)
            except TypeError:
                raise _LeftOut(f"array '{key}' has unknown dtype {array.dtype!r}") from None
            if floating != spec.floating:
                raise _LeftOut(f"array '{key}' has dtype {array.dtype}, the global model has {spec.dtype}")
    tensors = {}
    for key, array in record.items():
        try:
            value = _array_view(array)
        except Exception as error:  # noqa: BLE001 - any decoding failure means a bad reply
            raise _LeftOut(f"array '{key}' cannot be read ({error})") from None
        if reference is not None and tuple(value.shape) != reference[key].shape:
            raise _LeftOut(f"array '{key}' holds shape {tuple(value.shape)}, expected {reference[key].shape}")
        try:
            tensors[key] = _to_tensor(value)
        except TypeError as error:
            raise _LeftOut(f"array '{key}' has an unsupported dtype ({error})") from None
    return tensors


def _distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """‖a − b‖ over the floating arrays (per-array norms summed in float64)."""
    return math.sqrt(math.fsum(float(torch.dist(a[k], b[k])) ** 2 for k in a if a[k].is_floating_point()))
