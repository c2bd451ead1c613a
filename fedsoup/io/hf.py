"""Hugging Face model directories: a ``config.json`` beside the weights.

Inputs are resolved (:func:`fedsoup.io.resolve.resolve_input`) to the directory their
weights sit in, whichever form the user named (directory, index, weights file). Before
any tensor is read, :func:`check_model_inputs` refuses what cannot be merged: models
beside PEFT adapters, models of different ``model_type``, quantized models. A merge into
a directory then gives a directory that ``AutoModel.from_pretrained`` loads: the first
model directory's configuration, generation config and tokenizer files (its named chat
templates too, :func:`chat_template_files`), and the Python files of a model saved with
custom code (:func:`custom_code_files`), are carried over byte for byte
(:func:`model_directory_files`), the config's dtype set to the dtype the weights are
written in. A carried file that is a symbolic link is followed only to a regular file inside
the model directory, or inside the ``models--org--name`` folder of a Hugging Face cache
snapshot, whose files all link to its blobs (:func:`link_root`); any other link is refused,
so that a directory from a stranger (``tokenizer.json -> ~/.ssh/id_rsa``) cannot make the
merge copy the user's files into the model they publish. When the inputs' ``config.json``
differ beyond bookkeeping fields, a :class:`~fedsoup.errors.MergeWarning` names the first
input that differs and the fields (:func:`config_differences`), and when their tokenizers map
ids to other tokens, another names the input and its vocabulary files
(:func:`tokenizer_differences`); a refusal of other tensor names or shapes between models of
other configs names the fields (:func:`with_config_cause`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedsoup.errors import MergeInputError, MergeWarning
from fedsoup.io.formats import dtype_str, one_line
from fedsoup.io.quantized import DEQUANTIZE_HINT, declared_quantization
from fedsoup.io.resolve import ADAPTER, MODEL, MODEL_CONFIG, ResolvedInput, index_shards
from fedsoup.report import counted

__all__ = [
    "CONFIG_NAME", "CARRIED_FILES", "MODEL_DTYPES", "is_model_directory", "read_config", "check_model_inputs",
    "model_directory_files", "uncarried_files", "carried_names", "chat_template_files", "custom_code_files",
    "first_model", "config_bytes", "CHAT_TEMPLATE_DIR", "ties_word_embeddings", "link_root",
    "tied_embedding_rows", "VOCABULARY_FILES", "config_differences", "tokenizer_differences",
    "differing_config_fields", "with_config_cause", "files_read",
]

CONFIG_NAME = MODEL_CONFIG

# What transformers' save_pretrained writes beside the weights for a model, its
# generation defaults, tokenizer (fast and slow, BPE/WordPiece/SentencePiece) and processor.
CARRIED_FILES = (
    CONFIG_NAME,
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
)
# Where save_pretrained writes a tokenizer's or processor's *named* chat templates, one
# ``<name>.jinja`` each (the default one is chat_template.jinja); from_pretrained reads every
# ``*.jinja`` there back as ``chat_template[<name>]`` (transformers' utils.hub.CHAT_TEMPLATE_DIR).
CHAT_TEMPLATE_DIR = "additional_chat_templates"
_TEMPLATE_SUFFIX = ".jinja"
# The JSON files whose ``auto_map`` may name classes defined in Python files beside them
# (models saved with custom code, loaded with ``trust_remote_code=True``).
_AUTO_MAP_FILES = (CONFIG_NAME, "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")
# What transformers (dynamic_module_utils) follows from such a file to the other files it needs.
_RELATIVE_IMPORT = re.compile(r"^\s*(?:from\s+\.(\w+)\s+import|import\s+\.(\w+)\s*$)", re.M)
# The dtypes transformers builds a model in (torch.set_default_dtype takes no other). Weights
# in another dtype (FP8 without scales) are cast to the config's dtype when loaded, so a
# config is only told the weights' dtype when it is one of these.
MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# huggingface_hub's cache: a model repository's files in models--org--name/blobs/<hash>, and
# models--org--name/snapshots/<revision>/<name> a relative link to each (../../blobs/<hash>).
_CACHE_SNAPSHOTS = "snapshots"
_CACHE_MODEL_PREFIX = "models--"
_LINK_ADVICE = "copy the file into the directory in place of the link"
# The files that define a tokenizer's token <-> id mapping (:func:`tokenizer_differences`):
# JSON files compared parsed (only the named fields of tokenizer.json: its vocabulary and merges,
# and the added tokens; formatting and the other fields change with the transformers version
# that saved it), the others byte for byte.
_VOCABULARY_JSON = {"tokenizer.json": ("model", "added_tokens"), "added_tokens.json": None}
VOCABULARY_FILES = ("tokenizer.json", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
                    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
# Config fields that say where or with what a model was saved, not what it is.
_BOOKKEEPING = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype"})


def is_model_directory(path: str | os.PathLike[str]) -> bool:
    """True for a directory holding a ``config.json`` (as ``save_pretrained`` writes)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def read_config(path: Path) -> dict:
    """A JSON object from ``path`` (``config.json``, ``adapter_config.json``)."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MergeInputError(f"unreadable {Path(path).name} ({one_line(error)})", path=str(path)) from None
    if not isinstance(config, dict):
        raise MergeInputError(f"{Path(path).name} is not a JSON object", path=str(path))
    return config


def config_bytes(config: Mapping[str, Any]) -> bytes:
    """A ``config.json`` or ``adapter_config.json`` as transformers and PEFT write them
    (indented JSON, sorted keys, a final newline)."""
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _differing_fields(reference: dict, other: dict) -> list[str]:
    keys = (reference.keys() | other.keys()) - _BOOKKEEPING
    return sorted(key for key in keys if reference.get(key) != other.get(key))


def check_model_inputs(inputs: Sequence[ResolvedInput]) -> None:
    """Refuse, from configuration files alone, inputs that cannot be merged with each other.

    - full models beside PEFT adapters (an adapter holds deltas of a few layers, not a model);
    - models whose ``config.json`` declares another ``model_type`` than the first model's;
    - a ``config.json`` that declares quantization (:mod:`fedsoup.io.quantized`).

    No other field is compared for a refusal: every field that shapes tensors is refused by
    the tensors themselves (:func:`fedsoup.io.checks.check_compatible`): another layer count
    (``num_hidden_layers``, ``n_layer``) gives other tensor names, since only a copy of a
    word embedding may be left out (:func:`tied_embedding_rows`; a depth up-scaled model's
    extra layers are kept, and refused), and another ``hidden_size``, ``intermediate_size``,
    ``vocab_size``, key/value width or learned position count gives other shapes. Fields no
    tensor shows (``num_attention_heads`` at the same width, ``rope_theta``, ``layer_norm_eps``)
    cannot be told from the weights: a directory output carries the first config and warns,
    naming the fields (:func:`model_directory_files`).

    Raises :class:`~fedsoup.errors.MergeInputError` with ``path`` (the input) and
    ``ingredient`` (its position).
    """
    kinds = {item.kind for item in inputs}
    if MODEL in kinds and ADAPTER in kinds:
        first_model = next(item for item in inputs if item.kind == MODEL)
        index, adapter = next((i, item) for i, item in enumerate(inputs) if item.kind == ADAPTER)
        raise MergeInputError(
            f"is a PEFT adapter ({adapter.config_path.name}) while {first_model.name} is a full model; "
            f"merge adapters with adapters and models with models",
            ingredient=index, path=adapter.name,
        )
    reference = None
    for index, item in enumerate(inputs):
        if item.kind != MODEL:
            continue
        config = read_config(item.config_path)
        declared = declared_quantization(config)
        if declared is not None:
            raise MergeInputError(
                f"{item.config_path} declares {declared}: quantized weights cannot be averaged; {DEQUANTIZE_HINT}",
                ingredient=index, path=item.name,
            )
        if reference is None:
            reference = (item, config)
        elif config.get("model_type") != reference[1].get("model_type"):
            raise MergeInputError(
                f"model_type {config.get('model_type')!r} ({item.config_path}), not "
                f"{reference[1].get('model_type')!r} as {reference[0].name}: models of different "
                f"architectures cannot be merged",
                ingredient=index, path=item.name,
            )


def _config_parts(config: dict) -> list[dict]:
    """A ``config.json`` and its sub-configurations (``text_config``, ...): where transformers
    reads a field of a composite model (a vision-language model keeps its language model's
    ``vocab_size`` and ``tie_word_embeddings`` in ``text_config``)."""
    return [config, *(value for value in config.values() if isinstance(value, dict))]


def ties_word_embeddings(inputs: Sequence[ResolvedInput]) -> bool:
    """Whether ``from_pretrained`` ties the merged model's word embeddings back.

    ``False`` when the first model's ``config.json`` gives ``tie_word_embeddings`` as anything
    but ``true``, at its top level or in a sub-configuration (``text_config``): that model's
    output layer is its own tensor, and leaving it out would load it as random weights.
    ``True`` otherwise (transformers' default), also when no input has a ``config.json``.
    """
    first = first_model(inputs)
    return first is None or _ties_word_embeddings(_config_parts(read_config(first.config_path)))


def _ties_word_embeddings(parts: Sequence[dict]) -> bool:
    return all(part.get("tie_word_embeddings", True) is True for part in parts)


def tied_embedding_rows(inputs: Sequence[ResolvedInput]) -> frozenset[int] | None:
    """The row counts a tied word embedding may have, for :func:`fedsoup.io.checks.tied_copies`:
    the ``vocab_size`` values of the first model's ``config.json`` (top level and sub-configs,
    as :func:`ties_word_embeddings` reads it), when that model ties its word embeddings.

    ``from_pretrained`` ties embeddings and nothing else: a copy of any other tensor (the extra
    layers of a depth up-scaled model are byte copies of shared ones) is a tensor of its own,
    loaded at random when left out. Empty when the model unties its embeddings or its config
    gives no ``vocab_size`` (nothing may be left out); ``None`` when no input has a
    ``config.json`` (nothing is known: nothing may be left out, and a refusal says so).
    """
    first = first_model(inputs)
    if first is None:
        return None
    parts = _config_parts(read_config(first.config_path))  # read once for both questions
    if not _ties_word_embeddings(parts):
        return frozenset()
    sizes = (part.get("vocab_size") for part in parts)
    return frozenset(size for size in sizes if isinstance(size, int) and not isinstance(size, bool) and size > 0)


def _dtype_key(config: dict) -> list[str]:
    """The config fields naming the weights' dtype (the one transformers reads when none is there)."""
    present = [key for key in ("torch_dtype", "dtype") if key in config]
    if present:
        return present
    major = str(config.get("transformers_version", "0")).split(".")[0]
    return ["dtype"] if major.isdigit() and int(major) >= 5 else ["torch_dtype"]


