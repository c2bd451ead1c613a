"""One validated options type for every way of asking for a merge.

:class:`MergeOptions` holds the options of :func:`fedsoup.merge` (docs/design.md §2) and the
optimizer's constructor arguments. The same type sits behind ``fedsoup.merge``,
``fedsoup.merge_files``, the ``fedsoup merge`` flags and ``--config`` files, and the
Flower strategy's ``soup=`` dict; :class:`OptimizerOptions` behind its ``stew=`` dict.
Building one validates everything that does not need the models, so a bad option
fails before any tensor is read:

- an unknown name raises :class:`~fedsoup.errors.UnknownOptionError` with the closest
  valid name (``unknown option 'shufle'; did you mean 'shuffle'?``); an optimizer
  argument is checked against the chosen optimizer's constructor signature
  (``'beta'`` -> ``'betas'`` for Adam);
- a bad value raises :class:`~fedsoup.errors.OptionError` naming the option; an
  optimizer's arguments are checked by :data:`~fedsoup.optimizer_args.OPTIMIZER_CHECKS`
  (:mod:`fedsoup.optimizer_args`), one table of the
  ``torch.optim`` constructors' own value checks (a test proves they agree for every
  optimizer of :data:`fedsoup.OPTIMIZERS`), without building an optimizer (the first
  ``torch.optim`` construction in a process costs about a second of imports); an
  optimizer class of the caller's own is built once, on an empty tensor, instead.

Options say *how* to merge. *What* is merged in one call (the models, their ``weights``,
the ``order_by`` scores, a pivot state dict, a per-call ``seed``, the ``dtype`` written) are arguments of
:func:`fedsoup.merge` itself (:data:`CALL_INPUTS`), checked cheaply on every call.
Validation happens once, here: ``fedsoup.merge(models, options)`` trusts ``options``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedsoup.errors import OptionError, UnknownOptionError, closest_name
from fedsoup.optim import resolve_optimizer
from fedsoup.optimizer_args import (  # noqa: F401 - OPTIMIZER_CHECKS, check_optimizer_values: re-exported
    OPTIMIZER_CHECKS,
    SET_BY_MERGE,
    check_optimizer_kwargs,
    check_optimizer_values,
    optimizer_arguments,
    optimizer_settings,
)
from fedsoup.schedules import SCHEDULES

__all__ = ["MergeOptions", "OptimizerOptions", "optimizer_arguments", "CALL_INPUTS",
           "OPTIMIZER_CHECKS", "check_optimizer_values"]

# How PEFT LoRA adapters are merged (fedsoup.lora): their updates s·B·A, or A and B apart.
LORA_MODES = ("products", "factors")

# What one ``fedsoup.merge`` call merges (its arguments, not options); ``pivot`` is one as a
# state dict (as "soup", "first" or an index it is the option), ``seed`` overrides the option.
CALL_INPUTS = ("weights", "order_by", "pivot", "seed", "dtype", "adapter_config")
_NOT_OPTIONS = {
    "weights": "weights are an input of the call: fedsoup.merge(models, options, weights=...)",
    "order_by": "order_by scores are an input of the call: fedsoup.merge(models, options, order_by=...)",
    "dtype": "the dtype written is an argument of the call: fedsoup.merge(models, options, dtype=...)",
}


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _real(name: str, value: Any, *, minimum: float | None = None) -> float:
    if not _is_real(value) or not math.isfinite(float(value)):
        raise OptionError(name, value, f"option {name!r} must be a finite number, got {value!r}")
    if minimum is not None and float(value) < minimum:
        raise OptionError(name, value, f"option {name!r} must be >= {minimum:g}, got {value!r}")
    return float(value)


def _integer(name: str, value: Any, *, minimum: int | None = None) -> int:
    if not _is_int(value):
        raise OptionError(name, value, f"option {name!r} must be an integer, got {value!r}")
    if minimum is not None and int(value) < minimum:
        raise OptionError(name, value, f"option {name!r} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise OptionError(name, value, f"option {name!r} must be true or false, got {value!r}")
    return bool(value)


@dataclass(frozen=True)
class MergeOptions:
    """How to merge: the options of :func:`fedsoup.merge`, validated once, on construction.

    The one list of merge options: ``fedsoup.merge``'s keywords, the ``fedsoup merge``
    flags and ``--config`` keys, the strategy's ``soup=`` dict and the metadata written
    next to an output are derived from (or tested against) these fields. Build it from
    keywords as ``fedsoup.merge`` takes them (names that are not merge options are the
    optimizer's arguments): ``MergeOptions.from_kwargs(optimizer="adam", lr=1e-3,
    betas=(0.9, 0.99))``, or from a dict (a config file, a ``soup=`` dict) with
    :meth:`from_dict`; then ``fedsoup.merge(models, options, weights=...)`` as often as
    needed, with no validation again. ``dataclasses.replace(options, ...)`` validates again.

    ``optimizer_class`` and ``optimizer_settings`` (every constructor argument, defaults
    filled in) are resolved here, once.
    """

    optimizer: str | type[torch.optim.Optimizer] = "sgd"
    lr: float | Mapping[str, float] | None = None  # None: the merge's default (1.0 for SGD); or one per key
    schedule: str | Callable[[int], float] = "harmonic"
    alpha: float = -1.1
    epochs: int = 1
    batch_size: int = 1
    shuffle: bool = False
    seed: int = 0  # of the shuffling; fedsoup.merge(..., seed=) overrides it for one call
    pivot: str | int = "soup"  # the rule: "soup", "first" or an ingredient index (a state dict: merge's pivot=)
    adaptive_pivot: bool = True
    amplification: float | Callable[[int], float] = 1.0
    descending: bool = True
    greedy: bool = False
    evaluate: Callable[[dict[str, torch.Tensor]], float] | None = None
    project: bool = False
    device: str | torch.device | None = None
    # PEFT LoRA adapters (fedsoup.lora): merge the updates s·B·A ("products") or A and B apart
    # ("factors"); None: plain tensors for fedsoup.merge, "products" for adapter files (docs/api.md).
    lora: str | None = None
    lora_rank: int | None = None  # "products": the rank written, by a truncated SVD; None: exact (rank Σ r_i)
    optimizer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    optimizer_class: type[torch.optim.Optimizer] = field(init=False, repr=False, compare=False)
    optimizer_settings: Mapping[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        """Every check that does not need the models (the only place MergeOptions are validated)."""
        set_ = self._normalise
        cls = resolve_optimizer(self.optimizer)
        if isinstance(self.lr, Mapping):  # one lr per floating tensor key (keys checked by the merge)
            set_("lr", {str(key): _real(f"lr[{key!r}]", value, minimum=0.0) for key, value in self.lr.items()})
        elif self.lr is not None:
            set_("lr", _real("lr", self.lr, minimum=0.0))
        if not callable(self.schedule):
            if not isinstance(self.schedule, str) or self.schedule not in SCHEDULES:
                raise OptionError(
                    "schedule", self.schedule,
                    f"unknown schedule {self.schedule!r} (use {', '.join(SCHEDULES)} or a callable k -> lr)",
                    suggestion=closest_name(str(self.schedule), SCHEDULES),
                )
        set_("alpha", _real("alpha", self.alpha))
        set_("epochs", _integer("epochs", self.epochs, minimum=1))
        set_("batch_size", _integer("batch_size", self.batch_size, minimum=1))
        set_("seed", _integer("seed", self.seed))
        for name in ("shuffle", "adaptive_pivot", "descending", "greedy", "project"):
            set_(name, _flag(name, getattr(self, name)))
        self._check_pivot()
        if not callable(self.amplification):
            set_("amplification", _real("amplification", self.amplification))
        if self.evaluate is not None and not callable(self.evaluate):
            raise OptionError("evaluate", self.evaluate, f"evaluate must be a callable state_dict -> score, got {self.evaluate!r}")
        if self.greedy and self.evaluate is None:
            raise OptionError("evaluate", None, "greedy=True needs an evaluate(state_dict) -> float callback")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as error:
                raise OptionError("device", self.device, f"invalid device {self.device!r} ({error})") from None
        self._check_lora()
        if not isinstance(self.optimizer_kwargs, Mapping):
            raise OptionError("optimizer_kwargs", self.optimizer_kwargs, "optimizer_kwargs must be a mapping")
        set_("optimizer_kwargs", check_optimizer_kwargs(cls, self.optimizer_kwargs, _MERGE_FIELDS))
        set_("optimizer_class", cls)
        set_("optimizer_settings", optimizer_settings(cls, self.optimizer_kwargs))

    def _check_lora(self) -> None:
        if self.lora is not None and self.lora not in LORA_MODES:
            raise OptionError("lora", self.lora, f"unknown LoRA mode {self.lora!r} (use {' or '.join(LORA_MODES)})",
                              suggestion=closest_name(str(self.lora), LORA_MODES))
        if self.lora_rank is not None:
            self._normalise("lora_rank", _integer("lora_rank", self.lora_rank, minimum=1))
            if self.lora == "factors":
                raise OptionError("lora_rank", self.lora_rank, "option 'lora_rank' applies to the 'products' mode "
                                  "only (the 'factors' mode keeps the adapters' rank)")

    def _normalise(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # (frozen: only while validating)

    def _check_pivot(self) -> None:
        pivot = self.pivot
        if isinstance(pivot, str):
            if pivot not in ("soup", "first"):
                raise OptionError("pivot", pivot, f"unknown pivot {pivot!r} (use 'soup', 'first', an ingredient "
                                  "index or a state dict)", suggestion=closest_name(pivot, ("soup", "first")))
        elif isinstance(pivot, Mapping):
            raise OptionError("pivot", "state dict", "a pivot state dict is an input of the call, not an option: "
                              "fedsoup.merge(models, options, pivot=state_dict)")
        elif not _is_int(pivot):
            raise OptionError("pivot", pivot, f"pivot must be 'soup', 'first', an index or a state dict, got {pivot!r}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> MergeOptions:
        """From ``fedsoup.merge``'s keywords: merge options by name, everything else the optimizer's."""
        return cls.from_dict(kwargs)

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any], *, reserved: Mapping[str, str] | None = None,
                  also_valid: Sequence[str] = ()) -> MergeOptions:
        """From a dict of settings (a config file, FedSoup's ``soup=``).

        An ``optimizer_kwargs`` entry is a nested dict of optimizer arguments; any other
        key that is not a merge option is taken as an optimizer argument too (and
        refused, with the closest name, if the optimizer does not take it). ``reserved``
        maps keys the caller sets itself to the reason, e.g. ``{"weights": "FedSoup
        weighs clients by num-examples"}``: they raise :class:`OptionError`. ``also_valid``
        names the caller's own settings, offered as suggestions for a misspelt key.
        """
        if not isinstance(settings, Mapping):
            raise OptionError("options", settings, f"options must be a mapping of names to values, got {type(settings).__name__}")
        named: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in settings.items():
            key = str(key)
            if reserved and key in reserved:
                raise OptionError(key, value, f"option {key!r} cannot be set here: {reserved[key]}")
            if key in _NOT_OPTIONS:
                raise OptionError(key, value, _NOT_OPTIONS[key])
            if key == "optimizer_kwargs":
                if not isinstance(value, Mapping):
                    raise OptionError(key, value, "optimizer_kwargs must be a mapping of optimizer arguments")
                extra.update({str(k): v for k, v in value.items()})
            elif key in _MERGE_FIELDS:
                named[key] = value
            else:
                extra[key] = value
        if also_valid and extra:
            cls_ = resolve_optimizer(named.get("optimizer", "sgd"))
            accepted = optimizer_arguments(cls_)
            for key in extra:
                if accepted is not None and key not in accepted and key not in SET_BY_MERGE:
                    raise UnknownOptionError(key, [*_MERGE_FIELDS, *also_valid, *accepted],
                                             optimizer=cls_.__name__, optimizer_arguments=accepted)
        return cls(**named, optimizer_kwargs=extra)

    def to_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``fedsoup.merge(models, **options.to_kwargs())``.

        ``lr`` and ``device`` are left out when ``None``: the merge's own defaults apply.
        (``fedsoup.merge(models, options)`` takes the options themselves, unvalidated again.)
        """
        kwargs = {name: getattr(self, name) for name in _MERGE_FIELDS}
        for name in ("lr", "device"):
            if kwargs[name] is None:
                del kwargs[name]
        return {**kwargs, **self.optimizer_kwargs}

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly record of the settings (for file metadata); tensors and callables by name."""
        record = {}
        for name in (*_MERGE_FIELDS, "optimizer_kwargs"):
            value = getattr(self, name)
            if name == "optimizer_kwargs":
                record.update({k: _jsonable(v) for k, v in value.items()})
                continue
            record[name] = _jsonable(value)
        return record


_MERGE_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(MergeOptions) if f.init and f.name != "optimizer_kwargs")


@dataclass(frozen=True)
class OptimizerOptions:
    """An optimizer with its learning rate and constructor arguments (FedSoup's ``stew=``).

    ``OptimizerOptions.from_dict({"optimizer": "fedadam", "lr": 0.1, "betas": (0.9, 0.99)})``;
    unknown arguments are refused with the closest name, as for :class:`MergeOptions`.
    """

    optimizer: str | type[torch.optim.Optimizer] = "sgd"
    lr: float = 1.0
    optimizer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    optimizer_class: type[torch.optim.Optimizer] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        """The only place OptimizerOptions are validated (values by :data:`OPTIMIZER_CHECKS`)."""
        cls = resolve_optimizer(self.optimizer)
        object.__setattr__(self, "lr", _real("lr", self.lr, minimum=0.0))
        if not isinstance(self.optimizer_kwargs, Mapping):
            raise OptionError("optimizer_kwargs", self.optimizer_kwargs, "optimizer_kwargs must be a mapping")
        kwargs = check_optimizer_kwargs(cls, self.optimizer_kwargs, ("optimizer", "lr"))
        optimizer_settings(cls, kwargs)
        object.__setattr__(self, "optimizer_kwargs", kwargs)
        object.__setattr__(self, "optimizer_class", cls)

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any] | None) -> OptimizerOptions:
        """``{"optimizer": ..., "lr": ..., **constructor arguments}``; ``None`` is plain SGD with lr 1."""
        settings = dict(settings or {})
        optimizer = settings.pop("optimizer", "sgd")
        lr = settings.pop("lr", 1.0)
        nested = settings.pop("optimizer_kwargs", {})
        if not isinstance(nested, Mapping):
            raise OptionError("optimizer_kwargs", nested, "optimizer_kwargs must be a mapping of optimizer arguments")
        return cls(optimizer=optimizer, lr=lr, optimizer_kwargs={**settings, **nested})


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if callable(value):
        return getattr(value, "__qualname__", repr(value))
    return str(value)
