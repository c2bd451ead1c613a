"""``fedsoup merge`` and ``fedsoup inspect``: offline merging of checkpoint files (SPEC §4).

A thin layer over :func:`fedsoup.merge` and :mod:`fedsoup.io`::

    fedsoup merge clients/*.safetensors -o merged.safetensors --optimizer adam --lr 1e-3 \\
        --epochs 15 --batch-size 2 --shuffle --seed 0
    fedsoup merge a.pt b.pt c.pt -o soup.safetensors --config merge.toml --low-memory
    fedsoup inspect a.safetensors b.pt

Options come from defaults, then a ``--config`` file (TOML, JSON or YAML), then flags.
Exit status: 0 success, 2 bad input (one line naming the file and tensor), 1 anything
unexpected. No partial output is ever left behind (every file is written atomically).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import importlib
import importlib.util
import inspect as pyinspect
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

import fedsoup
from fedsoup.io import (
    Checkpoint,
    InputError,
    OutputLayout,
    TensorInfo,
    check_compatible,
    check_finite,
    differences,
    expand_inputs,
    open_checkpoint,
    output_exists,
    parse_size,
    save_checkpoint,
)

PROG = "fedsoup"
DEFAULT_SHARD_SIZE = "5GB"  # as Hugging Face's save_pretrained

# fedsoup.merge's keyword options and defaults, read from its signature so the CLI
# can never drift from the library.
MERGE_DEFAULTS: dict[str, object] = {
    name: parameter.default
    for name, parameter in pyinspect.signature(fedsoup.merge).parameters.items()
    if parameter.kind is pyinspect.Parameter.KEYWORD_ONLY
}
# Settings of the command itself (also allowed in a config file).
COMMAND_KEYS = ("inputs", "output", "metrics", "shard_size", "low_memory", "optimizer_kwargs")
CONFIG_KEYS = frozenset(MERGE_DEFAULTS) | frozenset(COMMAND_KEYS)
# Value types a config may give (others, e.g. weights or pivot, are checked when used).
_CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "lr": (int, float), "alpha": (int, float), "amplification": (int, float),
    "epochs": (int,), "batch_size": (int,), "seed": (int,),
    "shuffle": (bool,), "adaptive_pivot": (bool,), "descending": (bool,), "greedy": (bool,), "project": (bool,),
    "low_memory": (bool,), "optimizer": (str,), "schedule": (str,), "evaluate": (str,),
    "shard_size": (int, str),
}
# Metrics-file columns that name the checkpoint a row belongs to.
ID_COLUMNS = ("file", "path", "input", "model", "name", "checkpoint", "client")


# --------------------------------------------------------------------------- values


def _literal(text: str):
    """``"0.9,0.99"`` -> (0.9, 0.99); ``"1e-3"`` -> 0.001; ``"true"`` -> True; else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if "," in text:
        return tuple(_literal(part) for part in text.split(",") if part.strip())
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text
    return tuple(value) if isinstance(value, list) else value


