"""Typed errors: each carries its culprit as attributes, so callers never parse messages.

- :class:`MergeInputError` (a ``ValueError``): bad data (an ingredient, a tensor, a file).
- :class:`OptionError` (a ``ValueError``): a bad option value; :class:`UnknownOptionError`
  (also a ``TypeError``, as Python raises for an unexpected keyword) an option name that
  does not exist, with the closest valid name.
- :class:`StateError` (a ``ValueError``): a saved state or checkpoint that cannot be
  restored (a strategy's ``load_state_dict``, a checkpoint directory), naming the file and
  the tensor or entry where known.
- :class:`OutputExistsError` (a ``FileExistsError``): the output is there and ``force`` is off.
- :class:`OutputError` (an ``OSError``): an output cannot be written (permission, full
  disk, read-only file system, a folder or link in the way, a file the merge reads, even
  with ``force``), naming the output file.
- :class:`CheckpointError` (a :class:`StateError`): a training checkpoint is damaged or
  incomplete (a checksum mismatch, tensor files without their ``state.json``).

The command line exits with status 2 on any of them (1 on anything else).
"""

from __future__ import annotations

import difflib
import errno as errnos
import os
from collections.abc import Iterable

__all__ = [
    "MergeInputError", "OptionError", "UnknownOptionError", "StateError", "CheckpointError", "OutputExistsError",
    "OutputError", "MergeWarning", "closest_name", "os_reason",
]


