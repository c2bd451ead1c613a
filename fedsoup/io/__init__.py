"""Checkpoint files in and out.

- :mod:`~fedsoup.io.formats`: suffixes, dtype codes, :class:`TensorInfo`.
- :mod:`~fedsoup.io.npy`: the ``.npy`` header reader and zero-copy view (also used by the strategy).
- :mod:`~fedsoup.io.readers`: lazy readers for safetensors (single or sharded), ``.pt``
  (``torch.load(weights_only=True)`` only), ``.npz``.
- :mod:`~fedsoup.io.resolve`: what an input path means (directory, index, weights file) and
  the Hugging Face directory beside it; :func:`open_checkpoint`.
- :mod:`~fedsoup.io.checks`: structure checks across opened checkpoints, from headers, and
  the tied copies (GPT-2's ``lm_head.weight``) some inputs hold and others leave out.
- :mod:`~fedsoup.io.layout`: the output's file names (single file, shards + index, directory).
- :mod:`~fedsoup.io.writer`: the streaming, atomic writer :func:`write_checkpoint`.
- :mod:`~fedsoup.io.hf`: Hugging Face model directories (config and tokenizer carried over).

(The training-state checkpoints of the Flower strategy are :mod:`fedsoup.state`.)
"""

from fedsoup.io.checks import check_compatible, check_finite, differences, tied_copies
from fedsoup.io.formats import DTYPE_NAMES, SAFETENSORS_SUFFIX, TORCH_SUFFIXES, TensorInfo
from fedsoup.io.hf import is_model_directory, model_directory_files
from fedsoup.io.layout import OutputLayout, output_exists
from fedsoup.io.npy import npy_view, read_npy_header
from fedsoup.io.readers import (
    Checkpoint,
    InMemoryCheckpoint,
    NpzCheckpoint,
    SafetensorsCheckpoint,
    ShardedCheckpoint,
    unwrap_state_dict,
    without_tensors,
)
from fedsoup.io.resolve import ResolvedInput, expand_inputs, load_state_dict, open_checkpoint, resolve_input
from fedsoup.io.writer import check_keeps_inputs, parse_size, plan_shards, write_checkpoint

__all__ = [
    "TensorInfo",
    "Checkpoint",
    "SafetensorsCheckpoint",
    "InMemoryCheckpoint",
    "NpzCheckpoint",
    "ShardedCheckpoint",
    "open_checkpoint",
    "resolve_input",
    "ResolvedInput",
    "load_state_dict",
    "unwrap_state_dict",
    "expand_inputs",
    "check_compatible",
    "differences",
    "tied_copies",
    "without_tensors",
    "check_finite",
    "read_npy_header",
    "npy_view",
    "OutputLayout",
    "output_exists",
    "write_checkpoint",
    "check_keeps_inputs",
    "plan_shards",
    "parse_size",
    "is_model_directory",
    "model_directory_files",
    "DTYPE_NAMES",
    "SAFETENSORS_SUFFIX",
    "TORCH_SUFFIXES",
]