def model_directory_files(inputs: Sequence[ResolvedInput], weights_dtype: torch.dtype | None) -> dict[str, bytes]:
    """The files to write beside the merged weights: those of the first input in a model directory.

    Returns ``{name: bytes}``, names relative to the output folder, one folder deep for the
    named chat templates (``additional_chat_templates/tool_use.jinja``) (empty when no input
    has a ``config.json`` beside it; the first input may be a bare weights file, a previous
    soup, and the others model directories). That input's files (:func:`carried_names`) are
    kept byte for byte, except ``config.json`` whose ``dtype`` (or ``torch_dtype``) is set to
    ``weights_dtype`` when it is one transformers builds models in (:data:`MODEL_DTYPES`; FP8
    weights keep the config's dtype, the one ``from_pretrained`` casts them to, as it did for
    the inputs).

    Raises :class:`~fedsoup.errors.MergeInputError` (``path``: the link) for a carried file that
    is a link anywhere but to a regular file inside the model directory (:func:`link_root`),
    before anything is written. The weights are not among these files: they are parsed, never
    copied, and read wherever their links lead (a cache snapshot's, in its blobs).
    """
    first = first_model(inputs)
    if first is None:
        return {}
    root = link_root(first.directory)
    files = {}
    for name in carried_names(first.directory):
        data = _carried_bytes(first.directory / name, root)
        if data is not None:  # (replaced by something else since it was listed: skipped, as it would have been)
            files[name] = data
    for message in config_differences(inputs):
        warnings.warn(message, MergeWarning, stacklevel=4)  # at the caller of merge_files
    config = read_config(first.config_path)
    keys = _dtype_key(config)
    if weights_dtype in MODEL_DTYPES and any(config.get(key) != dtype_str(weights_dtype) for key in keys):
        for key in keys:
            config[key] = dtype_str(weights_dtype)
        files[CONFIG_NAME] = config_bytes(config)
    return files


