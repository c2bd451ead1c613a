"""The language-model task (issue 28): the stdlib corpus, and a reduced ``--preset lora`` in process."""

from __future__ import annotations

import json
import math

import pytest

from simulations.config import SimConfig
from simulations.lm_corpus import CLIENT_GROUPS, CORPUS_FILES, MissingCorpusFile, client_texts, corpus_identity, \
    read_group, stdlib_dir

pytest.importorskip("transformers")
pytest.importorskip("peft")

REDUCED = {"num-partitions": 3, "num-server-rounds": 2, "lm-local-steps": 6, "lm-base-steps": 80,
           "lm-eval-bytes": 2048, "soup-epochs": 2}


def test_every_corpus_file_is_in_this_pythons_stdlib_and_the_identity_is_recorded():
    root = stdlib_dir()
    assert all((root / name).is_file() for names in CORPUS_FILES.values() for name in names)
    identity = corpus_identity()
    assert identity["python"].count(".") == 2 and len(identity["corpus-sha256"]) == 64
    texts = client_texts(len(CLIENT_GROUPS), 0.1)
    assert [t.group for t in texts] == list(CLIENT_GROUPS)
    for text in texts:  # every file's tail is held out: about a tenth, never in the training text
        assert 0.08 < len(text.heldout) / (len(text.train) + len(text.heldout)) < 0.12
        assert text.heldout[-200:] not in text.train


def test_a_missing_corpus_file_is_named_and_the_hash_follows_the_bytes(tmp_path):
    with pytest.raises(MissingCorpusFile) as info:
        read_group("json", 0.1, root=tmp_path)
    assert info.value.path == tmp_path / CORPUS_FILES["json"][0]
    for names in CORPUS_FILES.values():  # a copy of the corpus with one byte changed
        for name in names:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes((stdlib_dir() / name).read_bytes())
    assert corpus_identity(tmp_path) == corpus_identity()
    (tmp_path / "json" / "tool.py").write_bytes(b"#" + (tmp_path / "json" / "tool.py").read_bytes())
    assert corpus_identity(tmp_path)["corpus-sha256"] != corpus_identity()["corpus-sha256"]


@pytest.mark.parametrize("bad, key", [({"strategy": "central"}, "strategy"),
                                      ({"task": "lm", "num-partitions": 7}, "num-partitions"),
                                      ({"task": "lm", "lora-mode": "stacked"}, "lora-mode")])
def test_lm_config_errors_name_their_key(bad, key):
    with pytest.raises(ValueError, match=key):
        cfg = SimConfig.from_run_config(bad)
        from simulations.lm_task import texts_of

        texts_of(cfg)


@pytest.mark.slow
def test_reduced_lora_preset_improves_on_the_base_and_fedavg_is_fedsoup_factors(tmp_path):
    """The preset's four arms (and FedSoup's plain factors mode) on 3 clients, 2 rounds, in process."""
    from simulations.compare.cli import run_seeds
    from simulations.compare.presets import PRESETS
    from simulations.compare.run import StrategyRun

    preset = PRESETS["lora"]
    base = {**preset["base"], **REDUCED, "lm-cache-dir": str(tmp_path / "cache")}
    runs = [StrategyRun(s["label"], {k: v for k, v in s.items() if k != "label"}) for s in preset["strategies"]]
    runs.append(StrategyRun("FedSoup factors (plain)", {"strategy": "fedsoup", "lora-mode": "factors"}))
    (per_seed,) = run_seeds(base, runs, [0], tmp_path / "out", backend="inprocess")
    by_label = {r.label: r.rows for r in per_seed}
    base_ppl = by_label["FedAvg (factors)"][0]["test-perplexity"]
    for label, rows in by_label.items():
        assert rows[0]["test-perplexity"] == pytest.approx(base_ppl)  # one base, one initial adapter
        assert rows[-1]["test-perplexity"] < base_ppl, label
        assert rows[-1]["test-perplexity-worst"] < rows[0]["test-perplexity-worst"], label
    assert by_label["FedAvg (factors)"][-1]["test-perplexity"] < 0.995 * base_ppl
    # Flower's FedAvg on adapter replies = FedSoup's factors mode without soup or stew, round by round.
    for ours, flower in zip(by_label["FedSoup factors (plain)"], by_label["FedAvg (factors)"]):
        for key in [k for k in flower if k.startswith("test-")]:
            assert math.isclose(ours[key], flower[key], rel_tol=1e-6), key
    products = by_label["FedSoup products"][-1]
    assert products["clients-fedsoup-lora-factor-product-error-mean"] >= 0
    assert products["clients-fedsoup-bytes-sent"] > 0 and products["clients-fedsoup-bytes-received"] > 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["corpus"] == corpus_identity()
    assert {"table.md", "results.csv", "perplexity.png"} <= {p.name for p in (tmp_path / "out").iterdir()}


