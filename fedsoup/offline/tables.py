"""Settings and metrics files of an offline merge.

- :func:`load_config`: a TOML/JSON/YAML file of ``fedsoup merge`` settings (the
  :class:`~fedsoup.options.MergeOptions` names, optimizer arguments, and the file
  settings of :func:`fedsoup.merge_files`), relative paths resolved against the file.
- :func:`load_metrics` / :func:`per_input_values`: one row of numbers per input, so
  that ``weights``/``order_by`` can name a column (``num_examples``, ``val_acc``).
- :func:`import_object`: ``module:Name`` or ``file.py:Name`` (an optimizer class or an
  ``evaluate`` callback named in a config or on the command line).
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsoup.errors import MergeInputError, OptionError
from fedsoup.io.formats import one_line
from fedsoup.io.readers import refuse_special_file
from fedsoup.report import counted

__all__ = ["FILE_SETTINGS", "load_config", "load_metrics", "per_input_values", "import_object", "normalise_key"]

# Settings of a file merge that are not merge options (merge_files' own arguments).
FILE_SETTINGS = ("inputs", "output", "metrics", "shard_size", "low_memory", "force", "device", "dtype", "copy_config",
                 "base")
# Metrics-file columns that name the checkpoint a row belongs to.
ID_COLUMNS = ("file", "path", "input", "model", "name", "checkpoint", "client")


def normalise_key(key: Any) -> str:
    """``"batch-size"`` -> ``"batch_size"`` (config files may use either)."""
    return str(key).strip().replace("-", "_")


def _read_text(path: Path, what: str) -> str:
    """The file's text; a named pipe or device is refused unopened (opening a pipe blocks,
    reading ``/dev/zero`` never ends), as an input is."""
    refuse_special_file(path, str(path))
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise MergeInputError(f"cannot read {what} ({error.strerror or error})", path=str(path)) from None


def _parse(path: Path, text: str) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        return tomllib.loads(text)
    if suffix == ".json":
        return json.loads(text)
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError:
            raise MergeInputError("YAML configs need PyYAML (pip install pyyaml); or use TOML", path=str(path)) from None
        return yaml.safe_load(text) or {}
    raise MergeInputError(f"unknown config format {suffix!r}; use .toml, .json or .yaml", path=str(path))


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a config of ``fedsoup merge`` settings: a flat table, keys in snake or kebab case.

    Returns the settings with normalised keys; values are checked where they are used
    (:class:`~fedsoup.options.MergeOptions`, :func:`fedsoup.merge_files`), so an unknown
    key is refused there with the closest valid name. Relative ``inputs``, ``output``,
    ``metrics``, a checkpoint ``pivot`` and a ``file.py:name`` ``evaluate`` are taken
    relative to the config file; lists become tuples (``betas = [0.9, 0.99]``).
    """
    path = Path(path)
    text = _read_text(path, "config")
    try:
        data = _parse(path, text)
    except MergeInputError:
        raise
    except Exception as error:  # each parser has its own error type
        raise MergeInputError(f"invalid config ({one_line(error)})", path=str(path)) from None
    if not isinstance(data, dict):
        raise MergeInputError("a config must be a table of settings", path=str(path))
    config = {normalise_key(key): value for key, value in data.items()}
    base = path.parent
    if "inputs" in config:
        inputs = config["inputs"]
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(item, str) for item in inputs):
            raise OptionError("inputs", inputs, f"{path}: 'inputs' must be a list of paths")
        config["inputs"] = [str(base / item) for item in inputs]
    for key in ("output", "metrics"):
        if key in config:
            if not isinstance(config[key], str):
                raise OptionError(key, config[key], f"{path}: {key!r} must be a path")
            config[key] = str(base / config[key])
    pivot = config.get("pivot")
    if isinstance(pivot, str) and pivot not in ("soup", "first") and not re.fullmatch(r"-?\d+", pivot):
        config["pivot"] = str(base / pivot)
    evaluate = config.get("evaluate")
    if isinstance(evaluate, str) and ".py:" in evaluate:
        config["evaluate"] = str(base / evaluate)
    nested = config.get("optimizer_kwargs")
    if nested is not None:
        if not isinstance(nested, dict):
            raise OptionError("optimizer_kwargs", nested, f"{path}: 'optimizer_kwargs' must be a table")
        config["optimizer_kwargs"] = {normalise_key(k): v for k, v in nested.items()}
    return {key: _tuples(value) if key not in ("inputs", "weights", "order_by") else value
            for key, value in config.items()}


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def load_metrics(path: str | os.PathLike[str], inputs: Sequence[str]) -> list[dict[str, float]]:
    """One row of numbers per input from a CSV or JSON metrics file.

    Rows are matched to inputs by a ``file``/``path``/``model``/``name``/``client``
    column (the input as given, its file name, its stem or its run folder) or, without
    such a column, by position. JSON: a list of row objects, or ``{input: {metric: value}}``.
    """
    path = Path(path)
    name = str(path)
    text = _read_text(path, "metrics")
    shape_error = MergeInputError("expected {input: {metric: value}} or a list of rows", path=name)
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
            if isinstance(data, dict):
                rows = [{"file": key, **values} for key, values in data.items() if isinstance(values, dict)]
                if len(rows) != len(data):
                    raise shape_error
            elif isinstance(data, list) and all(isinstance(row, dict) for row in data):
                rows = data
            else:
                raise shape_error
        else:
            rows = list(csv.DictReader(text.splitlines()))
    except (ValueError, csv.Error) as error:
        if isinstance(error, MergeInputError):
            raise
        raise MergeInputError(f"invalid metrics file ({one_line(error)})", path=name) from None
    if not rows:
        raise MergeInputError("no rows", path=name)
    id_column = next((c for c in ID_COLUMNS if c in rows[0]), None)
    if id_column is None:
        if len(rows) != len(inputs):
            raise MergeInputError(
                f"{counted(len(rows), 'row')} for {counted(len(inputs), 'input')}, and no "
                f"{'/'.join(ID_COLUMNS[:4])} column to match them by name", path=name,
            )
        ordered = rows
    else:
        # A row may name its input by path, file name, stem or (for runs/<name>/model.pt)
        # folder; a name shared by several rows identifies none of them.
        by_alias: dict[str, list[int]] = {}
        for number, row in enumerate(rows):
            for alias in _aliases(str(row.get(id_column, "")).strip()):
                by_alias.setdefault(alias, []).append(number)
        ordered = []
        for index, item in enumerate(inputs):
            matches = [by_alias[a] for a in _aliases(item) if len(by_alias.get(a, ())) == 1]
            if not matches:
                raise MergeInputError(f"no row (column {id_column!r}) identifies input {item}",
                                      ingredient=index, path=name)
            ordered.append(rows[matches[0][0]])
    result = []
    for row in ordered:
        numbers = {}
        for column, value in row.items():
            if column == id_column:
                continue
            with contextlib.suppress(TypeError, ValueError):
                numbers[str(column)] = float(value)
        result.append(numbers)
    return result


