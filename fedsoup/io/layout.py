"""Where an output checkpoint goes: one file, or shards plus an index (Hugging Face's names)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fedsoup.errors import OptionError
from fedsoup.io.formats import INDEX_SUFFIX, SAFETENSORS_SUFFIX, TORCH_SUFFIXES

__all__ = ["OutputLayout", "output_exists", "shard_file_name"]

# The weights file of a model directory, as transformers' save_pretrained names it.
HF_WEIGHTS_NAME = "model" + SAFETENSORS_SUFFIX


def shard_file_name(stem: str, index: int, count: int) -> str:
    """``model-00001-of-00003.safetensors``, Hugging Face's shard naming."""
    return f"{stem}-{index:05d}-of-{count:05d}{SAFETENSORS_SUFFIX}"


@dataclass(frozen=True)
class OutputLayout:
    """Where a checkpoint goes: the main file, or its shards plus an index."""

    target: Path  # what the user named (a file, or a directory for Hugging Face layout)
    main: Path  # the single-file path (e.g. out/model.safetensors)
    index: Path  # the index path used when sharded (main + ".index.json")
    kind: str  # "safetensors" or "torch"

    @property
    def is_directory(self) -> bool:
        """True when the output is a model directory (``model.safetensors`` inside it)."""
        return self.target != self.main

    @staticmethod
    def of(output: str | os.PathLike[str]) -> OutputLayout:
        as_directory = str(output).endswith(("/", os.sep))
        output = Path(output)
        suffix = "" if as_directory else output.suffix.lower()
        if suffix in TORCH_SUFFIXES:
            return OutputLayout(output, output, output, "torch")
        if suffix == SAFETENSORS_SUFFIX:
            return OutputLayout(output, output, output.with_name(output.name + INDEX_SUFFIX), "safetensors")
        if suffix and not output.is_dir():
            raise OptionError(
                "output", str(output),
                f"{output}: unknown output format {suffix!r}; use .safetensors, .pt/.pth/.bin, "
                f"or a directory (written as model.safetensors, sharded when large); for a directory, "
                f"end its name with /: -o {output}/",
            )
        main = output / HF_WEIGHTS_NAME
        return OutputLayout(output, main, main.with_name(main.name + INDEX_SUFFIX), "safetensors")

    def existing(self) -> list[Path]:
        """Files of a previous checkpoint at this destination."""
        found = [p for p in (self.main, self.index) if p.is_file()]
        return list(dict.fromkeys(found))

    def shard_path(self, index: int, count: int) -> Path:
        return self.main.with_name(shard_file_name(self.main.name[: -len(SAFETENSORS_SUFFIX)], index, count))


def output_exists(output: str | os.PathLike[str]) -> bool:
    return bool(OutputLayout.of(output).existing())
