"""The language-model task on a real Flower deployment: ``flwr run .`` with ``task="lm"`` against the
local federation (SuperLink, three SuperNodes and their SuperExecs as processes on loopback).

Two FedSoup rounds of LoRA fine-tuning; the global adapter's held-out perplexity falls, every
round reports the factor/product error and the bytes, and the final adapter loads back with
PEFT's ``PeftModel.from_pretrained`` onto the base.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from simulations import local_federation as lf

from deploy_helpers import NUM_SUPERNODES, stop_federation

pytest.importorskip("peft")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_lm_task_two_fedsoup_rounds_on_a_local_deployment(tmp_path):
    out, cache = tmp_path / "outputs", tmp_path / "lm-cache"
    config = {"task": "lm", "strategy": "fedsoup", "lora-mode": "factors", "num-server-rounds": 2,
              "num-partitions": NUM_SUPERNODES, "lm-local-steps": 5, "lm-base-steps": 60, "lm-eval-bytes": 2048,
              "lr": 0.003, "batch-size": 8, "lm-cache-dir": str(cache), "output-dir": str(out)}
    fed = lf.LocalFederation(tmp_path / "deploy", NUM_SUPERNODES)
    try:
        fed.start()
        start = time.perf_counter()
        run_id, status = fed.run(ROOT, config, timeout=800)
        print(f"\n[deploy lm] 2-round LoRA run on {NUM_SUPERNODES} SuperNodes: {time.perf_counter() - start:.1f}s wall")
        log = fed.run_log(run_id)
    finally:
        stop_federation(fed)
    assert status == lf.FINISHED_OK, log[-3000:]
    record = json.loads((out / "rounds.json").read_text())
    rounds = {row["round"]: row for row in record["rounds"]}
    assert sorted(rounds) == [0, 1, 2]
    assert rounds[2]["test-perplexity"] < rounds[0]["test-perplexity"], rounds
    assert rounds[2]["clients-fedsoup-clients-used"] == NUM_SUPERNODES
    assert rounds[2]["clients-fedsoup-bytes-received"] > 0
    assert "clients-fedsoup-lora-factor-product-error-mean" in rounds[2]
    assert record["corpus"]["corpus-sha256"]

    from peft import PeftModel

    from simulations import lm_task
    from simulations.config import SimConfig

    cfg = SimConfig.from_run_config(config)
    model = PeftModel.from_pretrained(lm_task.base_model(cfg, lm_task.base_state(cfg)),
                                      str(out / "final_adapter"))
    texts = lm_task.texts_of(cfg)
    assert lm_task.evaluate_texts(model, texts, cfg)["test-perplexity"] == pytest.approx(
        rounds[2]["test-perplexity"], rel=1e-5)