def _stem(path: str) -> str:
    name = Path(path.rstrip("/")).name
    for suffix in (".safetensors.index.json", ".index.json"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _aliases(path: str) -> list[str]:
    """Names a metrics row may use for an input, most specific first."""
    if not path:
        return []
    trimmed = path.rstrip("/")
    candidates = [path, trimmed, os.path.normpath(trimmed), Path(trimmed).name, _stem(trimmed), Path(trimmed).parent.name]
    return [alias for alias in dict.fromkeys(candidates) if alias not in ("", ".", "..")]


def per_input_values(option: str, value: Any, inputs: Sequence[str], metrics: str | None) -> list[float] | None:
    """Weights or scores for ``inputs``: N numbers, or the name of a ``metrics`` column."""
    if value is None:
        return None
    if isinstance(value, str):
        if metrics is None:
            raise OptionError(option, value, f"{option} {value!r}: naming a column needs a metrics file (--metrics FILE)")
        numbers = []
        for index, (item, row) in enumerate(zip(inputs, load_metrics(metrics, inputs))):
            if value not in row:
                raise MergeInputError(f"no number in column {value!r} for input {item}", ingredient=index, path=metrics)
            numbers.append(row[value])
        value = numbers
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise OptionError(option, value, f"{option}: expected one number per input, got {value!r}")
    if len(value) != len(inputs):
        raise OptionError(option, value, f"{option}: {counted(len(value), 'value')} for {counted(len(inputs), 'input')}")
    return [float(v) for v in value]


def import_object(spec: str, option: str) -> Any:
    """``package.module:attr``, ``package.module.Attr`` or ``path/to/file.py:attr``."""
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise OptionError(option, spec, f"{option} {spec!r}: expected MODULE:NAME or path/to/file.py:NAME")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            try:
                refuse_special_file(file, str(file))
            except MergeInputError as error:  # an option's value, not an input: refused as the option
                raise OptionError(option, spec, f"{option} {spec!r}: {error}") from None
            if not file.is_file():
                raise OptionError(option, spec, f"{option} {spec!r}: {file} does not exist")
            loader_spec = importlib.util.spec_from_file_location(file.stem, file)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as error:
        raise OptionError(option, spec, f"{option} {spec!r}: {error}") from None
