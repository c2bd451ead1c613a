"""Where merged tensors come from: the whole model at once, or tensor by tensor.

Both call :func:`fedsoup.merge` with the same :class:`~fedsoup.MergeOptions` (validated
once, by the driver), so every merge option (and its defaults) means the same in memory,
tensor by tensor, and in Python; both return what the merge reported. A
:class:`~fedsoup.errors.MergeInputError` from the merge names an ingredient; it is
re-raised with that ingredient's file as ``path``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from fedsoup.ball import ball_warning
from fedsoup.errors import MergeInputError, OptionError
from fedsoup.io.checks import check_finite, check_integers_agree
from fedsoup.io.formats import TensorInfo
from fedsoup.io.readers import Checkpoint
from fedsoup.optim import is_elementwise
from fedsoup.options import MergeOptions
from fedsoup.report import MergeReport, counted

__all__ = ["Progress", "choose_low_memory", "low_memory_refusal", "in_memory_producer", "LowMemoryProducer"]

log = logging.getLogger("fedsoup")


class Progress:
    """A tqdm bar on stderr counting tensor bytes; only when asked for and stderr is a terminal."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self._bar = None
        if enabled:
            with contextlib.suppress(ImportError):
                from tqdm import tqdm

                self._bar = tqdm(
                    total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000,
                    file=sys.stderr, dynamic_ncols=True, leave=False,
                    disable=None,  # only on a terminal: logs and pipes get the summary line alone
                )

    def update(self, _key: str, info: TensorInfo) -> None:
        if self._bar is not None:
            self._bar.update(info.nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def memory_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no /proc)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def human_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def low_memory_refusal(options: MergeOptions) -> str | None:
    """Why a tensor-by-tensor merge would differ from the whole-model merge, or ``None``."""
    if options.greedy:
        return "greedy selection scores the whole model after every step"
    if options.project:
        return "the projection ball (project=True) is computed over the whole model"
    if not is_elementwise(options.optimizer_class):
        return f"{options.optimizer_class.__name__} is not element-wise (its update couples coordinates across tensors)"
    return None


def choose_low_memory(requested: bool | None, options: MergeOptions, checkpoints: Sequence[Checkpoint]) -> bool:
    """Honour ``low_memory=True/False``; with ``None`` go tensor by tensor when memory is short."""
    refusal = low_memory_refusal(options)
    if requested is True:
        if refusal:
            raise OptionError("low_memory", True,
                              f"--low-memory merges tensor by tensor, which would change the result: {refusal}")
        return True
    if requested is False:
        return False
    # Inputs plus the merge's own working copies (parameters, gradients, optimizer state).
    needed = 2 * sum(checkpoint.nbytes for checkpoint in checkpoints)
    available = memory_available()
    if available is None or needed <= available:
        return False
    if refusal:
        log.info("the inputs need ~%s in memory and only %s is available, but tensor-by-tensor merging "
                 "is not possible (%s); trying in memory", human_bytes(needed), human_bytes(available), refusal)
        return False
    log.info("the inputs need ~%s in memory and %s is available: merging tensor by tensor (--low-memory)",
             human_bytes(needed), human_bytes(available))
    return True


@contextlib.contextmanager
def _located(names: Sequence[str]):
    """Give a MergeInputError about ingredient i the file it came from (``path``)."""
    try:
        yield
    except MergeInputError as error:
        if error.path is None and error.ingredient is not None and 0 <= error.ingredient < len(names):
            raise error.at(path=names[error.ingredient]) from None
        raise


def _merge(models: list[dict[str, torch.Tensor]], options: MergeOptions, call: dict[str, Any], names: Sequence[str]):
    """``fedsoup.merge(models, options, **call, report=True)``: the options as validated once, by the driver."""
    import fedsoup  # at call time: the package's merge (which tests may replace)

    with _located(names):
        return fedsoup.merge(models, options, report=True, **call)


def _read_pivot(checkpoint: Checkpoint | _Loaded, key: str) -> torch.Tensor:
    # Ingredients need no pass of their own (the merge finds NaN/Inf from its result and
    # names the ingredient); an explicit pivot file is not an ingredient: checked here.
    return check_finite(checkpoint.get(key), checkpoint.name, key)