def _number_list(text: str) -> list[float] | None:
    """``"3,1,2"`` -> [3.0, 1.0, 2.0]; ``None`` when ``text`` is not a list of numbers."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        return None
    return values


def _optimizer_kwarg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip().replace("-", "_"), _literal(value)


def _normalise_key(key: str) -> str:
    return str(key).strip().replace("-", "_")


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return str(value)


# --------------------------------------------------------------------------- config


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"{path}: cannot read {what} ({error.strerror or error})") from None


def load_config(path: str | os.PathLike[str]) -> dict[str, object]:
    """Read a TOML/JSON/YAML config of ``fedsoup merge`` settings; unknown keys are refused.

    Keys are the ``fedsoup.merge`` options (``optimizer``, ``lr``, ``epochs``...), an
    ``optimizer_kwargs`` table, and ``inputs``, ``output``, ``metrics``, ``shard_size``,
    ``low_memory``. Relative paths are taken relative to the config file.
    """
    path = Path(path)
    name = str(path)
    text = _read_text(path, "config")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ModuleNotFoundError:
                raise InputError(f"{name}: YAML configs need PyYAML (pip install pyyaml); or use TOML") from None
            data = yaml.safe_load(text) or {}
        else:
            raise InputError(f"{name}: unknown config format {suffix!r}; use .toml, .json or .yaml")
    except InputError:
        raise
    except Exception as error:  # each parser has its own error type
        raise InputError(f"{name}: invalid config ({' '.join(str(error).split())})") from None
    if not isinstance(data, dict):
        raise InputError(f"{name}: a config must be a table of settings")
    config: dict[str, object] = {}
    for raw_key, value in data.items():
        key = _normalise_key(raw_key)
        if key not in CONFIG_KEYS:
            raise InputError(
                f"{name}: unknown setting {raw_key!r} (known: {', '.join(sorted(CONFIG_KEYS))}; "
                f"optimizer arguments go under [optimizer_kwargs])"
            )
        config[key] = value
    for key, value in config.items():
        expected = _CONFIG_TYPES.get(key)
        if expected and not (isinstance(value, expected) and not (isinstance(value, bool) and bool not in expected)):
            kinds = " or ".join(t.__name__ for t in expected)
            raise InputError(f"{name}: {key!r} must be {kinds}, got {value!r}")
    base = path.parent
    if "inputs" in config:
        inputs = config["inputs"]
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(item, str) for item in inputs):
            raise InputError(f"{name}: 'inputs' must be a list of paths")
        config["inputs"] = [str(base / item) for item in inputs]
    for key in ("output", "metrics"):
        if key in config:
            if not isinstance(config[key], str):
                raise InputError(f"{name}: {key!r} must be a path")
            config[key] = str(base / config[key])
    pivot = config.get("pivot")
    if isinstance(pivot, str) and pivot not in ("soup", "first") and not re.fullmatch(r"-?\d+", pivot):
        config["pivot"] = str(base / pivot)
    evaluate = config.get("evaluate")
    if isinstance(evaluate, str) and ".py:" in evaluate:
        config["evaluate"] = str(base / evaluate)
    kwargs = config.get("optimizer_kwargs", {})
    if not isinstance(kwargs, dict):
        raise InputError(f"{name}: 'optimizer_kwargs' must be a table")
    config["optimizer_kwargs"] = {
        _normalise_key(k): tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()
    }
    return config


# --------------------------------------------------------------------------- metrics


def load_metrics(path: str | os.PathLike[str], inputs: Sequence[str]) -> list[dict[str, float]]:
    """One row of numbers per input from a CSV or JSON metrics file.

    Rows are matched to inputs by a ``file``/``path``/``model``/``name``/``client``
    column (the input as given, its file name or its stem) or, without such a column,
    by position. JSON: a list of row objects, or ``{input: {metric: value}}``.
    """
    path = Path(path)
    name = str(path)
    text = _read_text(path, "metrics")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
            if isinstance(data, dict):
                rows = [{"file": key, **values} for key, values in data.items() if isinstance(values, dict)]
                if len(rows) != len(data):
                    raise InputError(f"{name}: expected {{input: {{metric: value}}}} or a list of rows")
            elif isinstance(data, list) and all(isinstance(row, dict) for row in data):
                rows = data
            else:
                raise InputError(f"{name}: expected {{input: {{metric: value}}}} or a list of rows")
        else:
            rows = list(csv.DictReader(text.splitlines()))
    except InputError:
        raise
    except (ValueError, csv.Error) as error:
        raise InputError(f"{name}: invalid metrics file ({' '.join(str(error).split())})") from None
    if not rows:
        raise InputError(f"{name}: no rows")
    id_column = next((c for c in ID_COLUMNS if c in rows[0]), None)
    if id_column is None:
        if len(rows) != len(inputs):
            raise InputError(
                f"{name}: {len(rows)} rows for {len(inputs)} inputs, and no "
                f"{'/'.join(ID_COLUMNS[:4])} column to match them by name"
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
        for item in inputs:
            matches = [by_alias[a] for a in _aliases(item) if len(by_alias.get(a, ())) == 1]
            if not matches:
                raise InputError(f"{name}: no row (column {id_column!r}) identifies input {item}")
            ordered.append(rows[matches[0][0]])
    result = []
    for item, row in zip(inputs, ordered):
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


def _per_input_values(
    option: str, value, inputs: Sequence[str], metrics_path: str | None
) -> list[float] | None:
    """Weights or scores: a list of N numbers, or the name of a metrics-file column."""
    if value is None:
        return None
    if isinstance(value, str):
        numbers = _number_list(value)
        if numbers is None:
            if metrics_path is None:
                raise InputError(f"--{option.replace('_', '-')} {value!r}: not numbers; naming a column needs --metrics FILE")
            rows = load_metrics(metrics_path, inputs)
            numbers = []
            for item, row in zip(inputs, rows):
                if value not in row:
                    raise InputError(f"{metrics_path}: no number in column {value!r} for input {item}")
                numbers.append(row[value])
        value = numbers
    if isinstance(value, (int, float)):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) for v in value):
        raise InputError(f"{option}: expected one number per input, got {value!r}")
    if len(value) != len(inputs):
        raise InputError(f"{option}: {len(value)} values for {len(inputs)} inputs")
    return [float(v) for v in value]


# --------------------------------------------------------------------------- plumbing


def _import_object(spec: str, what: str):
    """``package.module:attr``, ``package.module.Attr`` or ``path/to/file.py:attr``."""
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise InputError(f"{what} {spec!r}: expected MODULE:NAME or path/to/file.py:NAME")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise InputError(f"{what} {spec!r}: {file} does not exist")
            loader_spec = importlib.util.spec_from_file_location(file.stem, file)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
        return getattr(module, attr)
    except InputError:
        raise
    except (ImportError, AttributeError) as error:
        raise InputError(f"{what} {spec!r}: {error}") from None


def _resolve_optimizer(value):
    if isinstance(value, str) and value.lower() not in fedsoup.OPTIMIZERS and ("." in value or ":" in value):
        value = _import_object(value, "--optimizer")
    try:
        return fedsoup.resolve_optimizer(value)
    except ValueError as error:
        raise InputError(str(error)) from None


def _memory_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no /proc)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _human_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


class _Progress:
    """A tqdm bar on stderr counting tensor bytes; off with --quiet or when stderr is not a terminal."""

    def __init__(self, total: int, desc: str, quiet: bool):
        self._bar = None
        if not quiet:
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


def _note(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"{PROG}: {message}", file=sys.stderr)


@contextlib.contextmanager
def _named_ingredients(names: Sequence[str]):
    """Turn fedsoup.merge's ``ingredient 3`` into ``ingredient 3 (c.safetensors)``."""
    try:
        yield
    except InputError:
        raise
    except ValueError as error:
        def name_it(match: re.Match) -> str:
            index = int(match.group(1))
            return f"{match.group(0)} ({names[index]})" if 0 <= index < len(names) else match.group(0)

        raise InputError(re.sub(r"ingredient (\d+)", name_it, " ".join(str(error).split()))) from None


