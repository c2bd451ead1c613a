"""The lr actually used (the scale-aware default included), the merge path and the steps are
recorded with every merged file and in FedSoup's per-round metrics and log line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fedsoup

ADAM = dict(optimizer="adam", epochs=2, batch_size=2)  # lr left to the scale-aware default


def models(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"w": torch.randn(5, 4, generator=g), "b": torch.randn(5, generator=g) * 10} for _ in range(n)]


def expected_report():
    return fedsoup.merge(models(), report=True, **ADAM)[1]


@pytest.mark.parametrize("output, low_memory, where", [
    ("o.safetensors", False, "header"),
    ("o.safetensors", True, "sidecar"),
    ("o.pt", False, "sidecar"),
    ("o.pt", True, "sidecar"),
])
def test_every_output_records_the_lr_used_path_and_steps(tmp_path, output, low_memory, where):
    inputs = []
    for i, model in enumerate(models()):
        inputs.append(str(tmp_path / f"in{i}.safetensors"))
        save_file(model, inputs[-1])
    fedsoup.merge_files(inputs, tmp_path / output, low_memory=low_memory, **ADAM)
    if where == "header":
        with safe_open(tmp_path / output, "pt") as handle:
            recorded = json.loads(handle.metadata()["fedsoup.report"])
    else:
        recorded = json.loads((tmp_path / f"{output}.fedsoup.json").read_text())
    want = expected_report()
    assert recorded["lr_default"] is True and set(recorded["lr"]) == {"w", "b"}
    assert recorded["lr"] == pytest.approx(dict(want.lr))  # the values used, never null
    assert len(set(recorded["lr"].values())) == 2  # per tensor: the two spreads differ
    assert recorded["path"] == want.path and recorded["steps"] == want.steps == 4


def test_strategy_round_metrics_and_log_line_carry_the_lr_used(caplog):
    from flwr.app import Array, ArrayRecord
    from strategies import FedSoup
    from strategies.inprocess import InProcessGrid, reply, serverapp_identity, train_content

    def client(message):
        node = message.metadata.dst_node_id
        arrays = {k: (models()[node % 3][k].numpy() + 0.0) for k in ("w", "b")}
        return reply(message, train_content(arrays, num_examples=10))

    initial = ArrayRecord({k: Array(np.zeros(v.shape, dtype=np.float32)) for k, v in models()[0].items()})
    with serverapp_identity(), caplog.at_level("INFO", logger="flwr"):
        result = FedSoup(soup=ADAM).start(InProcessGrid([0, 1, 2], client), initial, num_rounds=1)
    metrics = result.train_metrics_clientapp[1]
    low, median, high = (metrics[f"fedsoup-merge-lr-{name}"] for name in ("min", "median", "max"))
    assert 0 < low <= median <= high and low < high  # the scale-aware lr of each tensor
    assert metrics["fedsoup-merge-steps"] == 4
    line = next(r.getMessage() for r in caplog.records if "ClientSoup merge:" in r.getMessage())
    assert "path" in line and "4 steps" in line and "lr " in line and "scale-aware default" in line