class LowMemoryProducer:
    """Merge one tensor at a time: each input read lazily, ``fedsoup.merge`` on one-key dicts.

    For element-wise optimizers this is the whole-model merge (same order, seed, weights
    and options, lr=None included; every coordinate's trajectory depends on that
    coordinate only), while peak memory is about N x the largest tensor. Each call's
    :class:`~fedsoup.report.MergeReport` is kept; :meth:`report` joins them, with Prop. 2's
    ball summed over the tensors and checked once, as the in-memory merge checks it.
    """

    def __init__(self, checkpoints: Sequence[Checkpoint | _Loaded], options: MergeOptions, call: dict[str, Any],
                 pivot: Checkpoint | _Loaded | None, names: Sequence[str], describe: str = " (tensor by tensor)") -> None:
        self.checkpoints, self.options, self.call, self.pivot, self.names = checkpoints, options, call, pivot, names
        self.describe = describe
        self.reports: list[MergeReport] = []

    def __call__(self, key: str) -> torch.Tensor:
        return self.merge_part([key])[key]

    def merge_part(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """These tensors merged in one ``fedsoup.merge`` call (a part of the model)."""
        parts = [{key: checkpoint.get(key) for key in keys} for checkpoint in self.checkpoints]
        for key in keys:
            check_integers_agree(key, [part[key] for part in parts], self.names)
        call = {**self.call, "_part": True}
        if self.pivot is not None:
            call["pivot"] = {key: _read_pivot(self.pivot, key) for key in keys}
        merged, report = _merge(parts, self.options, call, self.names)
        self.reports.append(report)
        return merged

    def report(self) -> MergeReport | None:
        """The whole model's report; logs the ball guard's WARNING if it ended outside."""
        if not self.reports:
            return None
        joined = MergeReport.of_parts(self.reports)
        warning = None if joined.ball is None else ball_warning(
            joined.ball, lr_given=self.options.lr is not None,
            describe=f" of {counted(len(self.names), 'input')}{self.describe}")
        if warning is not None:
            log.warning(warning)
            joined = replace(joined, warnings=(*joined.warnings, warning))
        return joined


# An in-memory merge of a larger model runs in parts of at least this many bytes (and at most
# ~100 parts): each fedsoup.merge call costs a few ms, so a small model stays one call.
PART_BYTES = 64 * 2**20
MAX_PARTS = 100


def model_parts(infos: dict[str, TensorInfo]) -> list[list[str]]:
    """The keys in file order, cut into runs of at least ``max(PART_BYTES, total / MAX_PARTS)`` bytes."""
    total = sum(info.nbytes for info in infos.values())
    least = max(PART_BYTES, total / MAX_PARTS)
    parts, current, size = [], [], 0
    for key, info in infos.items():
        current.append(key)
        size += info.nbytes
        if size >= least:
            parts.append(current)
            current, size = [], 0
    if current:
        parts.append(current)
    return parts


class _Loaded:
    """An input already in memory, read as a :class:`Checkpoint` is (``get(key)``, ``keys()``, ``name``)."""

    def __init__(self, tensors: dict[str, torch.Tensor], name: str = "") -> None:
        self.get, self.keys, self.name = tensors.__getitem__, tensors.keys, name


def in_memory_producer(checkpoints: Sequence[Checkpoint], options: MergeOptions, call: dict[str, Any],
                       pivot: Checkpoint | None, names: Sequence[str], progress: bool
                       ) -> tuple[Callable[[str], torch.Tensor], MergeReport]:
    """Load every input and merge it all before anything is written; tensors are then handed out one by one.

    For element-wise optimizers a large model is merged in parts of whole tensors (about
    :data:`PART_BYTES` or a hundredth of the model each, in file order), which is exactly the
    whole-model merge (every coordinate's trajectory is its own, as with ``--low-memory``;
    same bytes) and lets a bar count the tensors merged; a small one is one part. Other
    merges (greedy, projection, optimizers whose update couples tensors) run once over the
    whole model.
    """
    loading = Progress(sum(checkpoint.nbytes for checkpoint in checkpoints), "loading", progress)
    models = []
    try:
        for checkpoint in checkpoints:
            models.append(checkpoint.load_all())  # (safetensors: mapped, read as the merge goes)
            for key, info in checkpoint.infos.items():
                loading.update(key, info)
    finally:
        loading.close()
    if pivot is not None:  # read whole, as the inputs: one mapping of the file, not one per tensor
        pivot = _Loaded(pivot.load_all(), pivot.name)
    whole_model_only = low_memory_refusal(options)
    if whole_model_only is None:
        in_parts = LowMemoryProducer([_Loaded(model) for model in models], options, call, pivot, names, describe="")
        infos = checkpoints[0].infos
        merging = Progress(sum(info.nbytes for info in infos.values()), "merging", progress)
        merged = {}
        try:
            for keys in model_parts(infos):
                merged.update(in_parts.merge_part(keys))
                for key in keys:
                    merging.update(key, infos[key])
        finally:
            merging.close()
        del models
        return merged.pop, in_parts.report() or MergeReport("soup", options.optimizer_class.__name__, options.epochs, 0)
    for key in models[0]:
        check_integers_agree(key, [model[key] for model in models], names)
    call = dict(call)
    if pivot is not None:
        call["pivot"] = {key: _read_pivot(pivot, key) for key in pivot.keys()}
    if progress and sys.stderr.isatty():  # a merge over the whole model at once: nothing to count
        print(f"fedsoup: merging {counted(len(models), 'input')} as one model ({whole_model_only}) ...",
              file=sys.stderr, flush=True)
    merged, report = _merge(models, options, call, names)
    del models
    return merged.pop, report
