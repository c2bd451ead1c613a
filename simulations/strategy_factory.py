"""Run config -> Flower strategy (Flower's built-ins, or ``strategies.FedSoup``)."""

from __future__ import annotations

from typing import Any

from flwr.serverapp import strategy as flwr_strategy

from simulations.attacks import malicious_partitions
from simulations.config import SimConfig

# Keyword arguments each optimiser family understands (fedsoup.merge passes the
# rest of its kwargs to the torch.optim constructor).
_ADAM_LIKE = {"adam", "adamw", "nadam", "radam", "adamax"}


def soup_settings(cfg: SimConfig) -> dict[str, Any] | None:
    """``FedSoup(soup=...)``: kwargs of ``fedsoup.merge`` for the ClientSoup, or None (plain soup)."""
    name = cfg.soup_optimizer
    if not name:
        return None
    soup: dict[str, Any] = {
        "optimizer": name,
        "lr": cfg.soup_lr or None,  # 0: fedsoup.merge's own (scale-aware) default
        "schedule": cfg.soup_schedule,
        "epochs": cfg.soup_epochs,
        "batch_size": cfg.soup_batch_size,
        "shuffle": cfg.soup_shuffle,
    }
    soup.update(_optimizer_kwargs(name, cfg.soup_beta1, cfg.soup_beta2, cfg.soup_eps,
                                  cfg.soup_momentum, cfg.soup_weight_decay))
    return soup


def stew_settings(cfg: SimConfig) -> dict[str, Any]:
    """``FedSoup(stew=...)``: the ServerStew optimiser over round pseudogradients."""
    stew: dict[str, Any] = {"optimizer": cfg.stew_optimizer, "lr": cfg.stew_lr}
    stew.update(_optimizer_kwargs(cfg.stew_optimizer, cfg.stew_beta1, cfg.stew_beta2,
                                  cfg.stew_eps, cfg.stew_momentum, 0.0))
    return stew


def _optimizer_kwargs(name: str, beta1: float, beta2: float, eps: float,
                      momentum: float, weight_decay: float) -> dict[str, Any]:
    name = name.lower()
    if name in _ADAM_LIKE:
        kw: dict[str, Any] = {"betas": (beta1, beta2), "eps": eps}
        if weight_decay:
            kw["weight_decay"] = weight_decay
        return kw
    if name in ("fedadam", "fedyogi"):
        return {"betas": (beta1, beta2), "eps": eps}
    if name == "fedadagrad":
        return {"eps": eps}
    if name in ("adagrad",):
        return {"eps": eps, **({"weight_decay": weight_decay} if weight_decay else {})}
    if name in ("sgd", "rmsprop"):
        kw = {"momentum": momentum} if momentum else {}
        if weight_decay:
            kw["weight_decay"] = weight_decay
        return kw
    return {}


def build_strategy(cfg: SimConfig, num_nodes: int):
    """The strategy named by ``cfg.strategy``, sampling from ``num_nodes`` clients."""
    min_nodes = max(1, min(2, num_nodes))
    common: dict[str, Any] = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": min_nodes,
        "min_evaluate_nodes": min_nodes if cfg.fraction_evaluate > 0 else 0,
        "min_available_nodes": num_nodes,
    }
    lr = cfg.server_lr
    name = cfg.strategy
    if name == "fedavg":
        return flwr_strategy.FedAvg(**common)
    if name == "fedavgm":
        return flwr_strategy.FedAvgM(**common, server_learning_rate=lr or 1.0,
                                     server_momentum=cfg.server_momentum)
    if name in ("fedadam", "fedyogi"):
        cls = flwr_strategy.FedAdam if name == "fedadam" else flwr_strategy.FedYogi
        default_eta = 1e-1 if name == "fedadam" else 1e-2
        return cls(**common, eta=lr or default_eta, beta_1=cfg.server_beta1,
                   beta_2=cfg.server_beta2, tau=cfg.server_tau)
    if name == "fedmedian":
        return flwr_strategy.FedMedian(**common)
    if name == "fedtrimmedavg":
        return flwr_strategy.FedTrimmedAvg(**common, beta=cfg.trimmed_beta)
    if name == "krum":
        malicious = cfg.krum_malicious
        if malicious < 0:
            malicious = len(malicious_partitions(cfg.num_partitions, cfg.attack_fraction, cfg.seed))
        return flwr_strategy.Krum(**common, num_malicious_nodes=malicious)
    if name == "fedsoup":
        try:
            from strategies import FedSoup
        except ImportError as err:
            raise RuntimeError(
                "strategy 'fedsoup' needs strategies.FedSoup, which could not be imported"
            ) from err
        soup = soup_settings(cfg)
        lora: dict[str, Any] = {}
        if cfg.task == "lm":  # replies are PEFT adapters; the server's own adapter config scales them
            from simulations.lm_task import adapter_config_dict

            soup = {**(soup or {}), "lora": cfg.lora_mode}
            lora["adapter_config"] = adapter_config_dict(cfg)
        return FedSoup(
            **common,
            **lora,
            soup=soup,
            stew=stew_settings(cfg),
            soup_pivot=cfg.soup_pivot,
            order_by=cfg.order_by or None,
            checkpoint_dir=cfg.checkpoint_dir or None,
            seed=cfg.seed,
            max_weight_share=cfg.max_weight_share or None,  # 0: weights as claimed
        )
    raise ValueError(f"unknown strategy '{name}'")
