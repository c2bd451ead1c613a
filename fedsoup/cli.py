"""``fedsoup merge`` and ``fedsoup inspect``: argparse over :func:`fedsoup.merge_files` (docs/design.md §4).

    fedsoup merge clients/*.safetensors -o merged.safetensors --optimizer adam --lr 1e-3 \\
        --epochs 15 --batch-size 2 --shuffle --seed 0
    fedsoup merge a.pt b.pt c.pt -o soup.safetensors --config merge.toml --low-memory
    fedsoup inspect a.safetensors b.pt

Settings come from a ``--config`` file (TOML, JSON or YAML), then flags; they are the
arguments of ``fedsoup.merge_files`` (itself ``fedsoup.merge``'s options), validated there.
Exit status: 0 success, 2 bad input or options, or an output that cannot be written
(permission, full disk: one line naming the file, tensor or option, and the cause),
1 anything unexpected. No partial output is ever left behind.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import errno
import json
import logging
import math
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import fedsoup
from fedsoup.errors import (MergeInputError, MergeWarning, OptionError, OutputError, OutputExistsError, closest_name,
                            os_reason)
from fedsoup.offline import DEFAULT_SHARD_SIZE, inspect_files, load_config, run_merge_files
from fedsoup.offline.producers import human_bytes
from fedsoup.offline.tables import import_object
from fedsoup.report import counted

PROG = "fedsoup"
# Optimizer arguments with flags of their own (any other: --opt KEY=VALUE).
OPTIMIZER_FLAGS = ("momentum", "betas", "eps", "weight_decay")
# Exit status 2: the user's input or options; every one names its culprit.
BAD_INPUT = (MergeInputError, OptionError, OutputExistsError, OutputError, ValueError, FileNotFoundError)
# Exit status 2 too: what the operator fixes on the machine (a file's permissions, a full disk).
OPERATOR_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS})


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


def _numbers_or_column(text: str) -> list[float] | str:
    """``"3,1,2"`` -> [3.0, 1.0, 2.0]; anything else names a --metrics column."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        return text


def _optimizer_kwarg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip().replace("-", "_"), _literal(value)


def _pivot(value: Any) -> Any:
    """``soup``/``first``, an ingredient index (``"2"`` too), or a checkpoint path."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """The ``merge_files`` arguments: the config file's, overridden by the flags given."""
    settings = load_config(args.config) if getattr(args, "config", None) else {}
    flags = {key: value for key, value in vars(args).items() if key not in ("config", "handler", "command", "quiet", "subparser")}
    optimizer_kwargs = dict(settings.pop("optimizer_kwargs", {}))
    optimizer_kwargs.update(flags.pop("optimizer_kwargs", None) or [])
    optimizer_kwargs.update({key: flags.pop(key) for key in OPTIMIZER_FLAGS if key in flags})
    if not flags.get("inputs"):
        flags.pop("inputs", None)
    settings.update(flags)
    if optimizer_kwargs:
        settings["optimizer_kwargs"] = optimizer_kwargs
    if "pivot" in settings:
        settings["pivot"] = _pivot(settings["pivot"])
    optimizer = settings.get("optimizer")
    if isinstance(optimizer, str) and optimizer.lower() not in fedsoup.OPTIMIZERS and ("." in optimizer or ":" in optimizer):
        settings["optimizer"] = import_object(optimizer, "optimizer")
    if isinstance(settings.get("evaluate"), str):
        settings["evaluate"] = import_object(settings["evaluate"], "evaluate")
    return settings


