"""Run configuration of the simulation App: one typed, validated view of ``run_config``.

Flower hands the ServerApp and ClientApp a flat ``run_config`` (kebab-case keys
from ``[tool.flwr.app.config]`` plus ``--run-config`` overrides). ``SimConfig``
fills missing keys from :data:`DEFAULTS` (the same values as ``pyproject.toml``,
so that ``flwr.simulation.run_simulation`` - which passes an empty run config -
behaves like ``flwr run .``), converts types, and rejects unknown keys and bad
values with a message naming the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from simulations.attacks import ATTACKS
from simulations.partitioning import PARTITIONINGS

STRATEGIES = (
    "fedavg",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "fedsoup",
    "central",  # task "lm" only: the pooled clients trained centrally (the upper reference)
)
DATASETS = ("digits", "cifar10")
TASKS = ("classification", "lm")
LORA_MODES = ("factors", "products")


@dataclass(frozen=True)
class SimConfig:
    """Every run-config key of the App (attribute ``a_b`` is key ``a-b``)."""

    num_server_rounds: int = 10
    strategy: str = "fedavg"
    task: str = "classification"  # "lm": LoRA fine-tuning of a byte-level LM (simulations.lm_task)
    # data
    dataset: str = "digits"
    data_dir: str = ""  # CIFAR-10 offline: binary batches or a saved HF dataset
    partitioning: str = "class-exclusion"
    num_partitions: int = 10
    ood_fraction: float = 0.5  # class-exclusion: share of classes a client never sees
    dirichlet_alpha: float = 0.5
    classes_per_partition: int = 2  # pathological
    val_fraction: float = 0.1  # of each client's shard, for the val-acc metric
    # client training
    local_epochs: int = 2
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    seed: int = 0
    # sampling
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    # Flower's server-side optimisers (0 = the strategy's own default)
    server_lr: float = 0.0
    server_momentum: float = 0.9
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    trimmed_beta: float = 0.2
    krum_malicious: int = -1  # -1: the number of attacking clients
    # FedSoup ClientSoup: an empty soup-optimizer means the plain weighted soup
    soup_optimizer: str = ""
    soup_lr: float = 0.0  # 0 = fedsoup.merge's default: 1 for SGD, scale-aware for adaptive optimizers
    soup_schedule: str = "harmonic"
    soup_epochs: int = 1
    soup_batch_size: int = 1
    soup_shuffle: bool = False
    soup_beta1: float = 0.9
    soup_beta2: float = 0.999
    soup_eps: float = 1e-8
    soup_weight_decay: float = 0.0
    soup_momentum: float = 0.0
    soup_pivot: str = "soup"  # AME starts at the soup (measured: docs/defaults.md)
    order_by: str = ""  # client metric that orders the soup, e.g. "val-acc"
    max_weight_share: float = 0.0  # FedSoup: the largest share ω_i/Σω of one reply; 0 = no cap (as FedAvg)
    # FedSoup ServerStew
    stew_optimizer: str = "sgd"
    stew_lr: float = 1.0
    stew_momentum: float = 0.0
    stew_beta1: float = 0.9
    stew_beta2: float = 0.99
    stew_eps: float = 1e-3
    # language-model task (task = "lm"): model, base, LoRA; lr and batch-size are the clients' AdamW
    lora_mode: str = "factors"  # FedSoup: merge A and B as tensors, or the products s·B·A
    lora_r: int = 8
    lora_alpha: float = 16.0
    lm_hidden: int = 64
    lm_layers: int = 2
    lm_seq_len: int = 64
    lm_base_steps: int = 300  # central AdamW steps on the public group (cached)
    lm_local_steps: int = 10  # client AdamW steps per round
    lm_heldout: float = 0.1  # tail of every file held out for perplexity
    lm_eval_bytes: int = 8192  # held-out bytes evaluated per client, in windows spread over all its files
    lm_cache_dir: str = ""  # where the base is cached; "" = $XDG_CACHE_HOME/fedsoup/lm-base
    # robustness experiments
    attack: str = "none"
    attack_fraction: float = 0.0
    attack_scale: float = 10.0
    # outputs
    checkpoint_dir: str = ""
    output_dir: str = ""

    def __post_init__(self) -> None:
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("attack", self.attack, ATTACKS)
        _check_choice("partitioning", self.partitioning, PARTITIONINGS)
        _check_choice("task", self.task, TASKS)
        _check_choice("lora-mode", self.lora_mode, LORA_MODES)
        if self.strategy == "central" and self.task != "lm":
            raise ValueError("run config 'strategy' = 'central' needs 'task' = 'lm'")
        if self.task == "lm":
            for key in ("lora_r", "lm_hidden", "lm_layers", "lm_seq_len", "lm_local_steps", "lm_eval_bytes"):
                if getattr(self, key) < 1:
                    raise ValueError(f"run config '{key.replace('_', '-')}' must be >= 1, got {getattr(self, key)}")
            if self.lm_hidden % 4:
                raise ValueError(f"run config 'lm-hidden' must be a multiple of 4 (heads), got {self.lm_hidden}")
            if not 0.0 < self.lm_heldout < 1.0:
                raise ValueError(f"run config 'lm-heldout' must be in (0, 1), got {self.lm_heldout}")
        if self.num_server_rounds < 1:
            raise ValueError(f"run config 'num-server-rounds' must be >= 1, got {self.num_server_rounds}")
        if self.num_partitions < 1:
            raise ValueError(f"run config 'num-partitions' must be >= 1, got {self.num_partitions}")
        if self.local_epochs < 1:
            raise ValueError(f"run config 'local-epochs' must be >= 1, got {self.local_epochs}")
        if not 0.0 <= self.attack_fraction <= 1.0:
            raise ValueError(f"run config 'attack-fraction' must be in [0, 1], got {self.attack_fraction}")
        if not 0.0 <= self.max_weight_share <= 1.0:
            raise ValueError(
                f"run config 'max-weight-share' must be in [0, 1] (0: no cap), got {self.max_weight_share}"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"run config 'val-fraction' must be in [0, 1), got {self.val_fraction}")

    @classmethod
    def from_run_config(cls, *configs: Mapping[str, Any] | None) -> SimConfig:
        """Merge run configs (later ones win) over the defaults and validate."""
        by_key = {f.name.replace("_", "-"): f for f in fields(cls)}
        values: dict[str, Any] = {}
        for config in configs:
            for key, value in (config or {}).items():
                field = by_key.get(key)
                if field is None:
                    raise ValueError(
                        f"unknown run config key '{key}'; known keys: {', '.join(sorted(by_key))}"
                    )
                values[field.name] = _convert(key, value, type(getattr(cls(), field.name)))
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        """The kebab-case mapping Flower uses (inverse of :meth:`from_run_config`)."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> SimConfig:
        return dataclasses.replace(self, **changes)


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"run config '{key}' = '{value}' is not one of: {', '.join(choices)}")


def _convert(key: str, value: Any, kind: type) -> Any:
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"run config '{key}' = {value!r} is not a valid {kind.__name__}"
        ) from None


DEFAULTS: dict[str, Any] = SimConfig().to_run_config()
