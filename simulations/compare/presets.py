"""The ready-made comparisons (``--preset``) and the run-config keys only clients see."""

from __future__ import annotations

from typing import Any

# Keys that change what a client does; they must be equal for every compared strategy.
CLIENT_KEYS = frozenset({
    "dataset", "data-dir", "partitioning", "num-partitions", "ood-fraction", "dirichlet-alpha",
    "classes-per-partition", "val-fraction", "local-epochs", "batch-size", "lr", "momentum",
    "seed", "attack", "attack-fraction", "attack-scale",
    "task", "lora-r", "lora-alpha", "lm-hidden", "lm-layers", "lm-seq-len", "lm-base-steps", "lm-local-steps",
    "lm-heldout", "lm-eval-bytes", "lm-cache-dir",
})

# AME ClientSoup used by the presets: Adam over the clients' pseudogradients, pivot
# at the global model, 5 shuffled epochs in mini-batches of 2 clients, harmonic
# decay, clients visited by validation accuracy (best first, as the paper sorts
# ingredients; FedSoup breaks ties by the partition id each client reports, which
# makes the order - and so the result - independent of the node ids Ray draws at
# random). Picked by a small sweep on the demo setting (docs/simulations.md); it
# does not beat FedAvg there - see the measured table.
AME_CLIENT_SOUP = {
    "soup-optimizer": "adam", "soup-lr": 0.01, "soup-schedule": "harmonic",
    "soup-epochs": 5, "soup-batch-size": 2, "soup-shuffle": True,
    "soup-beta1": 0.8, "soup-beta2": 0.9, "soup-eps": 1e-5, "order-by": "val-acc",
    "soup-pivot": "global",
}
# ServerStew with Flower's FedAdam update (eta 0.1, betas 0.9/0.99, tau 1e-3).
ADAM_STEW = {"stew-optimizer": "fedadam", "stew-lr": 0.1, "stew-beta1": 0.9,
             "stew-beta2": 0.99, "stew-eps": 1e-3}

# AME ClientSoup over LoRA factors: Adam, lr 0.003 (of 0.003/0.01/0.03, pivot global or soup, on the
# reduced test setting: the closest to FedAvg, none beat it; larger steps leave the clients' ball), pivot at
# the adapter sent this round; no order (clients report no accuracy), ties by partition id.
AME_ADAPTER_SOUP = {
    "soup-optimizer": "adam", "soup-lr": 0.003, "soup-schedule": "harmonic",
    "soup-epochs": 5, "soup-batch-size": 2, "soup-shuffle": True,
    "soup-beta1": 0.8, "soup-beta2": 0.9, "soup-eps": 1e-8, "soup-pivot": "global",
}
# The language-model task (simulations.lm_task): 6 stdlib package groups as clients, LoRA r=8.
LORA_BASE = {"task": "lm", "num-partitions": 6, "num-server-rounds": 5, "lm-local-steps": 15,
             "lr": 0.003, "batch-size": 8, "lm-base-steps": 300, "lm-seq-len": 64, "lm-hidden": 64,
             "lm-layers": 2, "lora-r": 8, "lora-alpha": 16.0}

PRESETS: dict[str, dict[str, Any]] = {
    # `make demo`: digits, class-exclusion shards, FedAvg vs FedAdam vs FedSoup (AME ClientSoup).
    "demo": {
        "base": {"dataset": "digits", "partitioning": "class-exclusion", "ood-fraction": 0.5,
                 "num-partitions": 10, "num-server-rounds": 20, "local-epochs": 2, "seed": 0},
        "strategies": [
            {"strategy": "fedavg", "label": "FedAvg"},
            {"strategy": "fedadam", "label": "FedAdam"},
            {"strategy": "fedsoup", "label": "FedSoup (AME ClientSoup)", **AME_CLIENT_SOUP},
            {"strategy": "fedsoup", "label": "FedSoup (AME ClientSoup + Adam ServerStew)",
             **AME_CLIENT_SOUP, **ADAM_STEW},
        ],
    },
    # The demo's four strategies as client data become more exclusive: every client misses
    # 50..90% of the classes (class-exclusion), 5 seeds, in process (no Ray: 100 short runs).
    "ood-sweep": {
        "base": {"dataset": "digits", "partitioning": "class-exclusion",
                 "num-partitions": 10, "num-server-rounds": 20, "local-epochs": 2},
        "sweep": ("ood-fraction", (0.5, 0.6, 0.7, 0.8, 0.9)),
        "seeds": (0, 1, 2, 3, 4),
        "backend": "inprocess",
        "strategies": [
            {"strategy": "fedavg", "label": "FedAvg"},
            {"strategy": "fedadam", "label": "FedAdam"},
            {"strategy": "fedsoup", "label": "FedSoup (AME ClientSoup)", **AME_CLIENT_SOUP},
            {"strategy": "fedsoup", "label": "FedSoup (AME ClientSoup + Adam ServerStew)",
             **AME_CLIENT_SOUP, **ADAM_STEW},
        ],
        # Paired differences reported per swept value: each FedSoup against the Flower
        # strategy with the same server update (mean vs AME soup; FedAdam vs soup + Adam stew).
        "pairs": (("FedSoup (AME ClientSoup)", "FedAvg"),
                  ("FedSoup (AME ClientSoup + Adam ServerStew)", "FedAdam")),
    },
    # Heavy-tailed Byzantine noise from 20% of the clients.
    "robust": {
        "base": {"dataset": "digits", "partitioning": "dirichlet", "dirichlet-alpha": 1.0,
                 "num-partitions": 10, "num-server-rounds": 20, "local-epochs": 2, "seed": 0,
                 "attack": "cauchy-noise", "attack-fraction": 0.2, "attack-scale": 1.0},
        "strategies": [
            {"strategy": "fedavg", "label": "FedAvg"},
            {"strategy": "fedmedian", "label": "FedMedian"},
            {"strategy": "fedtrimmedavg", "label": "FedTrimmedAvg"},
            {"strategy": "krum", "label": "Krum"},
            {"strategy": "fedsoup", "label": "FedSoup (AME ClientSoup)", **AME_CLIENT_SOUP},
        ],
    },
    # Federated LoRA fine-tuning of a byte-level LM on the standard library's packages, 3 seeds,
    # in process: Flower's FedAvg on the factors (as FlowerTune), FedSoup on the factors with
    # an AME ClientSoup, FedSoup on the products, and the pooled clients trained centrally.
    "lora": {
        "base": LORA_BASE,
        "seeds": (0, 1, 2),
        "backend": "inprocess",
        "strategies": [
            {"strategy": "fedavg", "label": "FedAvg (factors)"},
            {"strategy": "fedsoup", "lora-mode": "factors", "label": "FedSoup factors (AME ClientSoup)",
             **AME_ADAPTER_SOUP},
            {"strategy": "fedsoup", "lora-mode": "products", "label": "FedSoup products"},
            {"strategy": "central", "label": "central (upper reference)"},
        ],
    },
}
