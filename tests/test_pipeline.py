"""One merge pipeline: options validated once → a plan → one path → a report (issue 23)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fedsoup
from fedsoup import cli
from fedsoup.errors import OptionError
from fedsoup.options import OPTIMIZER_CHECKS, MergeOptions, OptimizerOptions, check_optimizer_values
from fedsoup.report import MergeReport

ROOT = Path(__file__).resolve().parent.parent


def models(n=3, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(8, 5, generator=g) * scale, "b": torch.randn(8, generator=g) * scale,
             "steps": torch.tensor(3)} for _ in range(n)]


def checkpoints(tmp_path, n=3):
    paths = [str(tmp_path / f"m{i}.safetensors") for i in range(n)]
    for path, model in zip(paths, models(n)):
        save_file(model, path)
    return paths


@pytest.fixture
def validations(monkeypatch):
    """Counts MergeOptions and OptimizerOptions validations."""
    counts = {"merge": 0, "optimizer": 0}
    for cls, name in ((MergeOptions, "merge"), (OptimizerOptions, "optimizer")):
        original = cls._validate

        def counted(self, original=original, name=name):
            counts[name] += 1
            return original(self)

        monkeypatch.setattr(cls, "_validate", counted)
    return counts


# --------------------------------------------------------------------------- validated once


def test_a_merge_validates_its_options_once(validations):
    fedsoup.merge(models(), optimizer="adam", lr=1e-3, epochs=2, betas=(0.9, 0.99))
    assert validations["merge"] == 1
    options = MergeOptions(optimizer="adam", lr=1e-3)
    validations["merge"] = 0
    for seed in range(3):
        fedsoup.merge(models(seed=seed), options, weights=[1, 2, 3], seed=seed)
    assert validations["merge"] == 0


@pytest.mark.parametrize("low_memory", [False, True])
def test_a_file_merge_validates_its_options_once(tmp_path, validations, low_memory):
    fedsoup.merge_files(checkpoints(tmp_path), tmp_path / "o.safetensors", optimizer="adam", lr=1e-3,
                        weights=[1, 2, 3], low_memory=low_memory)
    assert validations["merge"] == 1


def test_the_strategy_validates_once_and_a_round_validates_nothing(validations):
    pytest.importorskip("flwr")
    from strategies import FedSoup
    from strategies.replies import UsableReply  # noqa: F401 - the strategy's own module loads

    strategy = FedSoup(soup={"optimizer": "adam", "lr": 0.01}, stew={"optimizer": "fedadam", "lr": 0.1})
    assert validations == {"merge": 1, "optimizer": 1}
    replies = _usable_replies()
    strategy.client_soup.merge(replies, 1, None)
    strategy.client_soup.merge(replies, 2, None)
    assert validations == {"merge": 1, "optimizer": 1}


def _usable_replies():
    from strategies.replies import UsableReply

    fields = {f.name for f in dataclasses.fields(UsableReply)}
    replies = []
    for i, model in enumerate(models()):
        values = {"arrays": model, "weight": 1.0 + i, "score": None, "label": f"node {i}", "content": None,
                  "node_id": i, "tie": i}
        replies.append(UsableReply(**{k: v for k, v in values.items() if k in fields}))
    return replies


# --------------------------------------------------------------------------- one table of optimizer checks

SCALARS = [-1.0, -1e-12, 0.0, 0.5, 1.0, 2.0, float("nan"), "x"]
VALUES = {
    "betas": [(0.9, 0.999), (0.0, 0.0), (1.0, 0.9), (-0.1, 0.9), (0.9, 1.0), (0.9, -1e-9), ("a", 0.9)],
    "etas": [(0.5, 1.2), (0.0, 1.2), (0.5, 1.0), (1.0, 2.0), (0.3, 5.0)],
}


def _constructor_rejects(cls, kwargs) -> bool:
    try:
        cls([torch.zeros(2, requires_grad=True)], lr=0.1, **kwargs)
    except (ValueError, TypeError, RuntimeError):
        return True
    return False


def _table_rejects(cls, kwargs) -> bool:
    parameters = inspect.signature(cls.__init__).parameters.values()
    settings = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    settings.update(kwargs)
    try:
        check_optimizer_values(cls, settings)
    except OptionError:
        return True
    return False


def _cases(cls):
    names = set(inspect.signature(cls.__init__).parameters)
    for name in sorted(names & set(OPTIMIZER_CHECKS)):
        for value in VALUES.get(name, SCALARS):
            yield {name: value}
    if "nesterov" in names:
        yield from ({"nesterov": True}, {"nesterov": True, "momentum": 0.9},
                    {"nesterov": True, "momentum": 0.9, "dampening": 0.1})
    if {"fused", "foreach"} <= names:
        yield from ({"fused": True, "foreach": True}, {"fused": True}, {"foreach": True})
    if {"fused", "differentiable"} <= names:
        yield {"fused": True, "differentiable": True}


@pytest.mark.parametrize("name", sorted(fedsoup.OPTIMIZERS))
def test_the_table_of_checks_agrees_with_every_constructor(name):
    cls = fedsoup.OPTIMIZERS[name]
    cases = list(_cases(cls))
    assert cases, f"{name}: nothing checked"
    for kwargs in cases:
        if _table_rejects(cls, kwargs) and not _constructor_rejects(cls, kwargs):
            # the one deliberate difference: NaN, which SGD's `momentum < 0` lets through
            assert cls is torch.optim.SGD and any(v != v for v in kwargs.values() if isinstance(v, float)), kwargs
            continue
        assert _table_rejects(cls, kwargs) == _constructor_rejects(cls, kwargs), (name, kwargs)


def test_option_values_fail_at_construction_not_in_a_round():
    with pytest.raises(OptionError) as info:
        MergeOptions(optimizer="adam", optimizer_kwargs={"betas": (0.9, 1.5)})
    assert info.value.option == "betas"
    with pytest.raises(OptionError):
        OptimizerOptions("fedadam", 0.1, {"eps": -1.0})


def test_a_class_of_the_callers_own_is_checked_by_its_constructor():
    class Mine(torch.optim.SGD):
        def __init__(self, params, lr=0.1, strength=1.0):
            if strength < 0:
                raise ValueError("invalid strength")
            super().__init__(params, lr=lr)

    assert MergeOptions(optimizer=Mine, optimizer_kwargs={"strength": 2.0}).optimizer_class is Mine
    with pytest.raises(OptionError, match="invalid strength"):
        MergeOptions(optimizer=Mine, optimizer_kwargs={"strength": -1.0})


# --------------------------------------------------------------------------- one list of options


def _merge_flags() -> set[str]:
    parser = cli.build_parser()
    merge = next(a for a in parser._actions if a.dest == "command").choices["merge"]
    return {action.dest for action in merge._actions}


def test_every_merge_option_has_a_flag_and_a_docs_row():
    fields = [f.name for f in dataclasses.fields(MergeOptions) if f.init]
    assert set(fields) - {"optimizer_kwargs"} <= _merge_flags()  # (optimizer_kwargs: --opt KEY=VALUE)
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    missing = [name for name in fields if not re.search(rf"`{name}`", api)]
    assert missing == []


# --------------------------------------------------------------------------- the report


def test_report_says_what_the_merge_did():
    merged, report = fedsoup.merge(models(), optimizer="adam", epochs=2, report=True)
    assert isinstance(report, MergeReport) and report is not None
    assert report.path in ("fused", "stacked", "flat") and report.optimizer == "Adam"
    assert report.steps == 6 and report.epochs == 2 and report.lr_default
    assert set(report.lr) == {"w", "b"} and all(v > 0 for v in report.lr.values())
    assert report.warnings == () and not report.outside_ball
    soup = fedsoup.soup(models())
    expected = float(torch.sqrt(sum(torch.sum((merged[k].double() - soup[k].double()) ** 2) for k in ("w", "b"))))
    assert report.distance == pytest.approx(expected, rel=1e-4)
    farthest = max(float(torch.sqrt(sum(torch.sum((m[k].double() - soup[k].double()) ** 2) for k in ("w", "b"))))
                   for m in models())
    assert report.radius == pytest.approx(farthest, rel=1e-4)
    same = fedsoup.merge(models(), optimizer="adam", epochs=2)
    assert all(torch.equal(same[k], merged[k]) for k in merged)  # report=True changes nothing


def test_report_of_the_soup_and_of_a_given_lr():
    _, report = fedsoup.merge(models(), report=True)
    assert (report.path, report.steps, report.ball, dict(report.lr)) == ("soup", 0, None, {"w": 1.0, "b": 1.0})
    _, report = fedsoup.merge(models(), optimizer="sgd", lr={"w": 0.5, "b": 0.25}, schedule="constant", report=True)
    assert dict(report.lr) == {"w": 0.5, "b": 0.25} and not report.lr_default and report.lr_range == (0.25, 0.5)


def test_report_steps_count_the_path_run_even_a_forced_one():
    n = len(models())
    # The soup's options forced onto the loop run (and report) Algorithm 1's N steps ...
    _, report = fedsoup.merge(models(), report=True, _path="reference")
    assert (report.path, report.steps) == ("reference", n)
    # ... and options that do not reduce to the soup, forced onto the soup, report none.
    _, report = fedsoup.merge(models(), optimizer="adam", epochs=2, batch_size=2, report=True, _path="soup")
    assert (report.path, report.steps) == ("soup", 0)
    _, report = fedsoup.merge(models(), optimizer="adam", epochs=2, batch_size=2, report=True)
    assert report.steps == 2 * -(-n // 2)


def test_the_ball_warning_is_in_the_report_and_logged_once(caplog):
    with caplog.at_level(logging.WARNING, logger="fedsoup"):
        _, report = fedsoup.merge(models(), optimizer="adam", lr=10.0, schedule="constant", epochs=5, report=True)
    assert report.outside_ball and len(report.warnings) == 1
    assert [r.getMessage() for r in caplog.records if r.name == "fedsoup"] == list(report.warnings)


@pytest.mark.parametrize("low_memory", [False, True])
def test_file_merge_report_and_where_it_is_written(tmp_path, low_memory):
    inputs = checkpoints(tmp_path)
    out = tmp_path / "o.safetensors"
    report = fedsoup.offline.run_merge_files(inputs, out, optimizer="adam", epochs=2, low_memory=low_memory)
    _, in_memory = fedsoup.merge([{k: v for k, v in m.items()} for m in models()], optimizer="adam", epochs=2,
                                 report=True)
    assert report.low_memory is low_memory and report.output == out and report.tensors == 3
    assert report.lr == pytest.approx(in_memory.lr) and report.steps == in_memory.steps
    assert report.distance == pytest.approx(in_memory.distance, rel=1e-5)
    assert report.radius == pytest.approx(in_memory.radius, rel=1e-5)
    sidecar = tmp_path / "o.safetensors.fedsoup.json"
    with safe_open(out, "pt") as handle:
        header = handle.metadata()
    if low_memory:  # the header was written before the merge ended: the report is beside it
        assert "fedsoup.report" not in header and sidecar in report.files
        written = json.loads(sidecar.read_text())
    else:
        assert not sidecar.exists()
        written = json.loads(header["fedsoup.report"])
    assert written == report.to_dict()
    # the sidecar is the program's own output: refused without --force, replaced with it
    if low_memory:
        out.unlink()
        with pytest.raises(fedsoup.OutputExistsError):
            fedsoup.merge_files(inputs, out, optimizer="adam", low_memory=True)
        fedsoup.merge_files(inputs, out, optimizer="adam", low_memory=True, force=True)


def test_low_memory_warns_once_for_the_whole_model(tmp_path, caplog):
    inputs = checkpoints(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedsoup"):
        report = fedsoup.offline.run_merge_files(inputs, tmp_path / "o.safetensors", optimizer="adam", lr=10.0,
                                                 schedule="constant", epochs=5, low_memory=True)
    warnings = [r.getMessage() for r in caplog.records if r.name == "fedsoup"]
    assert len(warnings) == 1 and "tensor by tensor" in warnings[0] and report.warnings == tuple(warnings)


def test_no_hidden_state_in_the_merge_modules():
    # No ContextVar, and nothing at module level written during a merge.
    for path in (ROOT / "fedsoup").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "ContextVar" not in text and "contextvars" not in text, path
        assert not re.search(r"^\s*global\s", text, re.M), path


def test_strategy_round_metrics_carry_the_report():
    pytest.importorskip("flwr")
    from strategies import FedSoup

    strategy = FedSoup(soup={"optimizer": "adam", "epochs": 2})
    result = strategy.client_soup.merge(_usable_replies(), 1, None)
    assert result.report.path in ("fused", "stacked", "flat") and result.report.steps == 6
    assert result.ame_distance == pytest.approx(result.report.distance)
    figures = result.report.figures()
    assert set(figures) == {"steps", "lr-min", "lr-median", "lr-max", "soup-distance", "ball-radius"}
    assert all(isinstance(v, float) and np.isfinite(v) for v in figures.values())


def test_a_file_merge_reports_the_merge_warnings_it_raised(tmp_path):
    paths = checkpoints(tmp_path)
    model = models()[1]
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.items()}, paths[1])
    with pytest.warns(fedsoup.MergeWarning, match="float dtypes differ") as shown:
        report = fedsoup.offline.run_merge_files(paths, tmp_path / "o.safetensors")
    assert len(shown) == 1 and report.warnings == (str(shown[0].message),)


@pytest.mark.parametrize(("low_memory", "output"), [(False, "o.safetensors"), (True, "o.safetensors"), (False, "o.pt")],
                         ids=["in-memory-header", "low-memory-sidecar", "pt-sidecar"])
def test_the_written_report_holds_the_merge_warnings(tmp_path, low_memory, output):
    paths = checkpoints(tmp_path)
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in models()[1].items()}, paths[1])
    out = tmp_path / output
    with pytest.warns(fedsoup.MergeWarning, match="float dtypes differ") as shown:
        report = fedsoup.offline.run_merge_files(paths, out, optimizer="adam", lr=10.0, schedule="constant", epochs=5,
                                                 low_memory=low_memory)
    # the MergeWarning first, then the ball guard's warning of the merge itself
    assert report.warnings[0] == str(shown[0].message) and len(report.warnings) == 2
    sidecar = out.with_name(out.name + ".fedsoup.json")
    if sidecar.exists():
        written = json.loads(sidecar.read_text())
    else:
        with safe_open(out, "pt") as handle:
            written = json.loads(handle.metadata()["fedsoup.report"])
    assert written["warnings"] == list(report.warnings)
    assert written == report.to_dict()