# --------------------------------------------------------------------------- merge


def resolve_settings(args: argparse.Namespace) -> dict[str, object]:
    """Defaults, then the config file, then the flags given on the command line."""
    config = load_config(args.config) if getattr(args, "config", None) else {}
    settings: dict[str, object] = dict(MERGE_DEFAULTS)
    settings.update(
        inputs=[], output=None, metrics=None, shard_size=DEFAULT_SHARD_SIZE, low_memory=None, optimizer_kwargs={}
    )
    settings.update({k: v for k, v in config.items() if k != "optimizer_kwargs"})
    optimizer_kwargs = dict(config.get("optimizer_kwargs", {}))
    flags = vars(args)
    for key in (*MERGE_DEFAULTS, "output", "metrics", "shard_size", "low_memory"):
        if key in flags:
            settings[key] = flags[key]
    if flags.get("inputs"):
        settings["inputs"] = flags["inputs"]
    for key, value in flags.get("optimizer_kwargs") or []:
        optimizer_kwargs[key] = value
    for key in ("momentum", "betas", "eps", "weight_decay"):
        if key in flags:
            optimizer_kwargs[key] = flags[key]
    settings["optimizer_kwargs"] = optimizer_kwargs
    return settings


def _pivot_setting(value):
    """``soup``/``first``, an ingredient index, or a path to a checkpoint (the explicit w_0)."""
    if isinstance(value, bool):
        raise InputError(f"pivot: expected soup, first, an index or a checkpoint path, got {value!r}")
    if isinstance(value, int) or value in ("soup", "first"):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    if isinstance(value, str):
        return open_checkpoint(value)
    raise InputError(f"pivot: expected soup, first, an index or a checkpoint path, got {value!r}")