@pytest.mark.slow
def test_quiet_comparison_prints_no_flower_info_lines(tmp_path):
    """--quiet hides Flower's INFO lines also when Flower is first imported after the flag is read
    (importing flwr set its logger back to DEBUG: the in-process backend printed every round)."""
    import subprocess
    import sys

    code = ("import sys; from simulations.compare import main; sys.exit(main(sys.argv[1:]))")
    args = ["--backend", "inprocess", "-q", "--set", "num-partitions=2", "--set", "num-server-rounds=1",
            "--set", "local-epochs=1", "--strategy", "fedavg", "--out", str(tmp_path)]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          cwd=__import__("pathlib").Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "INFO" not in done.stdout + done.stderr, (done.stdout + done.stderr)[:2000]


def test_lm_seed_summary_of_strategies_without_lora_figures():
    """Flower's FedAvg reports no factor/product error: the summary over seeds says so (None)
    instead of failing (statistics.stdev of NaNs raised at the end of a 15-minute preset)."""
    from simulations.compare.lm_report import lm_seeds_table, seeds_summary
    from simulations.compare.run import StrategyRun

    def rows(ppl, error=None):
        extra = {} if error is None else {"clients-fedsoup-lora-factor-product-error-mean": error,
                                          "clients-fedsoup-bytes-sent": 10, "clients-fedsoup-bytes-received": 20}
        return [{"round": 0, "test-perplexity": 9.0, "test-perplexity-worst": 11.0, "test-perplexity-json": 11.0},
                {"round": 1, "test-perplexity": ppl, "test-perplexity-worst": ppl + 1, "test-perplexity-json": ppl + 1,
                 **extra}]

    per_seed = [[StrategyRun("FedAvg", {}, rows(7.0 + s)), StrategyRun("FedSoup", {}, rows(6.0 + s, 0.1 * s))]
                for s in range(3)]
    summary = {entry["label"]: entry for entry in seeds_summary(per_seed)}
    assert summary["FedAvg"]["factor-product-error"] is None and summary["FedAvg"]["bytes"] is None
    assert summary["FedSoup"]["factor-product-error"]["mean"] == pytest.approx(0.1)
    assert summary["FedSoup"]["bytes"]["mean"] == 30
    assert summary["FedAvg"]["perplexity"]["mean"] == pytest.approx(8.0)
    assert summary["FedAvg"]["perplexity"]["std"] == pytest.approx(1.0)
    table = lm_seeds_table(per_seed, [0, 1, 2])
    assert "| FedAvg | 8.000 ± 1.000 | 9.000 ± 1.000 |  |" in table


def test_perplexity_windows_cover_every_file_of_the_held_out_text():
    """A group's held-out text is the tails of all its files one after the other: the evaluated
    windows are spread over all of it (the first version read only the first lm-eval-bytes)."""
    import torch

    from simulations.lm_task import mean_nll

    class PredictsA(torch.nn.Module):  # certain that the next byte is "a"
        def forward(self, input_ids, use_cache=False):
            logits = torch.full((*input_ids.shape, 256), -30.0)
            logits[..., ord("a")] = 30.0
            return type("Out", (), {"logits": logits})()

    text = b"a" * 4000 + b"b" * 4000  # two "files"
    assert mean_nll(PredictsA(), b"a" * 4000, seq_len=64, max_bytes=512) < 1e-6
    assert mean_nll(PredictsA(), text, seq_len=64, max_bytes=512) > 20  # half the windows are in the b's
    assert mean_nll(PredictsA(), text[:130], seq_len=64, max_bytes=512) < 1e-6  # short: every window
