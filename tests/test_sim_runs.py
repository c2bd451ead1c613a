"""Run directories (runs never overwrite each other) and the comparison's progress bar."""

from __future__ import annotations

import io
import json

from simulations.compare import RoundProgress, main as compare_main
from simulations.run_dirs import fresh_run_dir, link_latest

TINY = ["--backend", "inprocess", "--set", "num-partitions=3", "--set", "num-server-rounds=1",
        "--set", "local-epochs=1", "--strategy", "fedavg"]


def test_fresh_run_dirs_never_collide_and_latest_follows(tmp_path):
    first = fresh_run_dir(tmp_path / "runs", now=0.0)
    second = fresh_run_dir(tmp_path / "runs", now=0.0)  # the same second: a new directory all the same
    assert first != second and first.is_dir() and second.is_dir()
    assert second.name == f"{first.name}-2"
    assert link_latest(first).resolve() == first.resolve()
    assert link_latest(second).resolve() == second.resolve()
    assert (tmp_path / "runs" / "latest").readlink().name == second.name  # relative: the folder can move


def test_latest_that_is_not_a_link_is_left_alone(tmp_path):
    (tmp_path / "latest").mkdir()
    (tmp_path / "latest" / "mine.txt").write_text("a user's file")
    run = fresh_run_dir(tmp_path)
    assert link_latest(run) is None
    assert (tmp_path / "latest" / "mine.txt").read_text() == "a user's file"


def test_second_comparison_keeps_the_first_and_prints_real_paths(tmp_path, capsys):
    for _ in range(2):
        assert compare_main([*TINY, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    runs = sorted(p for p in tmp_path.iterdir() if p.name != "latest")
    assert len(runs) == 2 and all((run / "results.json").is_file() for run in runs)
    assert (tmp_path / "latest").resolve() == runs[-1].resolve()
    for run in runs:  # every printed path exists as printed
        assert f"writing to {run}" in printed and f"wrote {run}/table.md" in printed
    assert json.loads((runs[0] / "results.json").read_text())["strategies"][0]["label"] == "fedavg"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal_and_never_when_quiet():
    terminal, pipe, quiet = _Terminal(), io.StringIO(), _Terminal()
    for stream, kwargs in ((terminal, {}), (pipe, {}), (quiet, {"quiet": True})):
        bar = RoundProgress(4, file=stream, **kwargs)
        for _ in range(4):
            bar.step()
        bar.close()
    assert "strategy × seed × round" in terminal.getvalue() and "4/4" in terminal.getvalue()
    assert pipe.getvalue() == "" and quiet.getvalue() == ""


def test_comparison_counts_every_round_of_every_strategy(tmp_path, monkeypatch):
    steps = []
    monkeypatch.setattr(RoundProgress, "step", lambda self: steps.append(1))
    args = [*TINY, "--strategy", "fedmedian", "--seeds", "0", "1", "--set", "num-server-rounds=2",
            "--out", str(tmp_path)]
    assert compare_main(args) == 0
    assert len(steps) == 2 * 2 * 2  # strategies × seeds × rounds


class _Records(__import__("logging").Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records = []

    def emit(self, record) -> None:
        self.records.append(record)


def _flower_records(argv):
    import logging

    from flwr.common.logger import FLOWER_LOGGER as flower  # importing flwr sets its level: import it first

    records = _Records()
    level = flower.level
    flower.addHandler(records)
    try:
        assert compare_main(argv) == 0
    finally:
        flower.removeHandler(records)
    assert flower.level == level  # the command leaves Flower's logger as it found it
    return [r.getMessage() for r in records.records if r.levelno >= logging.INFO]


def test_flower_per_round_logs_are_off_by_default_and_on_with_verbose(tmp_path, capsys):
    """`make demo` printed ~1,500 Flower INFO/WARNING lines (per-round metric dumps, "fraction_evaluate
    is set to 0.0" once per strategy) before the table: by default a comparison shows one line per
    strategy and the table; --verbose gives Flower's logs back."""
    default = _flower_records([*TINY, "--out", str(tmp_path / "default")])
    assert default == [], default[:5]
    printed = capsys.readouterr().out
    assert "fedavg: 1 round in " in printed and "final test accuracy" in printed
    # before the silent set-up (a minute or two on Ray), what is coming
    assert "running 1 strategy (1 round in all, inprocess backend; set-up first" in printed, printed
    verbose = _flower_records([*TINY, "--verbose", "--out", str(tmp_path / "verbose")])
    assert any("[ROUND 1/1]" in m for m in verbose) and any("fraction_evaluate" in m for m in verbose)
    capsys.readouterr()
    quiet = _flower_records([*TINY, "--quiet", "--out", str(tmp_path / "quiet")])
    assert quiet == [] and "final test accuracy" not in capsys.readouterr().out


def test_setting_line_counts_agree_with_their_nouns():
    from simulations.compare.report import describe
    from simulations.config import SimConfig

    one = describe(SimConfig.from_run_config({"num-partitions": 1, "local-epochs": 1}))
    assert "1 client," in one and "1 local epoch," in one, one
    two = describe(SimConfig.from_run_config({"num-partitions": 2, "local-epochs": 2}))
    assert "2 clients," in two and "2 local epochs," in two, two
