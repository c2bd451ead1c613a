"""`fedsoup merge` in memory: a bar counts the tensors merged (on a terminal only), and merging a
large model in parts of whole tensors is the whole-model merge, bit for bit."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fedsoup
from fedsoup.offline import producers

ADAM = dict(optimizer="adam", epochs=2, batch_size=2, shuffle=True, seed=1)  # lr left to the scale-aware default


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def inputs(tmp_path, n: int = 4) -> list[str]:
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n):
        model = {f"layer{j}.weight": torch.randn(40, 30, generator=g) for j in range(6)}
        model["steps"] = torch.tensor(7)  # an integer buffer: copied, so equal in every input
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file(model, paths[-1])
    return paths


def test_in_memory_merge_in_parts_is_the_whole_model_merge(tmp_path, monkeypatch):
    paths = inputs(tmp_path)
    monkeypatch.setattr(producers, "PART_BYTES", 10_000)  # 4800-byte tensors: parts of 3 tensors
    with fedsoup.io.open_checkpoint(paths[0]) as checkpoint:
        infos = checkpoint.infos
    assert [len(part) for part in producers.model_parts(infos)] == [3, 3, 1]
    calls = []
    real_merge = fedsoup.merge
    monkeypatch.setattr(fedsoup, "merge", lambda *a, **k: calls.append(1) or real_merge(*a, **k))
    report = fedsoup.offline.run_merge_files(paths, tmp_path / "o.safetensors", low_memory=False, **ADAM)
    assert len(calls) == 3
    expected, whole = real_merge([load_file(p) for p in paths], report=True, **ADAM)
    merged = load_file(tmp_path / "o.safetensors")
    assert all(torch.equal(merged[key], expected[key]) for key in expected)
    # the report of the parts is the whole merge's: lr actually used per tensor, steps, path
    assert report.lr == pytest.approx(whole.lr) and report.steps == whole.steps and report.path == whole.path
    with safe_open(tmp_path / "o.safetensors", "pt") as handle:
        recorded = json.loads(handle.metadata()["fedsoup.report"])
    assert recorded["lr"] == pytest.approx(dict(whole.lr)) and recorded["lr_default"] is True
    assert recorded["steps"] == whole.steps and recorded["path"] == whole.path


def test_in_memory_bar_counts_the_merge_only_on_a_terminal(tmp_path, monkeypatch):
    paths = inputs(tmp_path)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    fedsoup.merge_files(paths, tmp_path / "a.safetensors", low_memory=False, progress=True, **ADAM)
    shown = terminal.getvalue()
    assert "\rmerging" in shown and "in memory ..." not in shown  # a bar, where a line was printed
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    fedsoup.merge_files(paths, tmp_path / "b.safetensors", low_memory=False, progress=True, **ADAM)
    assert pipe.getvalue() == ""  # not a terminal: no bar, no line