def run_merge(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    inputs, output = settings.pop("inputs", []), settings.pop("output", None)
    report = run_merge_files(inputs, output, progress=not args.quiet, **settings)
    mode = "low-memory" if report.low_memory else "in-memory"
    if report.path != "soup":  # the soup is no epoch of steps
        mode += f", {counted(report.epochs, 'epoch')}"
    print(
        f"{PROG}: merged {counted(len(report.inputs), 'input')} into {report.output}: "
        f"{counted(report.tensors, 'tensor')}, {counted(report.parameters, 'parameter')}, {report.seconds:.1f} s "
        f"({mode}; {report.describe()})"
    )
    if report.lora is not None:
        print(f"{PROG}: {report.lora.summary()}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    """Exit status 0 when the files can be merged together, 1 when they cannot (saying why)."""
    report = inspect_files(args.files)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if report["mergeable"] else 1
    checkpoints, mismatches = report["checkpoints"], report["differences"]
    for checkpoint in checkpoints:
        print(f"{checkpoint['file']}: {counted(checkpoint['tensors'], 'tensor')}, "
              f"{counted(checkpoint['parameters'], 'parameter')}, "
              f"{human_bytes(checkpoint['bytes'])} ({checkpoint['format']})")
        if not args.summary:
            width = max((len(key) for key in checkpoint["keys"]), default=0)
            for key, info in checkpoint["keys"].items():
                shape = "(" + ", ".join(map(str, info["shape"])) + ")"
                print(f"  {key:<{width}}  {info['dtype']:<9} {shape:<20} {math.prod(info['shape']):>14,}")
        for key, value in checkpoint["metadata"].items():
            print(f"  metadata {key} = {value}")
    for copy in report["tied_copies"]:
        print(f"{copy['file']}: tensor {copy['tensor']!r} is a tied copy of {copy['copy_of']!r}: a merge leaves it "
              f"out, as save_pretrained does (from_pretrained ties it back)")
    for warning in report["warnings"]:  # what a merge would warn about: it still runs
        print(f"warning: {warning}")
    for refusal in report["refusals"]:
        print(f"not mergeable: {refusal}")
    if mismatches:
        print(f"not mergeable: {counted(len(mismatches), 'difference')} with {checkpoints[0]['file']}")
        limit = None if args.all else 20
        for line in mismatches[:limit]:
            print(f"  {line}")
        if limit is not None and len(mismatches) > limit:
            print(f"  ... and {len(mismatches) - limit} more (--all shows them)")
    elif len(checkpoints) > 1 and report["mergeable"]:
        print(f"mergeable: {len(checkpoints)} checkpoints with the same tensor names and shapes")
    return 0 if report["mergeable"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Weight-space model merging by Amortized Model Ensembling (AME).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {fedsoup.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = commands.add_parser(
        "merge", help="merge checkpoint files into one", formatter_class=argparse.RawDescriptionHelpFormatter,
        # One line, as git's: argparse's own lists all 30 flags (15 lines) above every usage error.
        usage="%(prog)s [options] INPUT... -o PATH",
        argument_default=argparse.SUPPRESS,  # only flags given override the config file
        description="Merge checkpoints (.safetensors, sharded safetensors directories or *.index.json, "
                    ".pt/.pth/.bin/.ckpt loaded with torch.load(weights_only=True), .npz, Hugging Face model "
                    "directories or their weights or index files, PEFT LoRA adapter directories) with fedsoup.merge; the same as fedsoup.merge_files in Python. "
                    "Settings: --config file < flags.",
        epilog="examples:\n"
               "  fedsoup merge client*/ -o merged/              # transformers models in, a model directory out\n"
               "  fedsoup merge clients/*.safetensors -o merged.safetensors --optimizer adam --lr 1e-3 \\\n"
               "      --epochs 15 --batch-size 2 --shuffle\n"
               "  fedsoup merge runs/*/model.pt -o soup/ --metrics metrics.csv --weights num_examples \\\n"
               "      --order-by val_acc --low-memory --shard-size 2GB\n"
               "  fedsoup merge client*/ -o merged/ --lora products --lora-rank 16   # PEFT adapters in, adapter out\n"
               "  fedsoup merge client*/ -o merged-model/ --base base-model/         # adapters merged into the base",
    )
    files = merge.add_argument_group("inputs and outputs")
    files.add_argument("inputs", nargs="*", metavar="INPUT", help="checkpoint files, model or adapter directories, or globs")
    files.add_argument("-o", "--output", metavar="PATH", help="output .safetensors, .pt, or a directory (model.safetensors; "
                       "always a directory for adapters)")
    files.add_argument("--config", metavar="FILE", help="TOML/JSON/YAML file with the same settings (flags override it)")
    files.add_argument("--metrics", metavar="FILE", help="CSV/JSON with one row per input; --weights/--order-by may name a column")
    files.add_argument("-f", "--force", action="store_true", help="overwrite an existing output")
    files.add_argument("--shard-size", dest="shard_size", metavar="SIZE", help=f"largest safetensors shard (default {DEFAULT_SHARD_SIZE})")
    files.add_argument("--dtype", metavar="DTYPE", help="dtype of the output's floating tensors (fp32, fp16, bf16, fp64)")
    files.add_argument("--no-copy-config", dest="copy_config", action="store_false",
                       help="do not carry a model directory's config.json and tokenizer files over")
    files.add_argument("-q", "--quiet", action="store_true", default=False, help="no progress bar, notes or warnings")

    ame = merge.add_argument_group("merge options (fedsoup.merge)")
    ame.add_argument("--weights", type=_numbers_or_column, metavar="W", help="one weight per input (3,1,2) or a --metrics column")
    ame.add_argument("--optimizer", metavar="NAME", help=f"{', '.join(fedsoup.OPTIMIZERS)} or module:Class (default sgd)")
    ame.add_argument("--lr", type=float, help="learning rate eta_0 (default: 1.0 for SGD; for adaptive "
                     "optimizers a scale-aware one from the inputs' spread, docs/defaults.md)")
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
    ame.add_argument("--order-by", dest="order_by", type=_numbers_or_column, metavar="SCORES",
                     help="one score per input (0.91,0.88) or a --metrics column")
    order = ame.add_mutually_exclusive_group()
    order.add_argument("--ascending", dest="descending", action="store_const", const=False, help="visit low scores first")
    order.add_argument("--descending", dest="descending", action="store_const", const=True, help="visit high scores first (default)")
    ame.add_argument("--greedy", action=argparse.BooleanOptionalAction, help="keep a step only if --evaluate improves")
    ame.add_argument("--evaluate", metavar="FN", help="MODULE:FUNCTION or file.py:FUNCTION, state_dict -> score (for --greedy)")
    ame.add_argument("--project", action=argparse.BooleanOptionalAction, help="project onto the ingredients' ball")

    opt = merge.add_argument_group("optimizer arguments")
    opt.add_argument("--momentum", type=float, help="optimizer argument momentum")
    opt.add_argument("--betas", type=_literal, help="optimizer argument betas, e.g. 0.9,0.999")
    opt.add_argument("--eps", type=float, help="optimizer argument eps")
    opt.add_argument("--weight-decay", dest="weight_decay", type=float, help="optimizer argument weight_decay")
    opt.add_argument("--opt", dest="optimizer_kwargs", action="append", type=_optimizer_kwarg, metavar="KEY=VALUE",
                     help="any other optimizer argument (repeatable), e.g. --opt amsgrad=true")

    lora = merge.add_argument_group("LoRA adapters (PEFT adapter directories as inputs)")
    lora.add_argument("--lora", choices=("products", "factors"),
                      help="merge the updates s*B*A (products, the default: exact at rank sum(r)) or A and B apart (factors)")
    lora.add_argument("--lora-rank", dest="lora_rank", type=int, metavar="R",
                      help="products: write rank R by the truncated SVD of the merge (its energy is reported; "
                           "the soup of products at R >= sum(r) is exact, written at rank sum(r))")
    lora.add_argument("--base", metavar="DIR", help="add the merged update to this base model directory; write a model directory")

    memory = merge.add_argument_group("memory and device")
    mode = memory.add_mutually_exclusive_group()
    mode.add_argument("--low-memory", dest="low_memory", action="store_const", const=True,
                      help="merge tensor by tensor (element-wise optimizers; default: automatic when memory is short)")
    mode.add_argument("--in-memory", dest="low_memory", action="store_const", const=False,
                      help="load every input at once, never tensor by tensor")
    memory.add_argument("--device", metavar="DEVICE", help="where the merge runs (cpu, cuda, cuda:1, mps)")
    merge.set_defaults(handler=run_merge, subparser=merge)

    inspect_cmd = commands.add_parser("inspect", help="list tensor names, shapes, dtypes and parameter counts",
                                      description="Show what checkpoints hold and, for several, why they cannot be "
                                                  "merged (fedsoup.inspect_files in Python). Exit status: 0 when "
                                                  "the files can be merged together, 1 when they cannot, 2 on "
                                                  "usage or read errors.")
    inspect_cmd.add_argument("files", nargs="+", metavar="FILE", help="checkpoint files, directories or globs")
    inspect_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    inspect_cmd.add_argument("--summary", action="store_true", help="totals only, no per-tensor lines")
    inspect_cmd.add_argument("--all", action="store_true", help="list every difference, not just the first 20")
    inspect_cmd.set_defaults(handler=run_inspect, quiet=False, subparser=inspect_cmd)
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommand parsers by name (argparse keeps them in its subparsers action)."""
    for action in parser._actions:  # noqa: SLF001 - argparse has no public accessor
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return dict(action.choices)
    return {}


def _refuse(parser: argparse.ArgumentParser, what: str, word: str, choices: Sequence[str]) -> None:
    """Exit 2 with ``PARSER: error: unknown WHAT 'word'; did you mean 'closest'?`` and the usage."""
    suggestion = closest_name(word, choices)
    hint = f"; did you mean '{suggestion}'?" if suggestion else f" (valid: {', '.join(choices)})" if len(choices) <= 8 else ""
    parser.error(f"unknown {what} '{word}'{hint}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """argparse, refusing a misspelt subcommand or flag with the closest valid name (exit 2)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _subcommands(parser)
    first = next((word for word in argv if not word.startswith("-")), None)
    if first is not None and argv.index(first) == 0 and first not in commands:
        _refuse(parser, "command", first, sorted(commands))
    args, extra = parser.parse_known_args(argv)
    if extra:
        subparser = getattr(args, "subparser", parser)
        flags = [option for action in subparser._actions for option in action.option_strings  # noqa: SLF001
                 if option.startswith("--")]
        flag = next((word for word in extra if word.startswith("-")), None)
        if flag is not None:
            _refuse(subparser, "flag", flag.split("=", 1)[0], flags)
        subparser.error(f"unexpected argument '{extra[0]}'")
    return args


class _Terminated(BaseException):
    """SIGTERM, raised where the program is so that cleanup handlers run."""


def _terminate(signum, frame) -> None:
    raise _Terminated()


@contextlib.contextmanager
def _messages(quiet: bool):
    """Notes (the ``fedsoup`` logger) and MergeWarnings as ``fedsoup: ...`` lines on stderr."""
    logger = logging.getLogger("fedsoup")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    previous_level, previous_show = logger.level, warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, MergeWarning):
            return previous_show(message, category, filename, lineno, file, line)
        if not quiet:
            print(f"{PROG}: warning: {message}", file=sys.stderr)

    if not quiet:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():  # restores showwarning and the filters
            warnings.simplefilter("always", MergeWarning)
            warnings.showwarning = show
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


@contextlib.contextmanager
def _open_file_limit_raised():
    """The soft limit on open files (``RLIMIT_NOFILE``) raised to the hard limit while a
    command runs, then put back.

    A merge holds each input open (its tensors are mapped from it): past the soft limit,
    1024 on most Linux systems while the hard one is far higher, ``fedsoup merge`` of a
    thousand clients would fail with "too many open files" where the user may open more.
    Only the command line does this: the library leaves its caller's process as it is.
    A no-op where the limit cannot be read or raised (no ``resource`` module on Windows; a
    hard limit the system refuses, as macOS does ``RLIM_INFINITY``).
    """
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, AttributeError, OSError, ValueError):
        yield
        return
    raised = False
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            raised = True
    try:
        yield
    finally:
        if raised:
            with contextlib.suppress(OSError, ValueError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedsoup`` console script; returns the exit status."""
    args = parse_args(argv)  # usage errors exit with status 2
    previous_handler = None
    with contextlib.suppress(ValueError):  # (only possible in the main thread)
        # `kill` unwinds like Ctrl-C, so temporary files are removed and nothing partial is left.
        previous_handler = signal.signal(signal.SIGTERM, _terminate)
    try:
        with _messages(args.quiet), _open_file_limit_raised():
            return args.handler(args)
    except BAD_INPUT as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of our stdout went away (`fedsoup inspect --json ... | head`): stop quietly as
        # tools killed by SIGPIPE do, and keep the interpreter's final flush from complaining again.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
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
        if isinstance(error, OSError) and error.errno in OPERATOR_ERRNOS:
            where = f"{error.filename}: " if error.filename is not None else ""
            print(f"{PROG}: error: {where}{os_reason(error)}", file=sys.stderr)
            return 2
        print(f"{PROG}: unexpected error: {type(error).__name__}: {' '.join(str(error).split())} "
              f"(set FEDSOUP_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