class MergeInputError(ValueError):
    """Bad input data: the message names the file (or ingredient) and tensor.

    Attributes:
        reason: what is wrong, without the location (``"contains NaN or Inf values"``).
        ingredient: index of the ingredient in the given list, or ``None``.
        key: tensor name, or ``None``.
        path: file (as the user spelled it), or ``None``.
        field: the configuration field at fault (``"use_dora"`` of an ``adapter_config.json``),
            or ``None``.
    """

    def __init__(self, reason: str, *, ingredient: int | None = None, key: str | None = None,
                 path: str | None = None, field: str | None = None) -> None:
        self.reason = reason
        self.ingredient = ingredient
        self.key = key
        self.path = None if path is None else str(path)
        self.field = field
        super().__init__(self._message())

    def _message(self) -> str:
        where = []
        if self.path is not None:
            where.append(self.path)
        elif self.ingredient is not None:
            where.append(f"ingredient {self.ingredient}")
        if self.key is not None:
            where.append(f"tensor {self.key!r}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        return f"{', '.join(where)}: {self.reason}" if where else self.reason

    def __str__(self) -> str:
        return self._message()

    def at(self, *, path: str | None = None, ingredient: int | None = None) -> MergeInputError:
        """A copy located at ``path``/``ingredient`` (where they were unknown)."""
        return MergeInputError(
            self.reason,
            ingredient=self.ingredient if ingredient is None else ingredient,
            key=self.key,
            path=self.path if path is None else path,
            field=self.field,
        )

    def __reduce__(self):  # keyword-only arguments: pickle (multiprocessing, Ray) needs help
        return _rebuild_input_error, (self.reason, self.ingredient, self.key, self.path, self.field)


def _rebuild_input_error(reason, ingredient, key, path, field=None) -> MergeInputError:
    return MergeInputError(reason, ingredient=ingredient, key=key, path=path, field=field)


class OptionError(ValueError):
    """A bad option value (``epochs=0``, ``optimizer="adamm"``, a weight list of the wrong length).

    Attributes:
        option: the option's name (``"epochs"``).
        value: the value given.
        suggestion: the closest valid value where one applies (``"adam"``), else ``None``.
    """

    def __init__(self, option: str, value: object, reason: str, *, suggestion: str | None = None) -> None:
        self.option = option
        self.value = value
        self.reason = reason
        self.suggestion = suggestion
        hint = f"; did you mean {suggestion!r}?" if suggestion is not None else ""
        super().__init__(f"{reason}{hint}")

    def __reduce__(self):
        return _rebuild_option_error, (self.option, self.value, self.reason, self.suggestion)


def _rebuild_option_error(option, value, reason, suggestion) -> OptionError:
    return OptionError(option, value, reason, suggestion=suggestion)


class UnknownOptionError(OptionError, TypeError):
    """An option name that is neither a merge option nor an argument of the chosen optimizer.

    Attributes:
        option: the name given (``"shufle"``).
        suggestion: the closest valid name (``"shuffle"``), or ``None``.
        owner: the optimizer class name when the suggestion is one of its constructor
            arguments, else ``None``.
        optimizer: the chosen optimizer's class name (``None`` where no optimizer applies).
        choices: every valid name.
    """

    def __init__(self, option: str, choices: Iterable[str], *, optimizer: str | None = None,
                 optimizer_arguments: Iterable[str] = (), what: str = "option") -> None:
        self.choices = tuple(sorted(set(choices)))
        self.optimizer = optimizer
        suggestion = closest_name(option, self.choices)
        self.owner = optimizer if suggestion is not None and suggestion in set(optimizer_arguments) else None
        reason = f"unknown {what} {option!r}"
        if suggestion is None and optimizer is not None:
            reason += f": neither a merge option nor an argument of {optimizer}"
        message = reason
        if suggestion is not None:
            owned = f" (an argument of {self.owner})" if self.owner else ""
            message += f"; did you mean {suggestion!r}{owned}?"
        ValueError.__init__(self, message)
        self.option, self.value, self.reason, self.suggestion = option, option, reason, suggestion
        self._arguments = tuple(optimizer_arguments)
        self._what = what

    def __reduce__(self):
        return _rebuild_unknown_option, (self.option, self.choices, self.optimizer, self._arguments, self._what)


def _rebuild_unknown_option(option, choices, optimizer, arguments, what) -> UnknownOptionError:
    return UnknownOptionError(option, choices, optimizer=optimizer, optimizer_arguments=arguments, what=what)


class StateError(ValueError):
    """A saved state that cannot be restored: not a FedSoup state, another optimizer's, or
    arrays that do not match the model they are restored into.

    The message names the key by what it is (``what``, given by whoever raises it): an
    ``"entry"`` of a state (``format``, ``optimizer``, ``opt/hook``: the default, true of
    anything in a state), an ``"array"`` of a model, or a ``"tensor"`` of a checkpoint file.

    Attributes:
        reason: what is wrong, without the location.
        path: the file (or checkpoint directory), or ``None`` for an in-memory state dict.
        key: the tensor or entry at fault, or ``None``.
    """

    def __init__(self, reason: str, *, path: str | None = None, key: str | None = None, what: str = "entry") -> None:
        self.reason = reason
        self.path = None if path is None else str(path)
        self.key = key
        self._what = what
        where = [part for part in (self.path, None if key is None else f"{what} {key!r}") if part is not None]
        super().__init__(f"{', '.join(where)}: {reason}" if where else reason)

    def at(self, path: str) -> StateError:
        """A copy located at ``path`` (where it was unknown)."""
        return StateError(self.reason, path=path if self.path is None else self.path, key=self.key, what=self._what)

    def because(self, reason: str) -> StateError:
        """A copy with another ``reason``, at the same place."""
        return StateError(reason, path=self.path, key=self.key, what=self._what)

    def __reduce__(self):
        return _rebuild_state_error, (self.reason, self.path, self.key, self._what)


def _rebuild_state_error(reason, path, key, what="entry") -> StateError:
    return StateError(reason, path=path, key=key, what=what)


class OutputExistsError(FileExistsError):
    """The output already exists and overwriting was not asked for (``force=True``/``--force``).

    Attributes:
        path: the output as given.
    """

    def __init__(self, path: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: output exists (use --force / force=True to overwrite)")

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):
        return OutputExistsError, (self.path,)


# What an OSError means, in words a user acts on (the rest: the system's own strerror).
_OS_REASONS = {
    errnos.EACCES: "permission denied",
    errnos.EPERM: "operation not permitted",
    errnos.ENOSPC: "no space left on device",
    errnos.EDQUOT: "disk quota exceeded",
    errnos.EROFS: "read-only file system",
    errnos.ENOENT: "no such file or directory",
    errnos.EISDIR: "is a directory",
    errnos.ENOTDIR: "a parent is not a directory",
    errnos.EFBIG: "file too large",
    errnos.EIO: "input/output error",
}


def os_reason(error: BaseException) -> str:
    """``"permission denied"``, ``"no space left on device"``...: an OSError's cause without its path."""
    code = getattr(error, "errno", None)
    if code in _OS_REASONS:
        return _OS_REASONS[code]
    if code is not None:
        return os.strerror(code).lower()
    return " ".join(str(error).split()) or type(error).__name__


class OutputError(OSError):
    """An output file cannot be written; nothing was left behind.

    Attributes:
        path: the output file (never the hidden temporary file it was written to).
        cause: the ``OSError`` (``errno`` tells permission, full disk...), or ``None``
            when the reason is not an OS error (a folder where the file should go).
        reason: what happened, in words (``"no space left on device"``).
    """

    def __init__(self, path: str | os.PathLike[str], cause: OSError | None = None, *, reason: str | None = None) -> None:
        self.path = os.fspath(path)
        self.cause = cause
        self.reason = reason if reason is not None else os_reason(cause)
        super().__init__(getattr(cause, "errno", None), self.reason)
        self.filename = self.path

    def __str__(self) -> str:
        return f"{self.path}: cannot write: {self.reason}"

    def __reduce__(self):
        return _rebuild_output_error, (self.path, self.cause, self.reason)


def _rebuild_output_error(path, cause, reason) -> OutputError:
    return OutputError(path, cause, reason=reason)


class CheckpointError(StateError):
    """A training checkpoint (``state.json`` plus its tensor file) cannot be used: a checksum
    mismatch, tensor files without their ``state.json``, an unreadable or foreign file.

    Attributes (those of :class:`StateError`, plus):
        path: the file at fault (the tensor file of a checksum mismatch, the missing
            ``state.json``...).
        tensor: the tensor's name inside the checkpoint where one is at fault, else ``None``
            (the same as ``key``).
    """

    def __init__(self, path: str | os.PathLike[str], reason: str, *, tensor: str | None = None) -> None:
        super().__init__(reason, path=os.fspath(path), key=tensor, what="tensor")

    @property
    def tensor(self) -> str | None:
        return self.key

    def at(self, path: str) -> CheckpointError:
        return CheckpointError(self.path or path, self.reason, tensor=self.key)

    def because(self, reason: str) -> CheckpointError:
        return CheckpointError(self.path, reason, tensor=self.key)

    def __reduce__(self):
        return _rebuild_checkpoint_error, (self.path, self.reason, self.key)


def _rebuild_checkpoint_error(path, reason, tensor) -> CheckpointError:
    return CheckpointError(path, reason, tensor=tensor)


def closest_name(name: str, choices: Iterable[str]) -> str | None:
    """The valid name closest to a misspelt ``name`` (``difflib``'s ratio ≥ 0.6), or ``None``."""
    matches = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


class MergeWarning(UserWarning):
    """Something the merge decided for the user that they may want to decide themselves
    (which dtype mixed inputs are written in, which of several differing configs is kept).
    The command line prints these as ``fedsoup: warning: ...``."""
