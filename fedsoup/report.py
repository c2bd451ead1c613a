"""What a merge did: one report type for ``fedsoup.merge(..., report=True)`` and file merges.

A merge decides things the caller may want to know: the path that ran, the learning
rate actually used (the scale-aware default is computed from the inputs), how many
steps, and where the result ended relative to Proposition 2's ball (its distance to the
soup and the ball's radius). :class:`MergeReport` carries all of it back explicitly; no
module state is written during a merge. ``fedsoup merge`` prints it, ``fedsoup.merge_files``
returns it (:func:`fedsoup.offline.run_merge_files`) and writes it beside the output
(docs/cli.md), and the FedSoup strategy logs it and puts its numbers in the round's metrics.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsoup.ball import BallCheck

if TYPE_CHECKING:
    from fedsoup.lora.report import LoraReport

__all__ = ["MergeReport", "counted"]


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """``count`` and ``noun`` in agreement: ``1 input``, ``2 inputs``, ``1,024 tensors``, ``0 differences``."""
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"


@dataclass(frozen=True)
class MergeReport:
    """What one merge did (in memory, or of files).

    Attributes:
        path: the merge path that ran: ``"soup"``, ``"reference"``, ``"fused"``,
            ``"stacked"`` or ``"flat"`` (:data:`fedsoup.plan.PATHS`).
        optimizer: the optimizer's class name (``"Adam"``).
        epochs: passes over the ingredients.
        steps: optimizer steps run (``epochs · ⌈N / batch_size⌉``; 0 for the soup identity).
        lr: ``η_0`` actually used, per floating tensor key (after the scale-aware default
            of :mod:`fedsoup.defaults` where ``lr`` was not given).
        lr_default: ``True`` when ``lr`` came from the scale-aware default.
        ball: Proposition 2's ball, summed over the model (``None`` when not measured: the
            soup identity, or ``project=True``, which keeps the merge inside it).
        warnings: the warnings the merge raised, as logged (e.g. the ball guard's).
        output, files, inputs, tensors, parameters, seconds, low_memory: for a file merge
            (:func:`fedsoup.merge_files`): the output as named, the files written, the
            inputs read, tensor and parameter counts, wall time and whether it ran tensor
            by tensor; empty for an in-memory merge.
        lora: for PEFT LoRA adapters (:mod:`fedsoup.lora`): the mode, the factor/product
            error per module, the SVD's captured energy and the written adapter's config.
    """

    path: str
    optimizer: str
    epochs: int
    steps: int
    lr: Mapping[str, float] = field(default_factory=dict)
    lr_default: bool = False
    ball: BallCheck | None = None
    warnings: tuple[str, ...] = ()
    output: Path | None = None
    files: list[Path] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    tensors: int = 0
    parameters: int = 0
    seconds: float = 0.0
    low_memory: bool = False
    lora: LoraReport | None = None

    @property
    def lr_range(self) -> tuple[float, float] | None:
        """``(min, max)`` of :attr:`lr` over the tensors; ``None`` without floating tensors."""
        values = list(self.lr.values())
        return (min(values), max(values)) if values else None

    @property
    def distance(self) -> float | None:
        """``‖w − s‖``: how far the merge ended from the weighted soup (``None``: not measured)."""
        return None if self.ball is None else self.ball.distance

    @property
    def radius(self) -> float | None:
        """``R = max(max_i ‖x_i − s‖, ‖w_0 − s‖)``, the ball's radius (``None``: not measured)."""
        return None if self.ball is None else self.ball.radius

    @property
    def outside_ball(self) -> bool:
        """``True`` when the merge ended farther from the soup than any ingredient."""
        return self.ball is not None and self.ball.outside()

    def figures(self) -> dict[str, float]:
        """The numeric figures, by name (for metrics: the strategy's round MetricRecord)."""
        figures: dict[str, float] = {"steps": float(self.steps)}
        if self.lr_range is not None:
            figures["lr-min"], figures["lr-max"] = self.lr_range
            figures["lr-median"] = float(statistics.median(self.lr.values()))
        if self.ball is not None:
            figures["soup-distance"], figures["ball-radius"] = self.distance, self.radius
        return figures

    def describe(self) -> str:
        """One line: path, learning rate(s), steps, the ball; for the soup identity, what it is."""
        if self.path == "soup":  # one weighted mean, not an optimizer's epoch of steps
            return "soup: the weighted mean"
        parts = [f"{self.path} path", f"{self.optimizer}, {counted(self.steps, 'step')}"]
        if self.lr:
            parts.append(self._describe_lr())
        if self.ball is not None:
            parts.append(f"{self.distance:.4g} from the soup, ball radius {self.radius:.4g}"
                         + (" (OUTSIDE)" if self.outside_ball else ""))
        return ", ".join(parts)

    def _describe_lr(self) -> str:
        """``lr 0.001``, ``lr 1e-05..0.001 per tensor``; a scale-aware default's zeros apart: they are
        the tensors identical in every input (``ρ_t = 0``, nothing to move; fedsoup.defaults)."""
        values = list(self.lr.values())
        identical = sum(1 for value in values if value == 0) if self.lr_default else 0
        moved = [value for value in values if value != 0] if identical else values
        if not moved:
            return "lr 0 (scale-aware default: every input identical)"
        low, high = min(moved), max(moved)
        text = f"lr {low:.3g}" if f"{low:.3g}" == f"{high:.3g}" else f"lr {low:.3g}..{high:.3g} per tensor"
        notes = ["scale-aware default"] if self.lr_default else []
        if identical:
            notes.append(f"0 on {counted(identical, 'tensor')} identical in every input")
        return text + (f" ({'; '.join(notes)})" if notes else "")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly record (the output's ``fedsoup.report`` metadata or sidecar file)."""
        record: dict[str, Any] = {
            "path": self.path, "optimizer": self.optimizer, "epochs": self.epochs, "steps": self.steps,
            "lr": dict(self.lr), "lr_default": self.lr_default, "warnings": list(self.warnings),
        }
        if self.ball is not None:
            record.update(soup_distance=self.distance, ball_radius=self.radius, outside_ball=self.outside_ball)
        if self.lora is not None:
            record.update(self.lora.describe())
        return {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
                for key, value in record.items()}

    @staticmethod
    def of_parts(parts: Iterable[MergeReport], warnings: Iterable[str] = ()) -> MergeReport:
        """One report for a model merged in parts (tensor by tensor): learning rates joined,
        the ball summed over the parts (the same ball as a whole-model merge)."""
        parts = list(parts)
        first = parts[0]
        lr: dict[str, float] = {}
        ball = None
        for part in parts:
            lr.update(part.lr)
            if part.ball is not None:
                ball = BallCheck() if ball is None else ball
                ball.extend(part.ball)
        paths = sorted({part.path for part in parts})
        return replace(first, path="+".join(paths), lr=lr, ball=ball,
                       warnings=tuple(w for part in parts for w in part.warnings) + tuple(warnings))