def run_merge(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    settings = resolve_settings(args)
    quiet = bool(args.quiet)
    if not settings["output"]:
        raise InputError("no output: give -o OUTPUT (or 'output' in the config)")
    output = str(settings["output"])
    layout = OutputLayout.of(output)
    if output_exists(output) and not args.force:
        raise InputError(f"{output}: output exists (use --force to overwrite)")
    input_names = expand_inputs(settings["inputs"])
    if not input_names:
        raise InputError("no inputs: give checkpoint files or directories (or 'inputs' in the config)")

    optimizer = _resolve_optimizer(settings["optimizer"])
    options = {key: settings[key] for key in MERGE_DEFAULTS}
    options["optimizer"] = optimizer
    options["weights"] = _per_input_values("weights", settings["weights"], input_names, settings["metrics"])
    options["order_by"] = _per_input_values("order_by", settings["order_by"], input_names, settings["metrics"])
    if isinstance(settings["evaluate"], str):
        options["evaluate"] = _import_object(settings["evaluate"], "--evaluate")
    if options["greedy"] and not callable(options["evaluate"]):
        raise InputError("--greedy needs --evaluate MODULE:FUNCTION (a state_dict -> score callback)")
    shard_bytes = parse_size(settings["shard_size"])

    with contextlib.ExitStack() as stack:
        checkpoints = [stack.enter_context(open_checkpoint(item)) for item in input_names]
        check_compatible(checkpoints)
        pivot = _pivot_setting(settings["pivot"])
        if isinstance(pivot, Checkpoint):
            stack.enter_context(pivot)
            check_compatible([pivot], reference=checkpoints[0])
        options["pivot"] = pivot
        infos = checkpoints[0].infos
        low_memory = _choose_low_memory(settings["low_memory"], optimizer, options, checkpoints, quiet)

        metadata = {
            "fedsoup.version": fedsoup.__version__,
            "fedsoup.inputs": json.dumps([str(item) for item in input_names]),
            "fedsoup.merge": json.dumps(
                _jsonable(
                    {
                        **{k: v for k, v in options.items() if k not in ("evaluate", "pivot")},
                        "optimizer": settings["optimizer"] if isinstance(settings["optimizer"], str) else optimizer,
                        "pivot": pivot.name if isinstance(pivot, Checkpoint) else pivot,
                        "evaluate": settings["evaluate"] if options["greedy"] else None,
                        **settings["optimizer_kwargs"],
                        "low_memory": low_memory,
                    }
                ),
                sort_keys=True,
            ),
        }
        merge_kwargs = {**options, **settings["optimizer_kwargs"]}
        _fail_fast(merge_kwargs, input_names)
        total_bytes = sum(info.nbytes for info in infos.values())
        if low_memory:
            produce = _low_memory_producer(checkpoints, merge_kwargs, input_names)
            progress = _Progress(total_bytes, "merging", quiet)
        else:
            produce = _in_memory_producer(checkpoints, merge_kwargs, input_names, quiet)
            progress = _Progress(total_bytes, "writing", quiet)
        try:
            save_checkpoint(
                output, infos, produce, metadata=metadata, max_shard_bytes=shard_bytes,
                force=args.force, on_tensor=progress.update,
            )
        finally:
            progress.close()

    seconds = time.perf_counter() - started
    parameters = sum(info.numel for info in infos.values())
    target = layout.target
    print(
        f"{PROG}: merged {len(input_names)} inputs into {target}: {len(infos)} tensors, "
        f"{parameters:,} parameters, {seconds:.1f} s "
        f"({'low-memory' if low_memory else 'in-memory'}, {optimizer.__name__}, "
        f"{settings['epochs']} epoch{'s' if settings['epochs'] != 1 else ''})"
    )
    return 0


def _fail_fast(merge_kwargs: dict, names: Sequence[str]) -> None:
    """Run the merge on N one-number models, so bad options stop us before gigabytes are read."""
    if merge_kwargs["greedy"]:
        return  # the user's evaluate() expects the real model
    kwargs = dict(merge_kwargs)
    if isinstance(kwargs["pivot"], Checkpoint):
        kwargs["pivot"] = {"probe": torch.zeros(1)}
    with _named_ingredients(names):
        fedsoup.merge([{"probe": torch.full((1,), float(i))} for i in range(len(names))], **kwargs)


def _low_memory_refusal(optimizer, options) -> str | None:
    if options["greedy"]:
        return "greedy selection scores the whole model after every step"
    if options["project"]:
        return "the projection ball (--project) is computed over the whole model"
    if not fedsoup.is_elementwise(optimizer):
        return f"{optimizer.__name__} is not element-wise (its update couples coordinates across tensors)"
    return None


def _choose_low_memory(requested, optimizer, options, checkpoints: Sequence[Checkpoint], quiet: bool) -> bool:
    """Honour --low-memory/--in-memory; otherwise go tensor by tensor when memory is short."""
    refusal = _low_memory_refusal(optimizer, options)
    if requested is True:
        if refusal:
            raise InputError(f"--low-memory merges tensor by tensor, which would change the result: {refusal}")
        return True
    if requested is False:
        return False
    # Inputs plus the merge's own working copies (parameters, gradients, optimizer state).
    needed = 2 * sum(checkpoint.nbytes for checkpoint in checkpoints)
    available = _memory_available()
    if available is None or needed <= available:
        return False
    if refusal:
        _note(f"the inputs need ~{_human_bytes(needed)} in memory and only {_human_bytes(available)} is "
              f"available, but tensor-by-tensor merging is not possible ({refusal}); trying in memory", quiet)
        return False
    _note(f"the inputs need ~{_human_bytes(needed)} in memory and {_human_bytes(available)} is available: "
          f"merging tensor by tensor (--low-memory)", quiet)
    return True


def _read_pivot(checkpoint: Checkpoint, key: str) -> torch.Tensor:
    # Ingredients need no pass of their own: fedsoup.merge finds a NaN/Inf from its
    # result and names the ingredient, which _named_ingredients turns into its file.
    # An explicit pivot is not an ingredient, so its file is checked here.
    return check_finite(checkpoint.get(key), checkpoint.name, key)


def _low_memory_producer(checkpoints, merge_kwargs, names) -> Callable[[str], torch.Tensor]:
    """Merge one tensor at a time: each input read lazily, ``fedsoup.merge`` on one-key dicts.

    For element-wise optimizers this is exactly the whole-model merge (same order, seed
    and weights; every coordinate's trajectory depends on that coordinate only), while
    peak memory is about N x the largest tensor.
    """
    pivot = merge_kwargs["pivot"]

    def produce(key: str) -> torch.Tensor:
        parts = [{key: checkpoint.get(key)} for checkpoint in checkpoints]
        kwargs = dict(merge_kwargs)
        if isinstance(pivot, Checkpoint):
            kwargs["pivot"] = {key: _read_pivot(pivot, key)}
        with _named_ingredients(names):
            return fedsoup.merge(parts, **kwargs)[key]

    return produce


def _in_memory_producer(checkpoints, merge_kwargs, names, quiet: bool) -> Callable[[str], torch.Tensor]:
    """Load every input, merge the whole model once, then hand out its tensors."""
    loading = _Progress(sum(checkpoint.nbytes for checkpoint in checkpoints), "loading", quiet)
    models = []
    try:
        for checkpoint in checkpoints:
            model = {}
            for key, info in checkpoint.infos.items():
                model[key] = checkpoint.get(key)
                loading.update(key, info)
            models.append(model)
    finally:
        loading.close()
    kwargs = dict(merge_kwargs)
    if isinstance(kwargs["pivot"], Checkpoint):
        pivot = kwargs["pivot"]
        kwargs["pivot"] = {key: _read_pivot(pivot, key) for key in pivot.infos}
    if not quiet and sys.stderr.isatty():  # the one step without a progress bar
        print(f"{PROG}: merging {len(models)} inputs in memory ...", file=sys.stderr, flush=True)
    with _named_ingredients(names):
        merged = fedsoup.merge(models, **kwargs)
    del models
    return merged.pop


# --------------------------------------------------------------------------- inspect


def run_inspect(args: argparse.Namespace) -> int:
    names = expand_inputs(args.files)
    reports = []
    with contextlib.ExitStack() as stack:
        checkpoints = [stack.enter_context(open_checkpoint(item)) for item in names]
        for checkpoint in checkpoints:
            reports.append(
                {
                    "file": checkpoint.name,
                    "format": checkpoint.format,
                    "tensors": len(checkpoint.infos),
                    "parameters": checkpoint.numel,
                    "bytes": checkpoint.nbytes,
                    "metadata": checkpoint.metadata,
                    "keys": {
                        key: {"dtype": str(info.dtype).removeprefix("torch."), "shape": list(info.shape)}
                        for key, info in checkpoint.infos.items()
                    },
                }
            )
        mismatches = [line for other in checkpoints[1:] for line in differences(checkpoints[0], other)]
    if args.json:
        print(json.dumps({"checkpoints": reports, "differences": mismatches}, indent=2))
        return 0
    for report in reports:
        print(
            f"{report['file']}: {report['tensors']} tensors, {report['parameters']:,} parameters, "
            f"{_human_bytes(report['bytes'])} ({report['format']})"
        )
        if not args.summary:
            width = max((len(key) for key in report["keys"]), default=0)
            for key, info in report["keys"].items():
                shape = "(" + ", ".join(map(str, info["shape"])) + ")"
                count = math.prod(info["shape"])
                print(f"  {key:<{width}}  {info['dtype']:<9} {shape:<20} {count:>14,}")
        for key, value in report["metadata"].items():
            print(f"  metadata {key} = {value}")
    if len(reports) > 1:
        if mismatches:
            print(f"not mergeable: {len(mismatches)} differences with {reports[0]['file']}")
            limit = None if args.all else 20
            for line in mismatches[:limit]:
                print(f"  {line}")
            if limit is not None and len(mismatches) > limit:
                print(f"  ... and {len(mismatches) - limit} more (--all shows them)")
        else:
            print(f"mergeable: {len(reports)} checkpoints with the same tensor names and shapes")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Weight-space model merging by Amortized Model Ensembling (AME).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {fedsoup.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = commands.add_parser(
        "merge",
        help="merge checkpoint files into one",
        description=(
            "Merge checkpoints (.safetensors, sharded safetensors directories or *.index.json, "
            ".pt/.pth/.bin/.ckpt loaded with torch.load(weights_only=True), .npz) with "
            "fedsoup.merge. Settings: defaults < --config file < flags."
        ),
        epilog=(
            "examples:\n"
            "  fedsoup merge clients/*.safetensors -o merged.safetensors --optimizer adam --lr 1e-3 \\\n"
            "      --epochs 15 --batch-size 2 --shuffle\n"
            "  fedsoup merge runs/*/model.pt -o soup/ --metrics metrics.csv --weights num_examples \\\n"
            "      --order-by val_acc --low-memory --shard-size 2GB"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    merge.add_argument("inputs", nargs="*", metavar="INPUT", help="checkpoint files, directories or globs")
    merge.add_argument("-o", "--output", metavar="PATH", help="output .safetensors, .pt, or a directory (model.safetensors)")
    merge.add_argument("--config", metavar="FILE", help="TOML/JSON/YAML file with the same settings (flags override it)")
    merge.add_argument("--metrics", metavar="FILE", help="CSV/JSON with one row per input; --weights/--order-by may name a column")
    merge.add_argument("-f", "--force", action="store_true", default=False, help="overwrite an existing output")
    merge.add_argument("--shard-size", dest="shard_size", metavar="SIZE", help=f"largest safetensors shard (default {DEFAULT_SHARD_SIZE})")
    mode = merge.add_mutually_exclusive_group()
    mode.add_argument("--low-memory", dest="low_memory", action="store_const", const=True,
                      help="merge tensor by tensor (element-wise optimizers; default: automatic when memory is short)")
    mode.add_argument("--in-memory", dest="low_memory", action="store_const", const=False,
                      help="load every input at once, never tensor by tensor")
    merge.add_argument("-q", "--quiet", action="store_true", default=False, help="no progress bar or notes")

    ame = merge.add_argument_group("AME options (fedsoup.merge; SPEC §1)")
    ame.add_argument("--weights", metavar="W", help="one weight per input (3,1,2) or a --metrics column (num_examples)")
    ame.add_argument("--optimizer", metavar="NAME", help=f"{', '.join(fedsoup.OPTIMIZERS)} or module:Class (default sgd)")
    ame.add_argument("--lr", type=float, help="learning rate eta_0 (default 1.0)")
    ame.add_argument("--schedule", choices=("constant", "harmonic", "poly"), help="lr schedule (default harmonic)")
    ame.add_argument("--alpha", type=float, metavar="A", help="exponent of the poly schedule (default -1.1)")
    ame.add_argument("--epochs", type=int, metavar="E", help="passes over the inputs (default 1)")
    ame.add_argument("--batch-size", dest="batch_size", type=int, metavar="B", help="inputs per step (default 1)")
    ame.add_argument("--shuffle", action=argparse.BooleanOptionalAction, help="fresh order every epoch")
    ame.add_argument("--seed", type=int, help="seed of the shuffling (default 0)")
    ame.add_argument("--pivot", help="w_0: soup, first, an input index, or a checkpoint path (default soup)")
    pivot_mode = ame.add_mutually_exclusive_group()
    pivot_mode.add_argument("--fixed-pivot", dest="adaptive_pivot", action="store_const", const=False,
                            help="pseudogradients at the fixed w_0")
    pivot_mode.add_argument("--adaptive-pivot", dest="adaptive_pivot", action="store_const", const=True,
                            help="pseudogradients at the current w (default)")
    ame.add_argument("--amplification", type=float, metavar="ZETA", help="pseudogradient factor zeta (default 1.0)")
    ame.add_argument("--order-by", dest="order_by", metavar="SCORES", help="one score per input (0.91,0.88) or a --metrics column")
    order = ame.add_mutually_exclusive_group()
    order.add_argument("--ascending", dest="descending", action="store_const", const=False,
                       help="visit low scores first")
    order.add_argument("--descending", dest="descending", action="store_const", const=True,
                       help="visit high scores first (default)")
    ame.add_argument("--greedy", action=argparse.BooleanOptionalAction, help="keep a step only if --evaluate improves")
    ame.add_argument("--evaluate", metavar="FN", help="MODULE:FUNCTION or file.py:FUNCTION, state_dict -> score (for --greedy)")
    ame.add_argument("--project", action=argparse.BooleanOptionalAction, help="project onto the ingredients' ball")
    ame.add_argument("--momentum", type=float, help="optimizer argument momentum")
    ame.add_argument("--betas", type=_literal, help="optimizer argument betas, e.g. 0.9,0.999")
    ame.add_argument("--eps", type=float, help="optimizer argument eps")
    ame.add_argument("--weight-decay", dest="weight_decay", type=float, help="optimizer argument weight_decay")
    ame.add_argument("--opt", dest="optimizer_kwargs", action="append", type=_optimizer_kwarg, metavar="KEY=VALUE",
                     help="any other optimizer argument (repeatable), e.g. --opt amsgrad=true")
    merge.set_defaults(handler=run_merge)

    inspect_cmd = commands.add_parser(
        "inspect",
        help="list tensor names, shapes, dtypes and parameter counts",
        description="Show what checkpoints hold and, for several, why they cannot be merged.",
    )
    inspect_cmd.add_argument("files", nargs="+", metavar="FILE", help="checkpoint files, directories or globs")
    inspect_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    inspect_cmd.add_argument("--summary", action="store_true", help="totals only, no per-tensor lines")
    inspect_cmd.add_argument("--all", action="store_true", help="list every difference, not just the first 20")
    inspect_cmd.set_defaults(handler=run_inspect)
    return parser


class _Terminated(BaseException):
    """SIGTERM, raised where the program is so that cleanup handlers run."""


def _terminate(signum, frame) -> None:
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedsoup`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit with status 2
    previous_handler = None
    with contextlib.suppress(ValueError):  # (only possible in the main thread)
        # `kill` unwinds like Ctrl-C, so temporary files are removed and nothing partial is left.
        previous_handler = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.handler(args)
    except (InputError, ValueError, FileNotFoundError) as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"{PROG}: terminated", file=sys.stderr)
        return 143
    except MemoryError:
        print(f"{PROG}: out of memory; try --low-memory (tensor by tensor)", file=sys.stderr)
        return 1
    except Exception as error:  # the one place that turns any crash into a clean exit status
        if os.environ.get("FEDSOUP_DEBUG"):
            raise
        print(
            f"{PROG}: unexpected error: {type(error).__name__}: {' '.join(str(error).split())} "
            f"(set FEDSOUP_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