def differing_config_fields(first: ResolvedInput, other: ResolvedInput) -> list[str]:
    """The ``config.json`` fields in which two model inputs differ, sorted, bookkeeping fields
    (``_name_or_path``, ``transformers_version``, the dtype) left out; empty unless both are
    inputs in a model directory."""
    if first.kind != MODEL or other.kind != MODEL:
        return []
    return _differing_fields(read_config(first.config_path), read_config(other.config_path))


def _shown(names: Sequence[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def config_differences(inputs: Sequence[ResolvedInput]) -> list[str]:
    """The warning a merge of ``inputs`` into a directory gives when their ``config.json`` differ
    (:func:`model_directory_files`; ``fedsoup inspect`` reports it too): at most one, naming the
    first model input whose config differs from the first model's, and its fields. Fields no
    tensor shows (``n_head`` at the same width, ``rope_theta``) cannot be told from the weights,
    so the output carries the first config and the user must check."""
    first = first_model(inputs)
    for other in inputs:
        if first is None or other.kind != MODEL or other is first:
            continue
        fields = differing_config_fields(first, other)
        if fields:
            return [f"{other.config_path} differs from {first.config_path} ({_shown(fields)}); "
                    f"the output carries the configuration of {first.name}"]
    return []


def with_config_cause(error: MergeInputError, inputs: Sequence[ResolvedInput]) -> MergeInputError:
    """``error``, a refusal of input ``error.ingredient`` against the first input (another tensor
    name or shape, :func:`fedsoup.io.checks.check_compatible`), with the ``config.json`` fields
    in which the two differ added to its reason (``... (their config.json differ in n_layer)``):
    the cause a user can act on, when the tensors only show its effect. ``error`` itself when
    either is no model input or their configs agree; its attributes are kept."""
    if error.ingredient is None or not 0 < error.ingredient < len(inputs):
        return error
    fields = differing_config_fields(inputs[0], inputs[error.ingredient])
    if not fields:
        return error
    return MergeInputError(f"{error.reason} (their config.json differ in {_shown(fields)})",
                           ingredient=error.ingredient, key=error.key, path=error.path, field=error.field)


def _vocabulary(item: ResolvedInput) -> dict[str, Any]:
    """What defines the token <-> id mapping of a model input's tokenizer, by file name
    (:data:`VOCABULARY_FILES`): ``tokenizer.json``'s ``model`` (vocabulary, merges) and
    ``added_tokens`` parsed as JSON, ``added_tokens.json`` parsed, the others' bytes.

    Files are read as carried files are (:func:`_carried_bytes`); one that would be refused
    when carried (a link leading out of the model) is not compared: it is not read here, and a
    merge into a directory refuses it where it is carried.
    """
    root = link_root(item.directory)
    found: dict[str, Any] = {}
    for name in VOCABULARY_FILES:
        try:
            data = _carried_bytes(item.directory / name, root)
        except MergeInputError:
            continue
        if data is None:
            continue
        if name in _VOCABULARY_JSON:
            try:
                parsed = json.loads(data)
            except (UnicodeDecodeError, ValueError):
                parsed = data  # not JSON: compared byte for byte
            fields = _VOCABULARY_JSON[name]
            if fields and isinstance(parsed, dict):
                parsed = {field: parsed.get(field) for field in fields}
            data = parsed
        found[name] = data
    return found


def tokenizer_differences(inputs: Sequence[ResolvedInput]) -> list[str]:
    """The warning a merge of ``inputs`` gives when their tokenizers map ids to other tokens: at
    most one, naming the first model input whose vocabulary files differ from the first model's
    and those files (and how many other inputs differ).

    Row ``i`` of a word embedding stands for token ``i`` of the model's tokenizer: averaging
    models whose tokenizers differ (same size, other vocabularies) averages the rows of
    different tokens, and the output carries the first model's tokenizer. Only what defines
    the mapping is compared (:func:`_vocabulary`), not formatting: the same tokenizer saved by
    two transformers versions (other whitespace, key order, padding or truncation settings)
    gives no warning. A file is compared where both inputs have it; an input without
    tokenizer files is not compared. Given for every merge of models (the embeddings are
    averaged whatever the output), and by ``fedsoup inspect``.
    """
    first = first_model(inputs)
    if first is None:
        return []
    reference = _vocabulary(first)
    differing = []
    for other in inputs:
        if not reference or other.kind != MODEL or other is first:
            continue
        theirs = _vocabulary(other)
        names = [name for name in reference if name in theirs and theirs[name] != reference[name]]
        if names:
            differing.append((other, names))
    if not differing:
        return []
    other, names = differing[0]
    more = f" (and {counted(len(differing) - 1, 'more input')})" if len(differing) > 1 else ""
    files = ", ".join(str(other.directory / name) for name in names)
    return [f"the tokenizer of {other.name} differs from that of {first.name}{more} ({files} against "
            f"{first.directory}'s): the same token id stands for other tokens, so the merge averages the embedding "
            f"rows of different tokens; a directory output carries the tokenizer of {first.name}"]


def files_read(inputs: Sequence[ResolvedInput]) -> list[Path]:
    """What a merge of ``inputs`` reads, and so must never write (docs/design.md §4): each
    input's weights (an index and the shards it lists), and in a model or adapter directory its
    configuration, the files a directory output carries from it (:func:`carried_names`) and the
    directory itself (a model directory output there would replace that model)."""
    paths: list[Path] = []
    for item in inputs:
        paths += [item.weights, *index_shards(item.weights)]
        if item.directory is not None:
            paths.append(item.config_path)
            if item.kind == MODEL:
                paths += [item.directory / name for name in carried_names(item.directory)]
            paths.append(item.directory)
    return list(dict.fromkeys(paths))


def first_model(inputs: Sequence[ResolvedInput]) -> ResolvedInput | None:
    """The first input in a model directory, whose files a directory output carries (``None``: none is)."""
    return next((item for item in inputs if item.kind == MODEL), None)


def uncarried_files(first: ResolvedInput | None) -> list[str]:
    """The files a directory output would carry from ``first``'s model directory (for a warning
    when the output is a single file, which cannot carry them)."""
    if first is None or first.kind != MODEL:
        return []
    return carried_names(first.directory)


def carried_names(directory: Path) -> list[str]:
    """What a directory output carries from the model ``directory``, as names relative to it:
    the :data:`CARRIED_FILES` there, its named chat templates (:func:`chat_template_files`),
    then its custom code (:func:`custom_code_files`).

    Regular files and links: a link is listed wherever it leads, and refused when read
    (:func:`model_directory_files`) unless it leads to a regular file inside the model directory
    (:func:`link_root`); anything else by a carried name (a folder, a FIFO) is skipped.
    """
    return ([name for name in CARRIED_FILES if _listed(directory / name)]
            + chat_template_files(directory) + custom_code_files(directory))


def chat_template_files(directory: Path) -> list[str]:
    """The named chat templates of the model ``directory``: ``additional_chat_templates/<name>.jinja``
    (:data:`CHAT_TEMPLATE_DIR`), sorted, as ``save_pretrained`` writes a tokenizer whose
    ``chat_template`` is a dict and ``from_pretrained`` reads it back.

    The regular ``*.jinja`` files and links (as :func:`carried_names`'s) of that folder itself:
    the folder being a link to a folder, it is not listed (nothing is carried from another folder),
    nor is anything deeper or otherwise named. Raises :class:`~fedsoup.errors.MergeInputError`
    when the folder cannot be listed (as a carried file that cannot be read).
    """
    folder = directory / CHAT_TEMPLATE_DIR
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return []
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    except OSError as error:
        raise MergeInputError(f"cannot read ({one_line(error)})", path=str(folder)) from None
    return sorted(f"{CHAT_TEMPLATE_DIR}/{name}" for name in names
                  if name.endswith(_TEMPLATE_SUFFIX) and _listed(folder / name))


def link_root(directory: Path) -> Path:
    """The folder the links among the carried files of the model ``directory`` may lead into:
    the directory itself, its links resolved; for a Hugging Face cache snapshot
    (``.../models--org--name/snapshots/<revision>/``, every file a link to
    ``../../blobs/<hash>``), the cache's folder of that repository, ``models--org--name``."""
    real = Path(os.path.realpath(directory))
    if real.parent.name == _CACHE_SNAPSHOTS and real.parent.parent.name.startswith(_CACHE_MODEL_PREFIX):
        return real.parent.parent
    return real


def _listed(path: Path) -> bool:
    """Whether a carried name is listed: a regular file, or a link (to be judged when read)."""
    return path.is_symlink() or path.is_file()


def _carried_bytes(path: Path, root: Path) -> bytes | None:
    """The bytes of the carried file ``path``: a regular file, or a link whose fully resolved
    target is a regular file inside ``root`` (:func:`link_root`).

    ``None`` when ``path`` is gone or neither a file nor a link (a folder, a FIFO: skipped).
    A link anywhere else, dangling, or to a folder, pipe or device, is a
    :class:`~fedsoup.errors.MergeInputError` naming the link (``path``), as is an unreadable file.
    """
    if not path.is_symlink():
        return _regular_file_bytes(path)
    target = Path(os.path.realpath(path))
    if not target.is_relative_to(root):
        where = "the Hugging Face cache folder" if root.name.startswith(_CACHE_MODEL_PREFIX) else "the model directory"
        raise MergeInputError(f"links to {str(target)!r}, outside {where} {root} (a carried file's link is "
                              f"followed only inside it, so that no other file of yours reaches the merged "
                              f"model): {_LINK_ADVICE}", path=str(path))
    try:
        data = _regular_file_bytes(target)
    except MergeInputError as error:
        raise error.at(path=str(path)) from None
    if data is None:
        what = ("which does not exist" if not os.path.lexists(target) else "a loop of links" if target.is_symlink()
                else "which is not a regular file")
        raise MergeInputError(f"links to {str(target)!r}, {what}: {_LINK_ADVICE}", path=str(path))
    return data


def _regular_file_bytes(path: Path) -> bytes | None:
    """The bytes of ``path`` if it is a regular file (not a link), else ``None``.

    Checked on the open file, so that something swapped in since it was listed (a FIFO,
    which a plain read would wait on forever; a link) is never read. An unreadable file is a
    :class:`~fedsoup.errors.MergeInputError` naming it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:  # a link (O_NOFOLLOW)
            return None
        raise MergeInputError(f"cannot read ({one_line(error)})", path=str(path)) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # (before a file object: a folder has none)
            return None
        with os.fdopen(fd, "rb") as handle:
            fd = None  # the handle's now
            return handle.read()
    except OSError as error:
        raise MergeInputError(f"cannot read ({one_line(error)})", path=str(path)) from None
    finally:
        if fd is not None:
            os.close(fd)


def custom_code_files(directory: Path) -> list[str]:
    """The Python files beside a model that ``from_pretrained(..., trust_remote_code=True)`` needs.

    Those are the modules the ``auto_map`` of its configuration files names
    (``"AutoModelForCausalLM": "modeling_x.XModel"``: ``modeling_x.py``; not
    ``"org/repo--modeling_x.XModel"``, code of another repository), and the modules they import
    relatively (``from .configuration_x import XConfig``), as ``save_pretrained`` copies them.
    Other Python files (a training script beside the model) are not the model's. Sorted names.
    A file that is a link is read (for its names) only where it would be carried
    (:func:`link_root`); it is listed all the same, to be refused when carried.
    """
    root = link_root(directory)
    pending = []
    for config_name in _AUTO_MAP_FILES:
        try:
            config = json.loads(_carried_bytes(directory / config_name, root) or b"{}")
        except (MergeInputError, UnicodeDecodeError, ValueError):
            continue  # carried as it is (or refused when read as the config): transformers reads it as it can
        auto_map = config.get("auto_map") if isinstance(config, dict) else None
        for value in auto_map.values() if isinstance(auto_map, dict) else ():
            for reference in value if isinstance(value, list) else [value]:  # (a tokenizer's: [slow, fast])
                module = reference.rpartition(".")[0] if isinstance(reference, str) else ""
                if module.isidentifier():
                    pending.append(module + ".py")
    found: list[str] = []
    while pending:
        name = pending.pop()
        if name in found or not _listed(directory / name):
            continue
        found.append(name)
        try:
            source = (_carried_bytes(directory / name, root) or b"").decode("utf-8")
        except (MergeInputError, UnicodeDecodeError):
            continue  # carried byte for byte; its own imports are for transformers to report
        pending += [(module or bare) + ".py" for module, bare in _RELATIVE_IMPORT.findall(source)]
    return sorted(found)
