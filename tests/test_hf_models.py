"""Language models saved by transformers, in every Hugging Face form, merged into models that load.

Tiny GPT-2 and Llama models are built from configs with random weights (no hub).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers

import fedsoup
from fedsoup import cli
from fedsoup import io as fio
from fedsoup.errors import MergeInputError, MergeWarning
from tests.hf_helpers import (byte_tokenizer, correctly_rounded_mean, logits, save_in_form, state_dict_as_saved,
                              tiny_model)

IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
FORMS = ("dir", "safetensors", "sharded", "index", "bin", "bin-index")


def save_clients(tmp_path: Path, arch: str, form: str, dtype=torch.bfloat16, n=3, tokenizer=True):
    models, inputs = [], []
    for i in range(n):
        model = tiny_model(arch, seed=i, dtype=dtype)
        inputs.append(save_in_form(model, tmp_path / f"client{i}", form, byte_tokenizer() if tokenizer and i == 0 else None))
        models.append(model)
    return models, inputs


def reference_model(out: Path, states: list[dict[str, torch.Tensor]]):
    """The merged model's architecture (loaded as from_pretrained builds it: buffers such as
    Llama's rotary frequencies stay float32) holding the hand-computed, correctly rounded soup."""
    reference = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    merged = {key: correctly_rounded_mean([state[key] for state in states]) for key in states[0]}
    missing, unexpected = reference.load_state_dict(merged, strict=False)
    assert not unexpected and all(key in ("lm_head.weight",) for key in missing)
    reference.tie_weights()
    return reference


@pytest.mark.parametrize(("arch", "form"), [("gpt2", form) for form in FORMS] + [("llama", "dir"), ("llama", "index"),
                                                                                 ("llama", "bin")])
def test_every_input_form_merges_into_a_model_directory_that_loads(tmp_path, arch, form):
    models, inputs = save_clients(tmp_path, arch, form)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)
        out = fedsoup.merge_files(inputs, tmp_path / "out")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("hi")["input_ids"] == byte_tokenizer()("hi")["input_ids"]
    states = [fio.load_state_dict(path) for path in inputs]
    # The weights are the exact mean rounded once, so the logits are those of the hand-computed soup.
    assert torch.equal(logits(merged, IDS), logits(reference_model(out, states), IDS))


@pytest.mark.parametrize("low_memory", [False, True], ids=["in-memory", "low-memory"])
def test_inputs_in_different_forms_merge_together(tmp_path, low_memory):
    forms = ["index", "safetensors", "bin-index", "dir"]
    inputs = [save_in_form(tiny_model("llama", i, torch.bfloat16), tmp_path / f"client{i}", form,
                           byte_tokenizer() if i == 0 else None) for i, form in enumerate(forms)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)  # the configs agree, whichever form saved them
        out = fedsoup.merge_files(inputs, tmp_path / "out", low_memory=low_memory)
    states = [fio.load_state_dict(path) for path in inputs]
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert transformers.AutoTokenizer.from_pretrained(out)("hi")["input_ids"] == byte_tokenizer()("hi")["input_ids"]
    assert torch.equal(logits(merged, IDS), logits(reference_model(out, states), IDS))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("low_memory", [False, True], ids=["in-memory", "low-memory"])
def test_llama_soup_is_correctly_rounded(tmp_path, dtype, low_memory):
    models, inputs = save_clients(tmp_path, "llama", "dir", dtype=dtype, tokenizer=False)
    out = fedsoup.merge_files(inputs, tmp_path / "out", low_memory=low_memory)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == dtype
    states = [fio.load_state_dict(path) for path in inputs]
    written = fio.load_state_dict(out)
    for key in states[0]:
        assert torch.equal(written[key].view(torch.int16), correctly_rounded_mean([s[key] for s in states]).view(torch.int16)), key
    assert torch.equal(logits(merged, IDS), logits(reference_model(out, states), IDS))


@pytest.mark.slow
def test_the_rounding_paragraph_of_docs_cli_gives_what_the_old_float32_soup_left_off(tmp_path):
    """docs/cli.md's figures for the soup before exact rounding, recomputed by re-running the
    old code (benchmarks/old_soup_rounding.py). Before: the paragraph said 69 (bf16) and 56
    (fp16); the old code leaves 80 and 68 here (torch fuses its add_(alpha=) on a CPU with FMA)."""
    from benchmarks.old_soup_rounding import old_weighted_sum, products_rounded_first, tally

    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the figures are of torch's x86 kernels, whose add_(alpha=) fuses multiply and add")
    counts = {}
    for dtype in (torch.bfloat16, torch.float16):
        _, inputs = save_clients(tmp_path / str(dtype), "llama", "dir", dtype=dtype, tokenizer=False)
        states = [fio.load_state_dict(path) for path in inputs]
        counts[dtype] = [tally(states, formula, dtype) for formula in (old_weighted_sum, products_rounded_first)]
    (elements, bf16_off, bf16_unit, bf16_tie, bf16_zero), (_, bf16_first, *_) = counts[torch.bfloat16]
    (_, fp16_off, fp16_unit, fp16_tie, _), (_, fp16_first, *_) = counts[torch.float16]
    assert bf16_unit == bf16_tie and bf16_unit + bf16_zero == bf16_off and fp16_unit == fp16_tie == fp16_off
    paragraph = " ".join((Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text().split())
    for said in (f"left {bf16_off} of the {elements:,} elements", f"in bf16 ({bf16_unit} one unit off",
                 f"and {bf16_zero} whose exact mean is 0", f"and {fp16_off} in fp16",
                 f"gives {bf16_first} and {fp16_first}"):
        assert said in paragraph, said


def test_weights_files_given_and_a_single_file_output_warns_what_is_not_carried(tmp_path):
    _, inputs = save_clients(tmp_path, "gpt2", "safetensors")
    with pytest.warns(MergeWarning, match=r"single weights file: config.json, generation_config.json, tokenizer.json"
                                          r".* give a directory as the output"):
        fedsoup.merge_files(inputs, tmp_path / "soup.safetensors")
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("form", ["safetensors", "index", "bin-index"])
def test_cli_from_weights_files_writes_a_model_directory_or_warns_for_a_single_file(tmp_path, capsys, form):
    _, inputs = save_clients(tmp_path, "llama", form, dtype=torch.float16)
    states = [fio.load_state_dict(path) for path in inputs]
    capsys.readouterr()
    out = tmp_path / "out"
    assert cli.main(["merge", *inputs, "-o", str(out), "--low-memory"]) == 0
    assert capsys.readouterr().err == ""
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.float16 and json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert transformers.AutoTokenizer.from_pretrained(out)("hi")["input_ids"] == byte_tokenizer()("hi")["input_ids"]
    assert torch.equal(logits(merged, IDS), logits(reference_model(out, states), IDS))

    single = tmp_path / "soup.safetensors"
    capsys.readouterr()  # transformers' loading bars
    assert cli.main(["merge", *inputs, "-o", str(single)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fedsoup: warning: the output {single} is a single weights file: "
                                               f"config.json, generation_config.json, tokenizer.json, "
                                               f"tokenizer_config.json of {tmp_path / 'client0'} are not carried"), err
    assert err[0].endswith(f"give a directory as the output (-o {tmp_path / 'soup'}/) to write a model directory "
                           f"that loads"), err
    written, expected = fio.load_state_dict(single), fio.load_state_dict(out)
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "soup").exists()


def test_a_directory_output_with_a_dot_in_its_name_is_told_how_to_be_named(tmp_path, capsys):
    _, inputs = save_clients(tmp_path, "gpt2", "dir", n=2, tokenizer=False)
    dotted = tmp_path / "gpt2-0.5-merged"  # as models are named (Qwen2.5-7B, Llama-3.2-1B)
    capsys.readouterr()
    assert cli.main(["merge", *inputs, "-o", str(dotted)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(f"for a directory, end its name with /: -o {dotted}/"), err
    assert not dotted.exists()
    assert cli.main(["merge", *inputs, "-o", f"{dotted}/", "-q"]) == 0
    assert transformers.AutoModelForCausalLM.from_pretrained(dotted).config.model_type == "gpt2"


def test_the_files_are_carried_from_the_first_input_in_a_model_directory(tmp_path):
    """A bare weights file first (a previous soup, a file copied out of its folder), model
    directories after it: the output is still a model directory (it was weights alone, exit 0)."""
    _, inputs = save_clients(tmp_path, "gpt2", "dir", n=2)
    bare = tmp_path / "previous-soup.safetensors"
    bare.write_bytes((Path(inputs[0]) / "model.safetensors").read_bytes())
    out = fedsoup.merge_files([str(bare), inputs[1]], tmp_path / "out")
    assert {"config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.model_type == "gpt2"
    with pytest.warns(MergeWarning, match=r"config.json, generation_config.json of \S*client1 are not carried"):
        fedsoup.merge_files([str(bare), inputs[1]], tmp_path / "soup.safetensors")


def test_one_shard_named_alone_is_refused(tmp_path):
    _, inputs = save_clients(tmp_path, "gpt2", "sharded", n=2)
    shard = Path(inputs[0]) / "model-00001-of-00002.safetensors"
    if not shard.is_file():
        shard = sorted(Path(inputs[0]).glob("model-00001-of-*.safetensors"))[0]
    with pytest.raises(MergeInputError, match="one shard of .*model.safetensors.index.json") as caught:
        fedsoup.merge_files([str(shard), inputs[1]], tmp_path / "out")
    assert caught.value.path == str(shard)
    assert not (tmp_path / "out").exists()


def test_resolve_input_maps_every_form_to_its_model_directory(tmp_path):
    for form in FORMS:
        model = tiny_model("gpt2", seed=0)
        path = save_in_form(model, tmp_path / form, form)
        resolved = fio.resolve_input(path)
        assert resolved.kind == "model" and resolved.directory == tmp_path / form, form
        assert resolved.weights.name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                         "pytorch_model.bin.index.json"), form
    bare = tmp_path / "bare.safetensors"
    fio.write_checkpoint(bare, {"w": fio.TensorInfo((2,), torch.float32)}, {"w": torch.ones(2)}.__getitem__)
    assert fio.resolve_input(bare).kind == "weights" and fio.resolve_input(bare).directory is None


# ------------------------------------------------------------------------- named chat templates

CHAT_TEMPLATES = {
    "default": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
    "tool_use": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}[tools]",
}
MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def _templated_clients(tmp_path: Path) -> list[str]:
    """Two tiny GPT-2 directories, the first with a tokenizer holding a default and a named chat
    template (transformers saves the named one as additional_chat_templates/tool_use.jinja)."""
    _, inputs = save_clients(tmp_path, "gpt2", "dir", n=2, tokenizer=False)
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = dict(CHAT_TEMPLATES)
    tokenizer.save_pretrained(inputs[0])
    assert (Path(inputs[0]) / "additional_chat_templates" / "tool_use.jinja").is_file()  # the layout carried
    assert transformers.AutoTokenizer.from_pretrained(inputs[0]).chat_template == CHAT_TEMPLATES
    return inputs


def _assert_templates_load(out: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHAT_TEMPLATES
    assert tokenizer.apply_chat_template(MESSAGES, chat_template="tool_use", tokenize=False) \
        == "<user>hi</user><assistant>yo</assistant>[tools]"
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False) == "user: hi\nassistant: yo\n"


def test_named_chat_templates_are_carried(tmp_path, capsys):
    """Before: only the default template (chat_template.jinja) reached the output; the tokenizer
    loaded from it had lost "tool_use" (its chat_template a str, not the input's dict)."""
    inputs = _templated_clients(tmp_path)
    template = Path(inputs[0]) / "additional_chat_templates" / "tool_use.jinja"
    for low_memory in (False, True):
        out = fedsoup.merge_files(inputs, tmp_path / f"out-{low_memory}", low_memory=low_memory)
        assert sorted(p.name for p in (out / "additional_chat_templates").iterdir()) == ["tool_use.jinja"]
        assert (out / "additional_chat_templates" / "tool_use.jinja").read_bytes() == template.read_bytes()
        _assert_templates_load(out)
    capsys.readouterr()
    assert cli.main(["merge", *inputs, "-o", str(tmp_path / "cli") + "/", "-q"]) == 0
    _assert_templates_load(tmp_path / "cli")
    with pytest.warns(MergeWarning, match=r"single weights file: config.json, .*chat_template.jinja, "
                                          r"additional_chat_templates/tool_use.jinja of \S*client0 are not carried"):
        fedsoup.merge_files(inputs, tmp_path / "soup.safetensors")


def test_named_chat_templates_are_carried_into_a_base_model(tmp_path):
    """A LoRA merge into the base writes the base's files: its named templates too."""
    from tests.lora_helpers import gpt2_base, make_adapter

    base = tmp_path / "base"
    gpt2_base().save_pretrained(str(base))
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = dict(CHAT_TEMPLATES)
    tokenizer.save_pretrained(base)
    adapters = [str(make_adapter(tmp_path / f"a{i}", "gpt2", seed=i)) for i in range(2)]
    out = fedsoup.merge_files(adapters, tmp_path / "merged", base=str(base))
    assert (out / "additional_chat_templates" / "tool_use.jinja").read_bytes() \
        == (base / "additional_chat_templates" / "tool_use.jinja").read_bytes()
    _assert_templates_load(out)


def test_only_regular_template_files_of_the_templates_folder_itself_are_carried(tmp_path):
    """As for tokenizer.json: a link to a regular file inside the model directory is followed
    (links elsewhere are refused: test_every_link_that_is_not_to_a_regular_file_inside_is_refused),
    anything else (a folder, a FIFO, a file not named *.jinja) is skipped; and a templates folder
    that is itself a link is not listed."""
    inputs = _templated_clients(tmp_path)
    folder = Path(inputs[0]) / "additional_chat_templates"
    blob = Path(inputs[0]) / "blobs" / "0123abcd"
    blob.parent.mkdir()
    blob.write_text("{{ messages | length }} messages")
    (folder / "linked.jinja").symlink_to(blob)
    (folder / "sub.jinja").mkdir()
    os.mkfifo(folder / "pipe.jinja")  # opened, it would block the merge forever
    (folder / "notes.txt").write_text("not a template")
    out = fedsoup.merge_files(inputs, tmp_path / "out")
    assert sorted(p.name for p in (out / "additional_chat_templates").iterdir()) == ["linked.jinja", "tool_use.jinja"]
    assert not (out / "additional_chat_templates" / "linked.jinja").is_symlink()
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == {**CHAT_TEMPLATES,
                                                                             "linked": blob.read_text()}

    elsewhere = tmp_path / "elsewhere"
    folder.rename(elsewhere)
    folder.symlink_to(elsewhere, target_is_directory=True)
    out = fedsoup.merge_files(inputs, tmp_path / "out-linked-folder")
    assert not (out / "additional_chat_templates").exists()
    assert (out / "chat_template.jinja").is_file()


# ------------------------------------------------------------------------- refused inputs


def _cli_refuses(inputs, out: Path, capsys, match: str, *options: str) -> None:
    """``fedsoup merge`` exits 2 with one line matching ``match``, into a directory and into a
    single file, in memory and tensor by tensor, and writes nothing."""
    capsys.readouterr()  # what saving the models printed
    for output in (out, out.with_name(out.name + ".safetensors")):
        for mode in ("--in-memory", "--low-memory"):
            assert cli.main(["merge", *inputs, "-o", str(output), mode, *options]) == 2, (output, mode)
            captured = capsys.readouterr()
            err = captured.err.strip().splitlines()
            assert len(err) == 1 and re.search(match, err[0]) and not captured.out, (output, mode, err)
            assert not output.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(("out", ".out"))]


def test_models_of_different_architectures_are_refused(tmp_path, capsys):
    gpt2 = save_in_form(tiny_model("gpt2", 0), tmp_path / "gpt2", "dir")
    llama = save_in_form(tiny_model("llama", 1), tmp_path / "llama", "dir")
    with pytest.raises(MergeInputError, match=r"model_type 'llama'.* not 'gpt2'") as caught:
        fedsoup.merge_files([gpt2, llama], tmp_path / "out")
    assert caught.value.path == llama and caught.value.ingredient == 1
    _cli_refuses([gpt2, llama], tmp_path / "out", capsys, r"model_type 'llama'")


def _model_and_adapter(tmp_path: Path) -> tuple[str, str]:
    model = save_in_form(tiny_model("gpt2", 0), tmp_path / "model", "dir")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    fio.write_checkpoint(adapter / "adapter_model.safetensors", {"a": fio.TensorInfo((2, 2), torch.float32)},
                         {"a": torch.ones(2, 2)}.__getitem__)
    return model, str(adapter)


def test_a_model_beside_an_adapter_is_refused(tmp_path, capsys):
    model, adapter = _model_and_adapter(tmp_path)
    with pytest.raises(MergeInputError, match="is a PEFT adapter") as caught:
        fedsoup.merge_files([model, str(adapter)], tmp_path / "out")
    assert caught.value.path == adapter
    _cli_refuses([model, adapter], tmp_path / "out", capsys, "is a PEFT adapter")


@pytest.mark.parametrize("order", ["model-first", "adapter-first"])
def test_inspect_of_a_model_and_an_adapter_gives_the_refusal_alone(tmp_path, capsys, order):
    model, adapter = _model_and_adapter(tmp_path)
    inputs = [model, adapter] if order == "model-first" else [adapter, model]
    report = fedsoup.inspect_files(inputs)
    # comparing an adapter's tensors with a model's, name by name, says nothing the refusal does not
    assert len(report["refusals"]) == 1 and "is a PEFT adapter" in report["refusals"][0]
    assert report["differences"] == [] and report["mergeable"] is False
    capsys.readouterr()
    assert cli.main(["inspect", "--summary", *inputs]) == 1
    lines = capsys.readouterr().out.splitlines()
    verdict = next(i for i, line in enumerate(lines) if "mergeable" in line)
    assert lines[verdict].startswith("not mergeable: ") and "is a PEFT adapter" in lines[verdict]
    assert verdict == len(lines) - 1, lines[verdict:]  # (it was followed by 29 "missing" tensors)


def test_a_directory_without_weights_is_refused(tmp_path, capsys):
    model = save_in_form(tiny_model("gpt2", 0), tmp_path / "model", "dir")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    _cli_refuses([model, str(empty)], tmp_path / "out", capsys, r"empty: directory holds no checkpoint")


def _gptq_like(folder: Path, seed: int, config: dict | None) -> str:
    """A GPTQ/AWQ-style layout: packed int32 qweight/qzeros beside fp16 scales."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "model.layers.0.mlp.down_proj.qweight": torch.randint(0, 2**31 - 1, (4, 16), generator=generator, dtype=torch.int32),
        "model.layers.0.mlp.down_proj.qzeros": torch.randint(0, 2**31 - 1, (1, 2), generator=generator, dtype=torch.int32),
        "model.layers.0.mlp.down_proj.scales": torch.rand(1, 16, generator=generator).half(),
        "model.norm.weight": torch.ones(16, dtype=torch.float16),
    }
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    infos = {k: fio.TensorInfo(tuple(v.shape), v.dtype) for k, v in tensors.items()}
    fio.write_checkpoint(folder / "model.safetensors", infos, tensors.__getitem__)
    return str(folder / "model.safetensors")


@pytest.mark.parametrize("declared", [True, False], ids=["config", "layout-only"])
def test_quantized_checkpoints_are_refused(tmp_path, capsys, declared):
    config = {"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4}} if declared else None
    inputs = [_gptq_like(tmp_path / f"q{i}", i, config) for i in range(2)]
    match = r"declares quantization_config 'gptq'" if declared else r"quantized layout \(GPTQ/AWQ\)"
    with pytest.raises(MergeInputError, match=match + ".*dequantize first") as caught:
        fedsoup.merge_files(inputs, tmp_path / "out")
    assert caught.value.path == inputs[0] and caught.value.ingredient == 0
    if not declared:
        assert caught.value.key == "model.layers.0.mlp.down_proj.qweight"
    _cli_refuses(inputs, tmp_path / "out", capsys, match)


def _quantization_config(method: str) -> dict:
    """``quantization_config`` as the quantizers' ``save_pretrained`` write it (abridged)."""
    return {
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
        "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True},
        "bnb-4bit": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
        "bnb-8bit": {"quant_method": "bitsandbytes", "load_in_8bit": True},
        "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    }[method]


@pytest.mark.parametrize("method", ["gptq", "awq", "bnb-4bit", "bnb-8bit", "fp8"])
@pytest.mark.parametrize("form", ["dir", "safetensors"])
def test_a_model_directory_declaring_quantization_is_refused(tmp_path, capsys, method, form):
    inputs = []
    for i in range(2):
        path = save_in_form(tiny_model("llama", i, torch.bfloat16), tmp_path / f"client{i}", form)
        config_path = tmp_path / f"client{i}" / "config.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, "quantization_config": _quantization_config(method)}))
        inputs.append(path)
    declared = _quantization_config(method)["quant_method"]
    with pytest.raises(MergeInputError, match=f"declares quantization_config '{declared}'.*dequantize first") as caught:
        fedsoup.merge_files(inputs, tmp_path / "out")
    assert caught.value.path == inputs[0] and caught.value.ingredient == 0
    _cli_refuses(inputs, tmp_path / "out", capsys, f"^fedsoup: error: {re.escape(inputs[0])}: .*declares "
                                                    f"quantization_config '{declared}'.*dequantize first")


def test_models_of_the_same_type_and_other_shapes_are_refused(tmp_path, capsys):
    small = save_in_form(tiny_model("gpt2", 0), tmp_path / "small", "dir")
    config = tiny_model("gpt2", 0).config
    config.n_embd = 32
    torch.manual_seed(1)
    wide = save_in_form(transformers.AutoModelForCausalLM.from_config(config), tmp_path / "wide", "dir")
    _cli_refuses([small, wide], tmp_path / "out", capsys, r"wide, tensor '[^']+': has shape .*but .*small has")


def test_fp8_with_scales_is_refused(tmp_path):
    inputs = []
    for i in range(2):
        tensors = {"layer.weight": (torch.randn(4, 4) * (i + 1)).to(torch.float8_e4m3fn),
                   "layer.weight_scale_inv": torch.ones(1, 1)}
        path = tmp_path / f"fp8_{i}.safetensors"
        fio.write_checkpoint(path, {k: fio.TensorInfo(tuple(v.shape), v.dtype) for k, v in tensors.items()},
                             tensors.__getitem__)
        inputs.append(str(path))
    with pytest.raises(MergeInputError, match=r"quantized layout \(FP8\)") as caught:
        fedsoup.merge_files(inputs, tmp_path / "out")
    assert caught.value.key == "layer.weight_scale_inv"


def test_fp8_model_directories_without_scales_merge_into_a_directory_that_loads_as_the_inputs_do(tmp_path):
    """FP8 weights with no scale tensors and no quantization_config are plain weights: merged and
    written back in FP8, correctly rounded. transformers cannot build a model in FP8; it casts
    them to the config's dtype when loading, so that dtype must stay as the inputs have it."""
    inputs, states = [], []
    for i in range(3):
        folder = tmp_path / f"client{i}"
        model = tiny_model("llama", seed=i)
        model.config.save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "dtype": "float32"}))
        state = {k: v.to(torch.float8_e4m3fn) for k, v in state_dict_as_saved(model).items()}
        fio.write_checkpoint(folder / "model.safetensors", {k: fio.TensorInfo(tuple(v.shape), v.dtype)
                                                            for k, v in state.items()}, state.__getitem__)
        inputs.append(str(folder))
        states.append(state)
    assert transformers.AutoModelForCausalLM.from_pretrained(inputs[0]).dtype == torch.float32  # the inputs load
    out = fedsoup.merge_files(inputs, tmp_path / "out")
    written = fio.load_state_dict(out)
    for key in states[0]:
        assert written[key].dtype == torch.float8_e4m3fn
        assert torch.equal(written[key].float(), correctly_rounded_mean([s[key] for s in states]).float()), key
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # (config dtype float8_e4m3fn: it failed)
    reference = transformers.AutoModelForCausalLM.from_pretrained(inputs[0]).eval()
    hand = {key: correctly_rounded_mean([s[key] for s in states]).float() for key in states[0]}
    assert not reference.load_state_dict(hand, strict=False).unexpected_keys
    assert merged.dtype == torch.float32 and torch.equal(logits(merged, IDS), logits(reference, IDS))


# ------------------------------------------------------------------------- custom code (trust_remote_code)

CUSTOM_CONFIG = '''from transformers import GPT2Config


class TinyCustomConfig(GPT2Config):
    model_type = "tiny-custom-gpt2"
'''
CUSTOM_MODEL = '''from transformers import GPT2LMHeadModel

from .configuration_tiny_custom import TinyCustomConfig
from .layers_tiny_custom import SCALE  # a module only imported, named by no auto_map


class TinyCustomModel(GPT2LMHeadModel):
    config_class = TinyCustomConfig
'''


def _custom_code_model(folder: Path, seed: int) -> str:
    """A model whose config.json names its classes in Python files beside it (``auto_map``), as
    models needing ``trust_remote_code=True`` are saved."""
    tiny_model("gpt2", seed).save_pretrained(folder)
    (folder / "configuration_tiny_custom.py").write_text(CUSTOM_CONFIG)
    (folder / "modeling_tiny_custom.py").write_text(CUSTOM_MODEL)
    (folder / "layers_tiny_custom.py").write_text("SCALE = 1.0\n")
    (folder / "train.py").write_text("raise SystemExit('a script of the user, not of the model')\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tiny-custom-gpt2", auto_map={
        "AutoConfig": "configuration_tiny_custom.TinyCustomConfig",
        "AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """transformers copies remote code into its modules cache: one of the test's own."""
    import sys

    from transformers import dynamic_module_utils

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))


def test_the_custom_code_a_config_names_is_carried(tmp_path, capsys, modules_cache):
    inputs = [_custom_code_model(tmp_path / f"client{i}", i) for i in range(2)]
    code = ["configuration_tiny_custom.py", "layers_tiny_custom.py", "modeling_tiny_custom.py"]
    assert type(transformers.AutoModelForCausalLM.from_pretrained(inputs[0], trust_remote_code=True)).__name__ \
        == "TinyCustomModel"  # the inputs load
    out = fedsoup.merge_files(inputs, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".py") == code  # (none were: from_pretrained failed)
    for name in code:
        assert (out / name).read_bytes() == (Path(inputs[0]) / name).read_bytes()
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(merged).__name__ == "TinyCustomModel"
    states = [fio.load_state_dict(path) for path in inputs]
    soup = fio.load_state_dict(out)
    assert torch.equal(soup["transformer.wte.weight"], fedsoup.merge(states)["transformer.wte.weight"])
    with pytest.warns(MergeWarning, match=r"single weights file: config.json, generation_config.json, "
                                          r"configuration_tiny_custom.py, layers_tiny_custom.py, "
                                          r"modeling_tiny_custom.py of .*client0 are not carried"):
        fedsoup.merge_files(inputs, tmp_path / "soup.safetensors")


# ------------------------------------------------------------------------- tied embeddings

TIED, TIE = "lm_head.weight", "transformer.wte.weight"  # GPT-2's output layer is its input embedding


def _gpt2_inputs(tmp_path: Path, forms, dtype=torch.bfloat16) -> list[str]:
    """GPT-2 models (``tie_word_embeddings``, the default) saved in ``forms``; the first with a tokenizer."""
    return [save_in_form(tiny_model("gpt2", i, dtype), tmp_path / f"client{i}", form,
                         byte_tokenizer() if i == 0 else None) for i, form in enumerate(forms)]


def _without_tied_copy(path: str) -> dict[str, torch.Tensor]:
    state = fio.load_state_dict(path)
    state.pop(TIED, None)
    return state


@pytest.mark.parametrize("forms", [("bin-tied", "safetensors", "bin-tied"), ("safetensors", "bin-tied", "dir")],
                         ids=["bin-first", "safetensors-first"])
@pytest.mark.parametrize("low_memory", [False, True], ids=["in-memory", "low-memory"])
def test_a_bin_holding_the_tied_lm_head_merges_with_safetensors_that_leave_it_out(tmp_path, forms, low_memory):
    """save_pretrained leaves GPT-2's lm_head.weight (which is transformer.wte.weight) out of
    safetensors; torch.save(model.state_dict()) holds it. The merge leaves the tied copy out, as
    save_pretrained does, and from_pretrained ties it back. (Refused before: "missing".)"""
    inputs = _gpt2_inputs(tmp_path, forms)
    holding = fio.load_state_dict(inputs[forms.index("bin-tied")])
    assert torch.equal(holding[TIED], holding[TIE])  # the .bin holds the tied copy
    assert TIED not in fio.load_state_dict(inputs[forms.index("safetensors")])  # safetensors leave it out
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)
        out = fedsoup.merge_files(inputs, tmp_path / "out", low_memory=low_memory)
    states = [_without_tied_copy(path) for path in inputs]
    assert fio.load_state_dict(out).keys() == states[0].keys()  # as save_pretrained writes it
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()  # tied back
    assert merged.dtype == torch.bfloat16
    assert torch.equal(logits(merged, IDS), logits(reference_model(out, states), IDS))


def test_cli_merges_a_tied_bin_with_safetensors_into_a_model_directory(tmp_path, capsys):
    inputs = _gpt2_inputs(tmp_path, ("bin-tied", "safetensors"))
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli.main(["merge", *inputs, "-o", f"{out}/"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and inputs[0] in err[0] and f"'{TIED}'" in err[0] and f"'{TIE}'" in err[0], err
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    states = [_without_tied_copy(path) for path in inputs]
    assert torch.equal(logits(merged, IDS), logits(reference_model(out, states), IDS))
    report = fedsoup.inspect_files(inputs)
    assert report["differences"] == [] and report["mergeable"] is True
    assert report["tied_copies"] == [{"file": inputs[0], "tensor": TIED, "copy_of": TIE}]
    assert cli.main(["inspect", "--summary", *inputs]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"{inputs[0]}: tensor '{TIED}' is a tied copy of '{TIE}': a merge leaves it out, as save_pretrained does " \
           f"(from_pretrained ties it back)" in lines, lines
    assert lines[-1] == "mergeable: 2 checkpoints with the same tensor names and shapes"


@pytest.mark.parametrize("crafted", ["value", "zero-sign", "dtype"])
@pytest.mark.parametrize("position", [0, 1])
def test_a_tied_copy_claimed_with_other_bytes_is_refused(tmp_path, capsys, crafted, position):
    """A file may hold lm_head.weight with values of its own: that is no tie, and leaving it out
    would silently drop them. Refused, naming the tensor and the file; equality is bitwise
    (-0.0 is not 0.0, which torch.equal calls equal)."""
    model = tiny_model("gpt2", 0, torch.bfloat16)
    folder = tmp_path / "crafted"
    save_in_form(model, folder, "bin-tied")
    state = {key: value.clone() for key, value in model.state_dict().items()}  # no longer sharing storage
    if crafted == "value":
        state[TIED][3, 5] += 1
    elif crafted == "zero-sign":
        state[TIE][3, 5], state[TIED][3, 5] = 0.0, -0.0
        assert torch.equal(state[TIE], state[TIED])
    else:
        state[TIED] = state[TIED].float()
    torch.save(state, folder / "pytorch_model.bin")
    honest = save_in_form(tiny_model("gpt2", 1, torch.bfloat16), tmp_path / "honest", "safetensors")
    inputs = [honest]
    inputs.insert(position, str(folder / "pytorch_model.bin"))
    with pytest.raises(MergeInputError) as caught:
        fedsoup.merge_files(inputs, tmp_path / "out")
    assert caught.value.key == TIED and inputs[position] in str(caught.value)
    if crafted != "dtype":  # (a dtype its tie does not have: no tie by the headers, refused as before)
        assert caught.value.path == inputs[position] and caught.value.ingredient == position
        assert re.search(rf"not in \S*honest\S*, and no tied copy: it is not bitwise equal \(dtype, shape and "
                         rf"bytes\) to '{re.escape(TIE)}', so", str(caught.value))
    assert not (tmp_path / "out").exists()
    _cli_refuses(inputs, tmp_path / "out", capsys, rf"tensor '{re.escape(TIED)}'")
    report = fedsoup.inspect_files(inputs)
    assert report["mergeable"] is False and any(TIED in line for line in report["differences"] + report["refusals"])


def test_a_tied_copy_is_not_left_out_when_the_first_config_unties_the_embeddings(tmp_path, capsys):
    """With tie_word_embeddings false, from_pretrained ties nothing back: a left-out lm_head.weight
    would be a random layer in the merged model."""
    inputs = _gpt2_inputs(tmp_path, ("bin-tied", "safetensors"))
    config_path = tmp_path / "client0" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "tie_word_embeddings": False}))
    with pytest.raises(MergeInputError) as caught:
        fedsoup.merge_files(inputs, tmp_path / "out")
    assert caught.value.key == TIED
    _cli_refuses(inputs, tmp_path / "out", capsys, rf"tensor '{re.escape(TIED)}'")


@pytest.mark.parametrize("holding", ["pivot", "inputs"])
def test_a_pivot_file_and_inputs_merge_when_one_side_holds_the_tied_copy(tmp_path, holding):
    """A pivot checkpoint saved as a .bin (with lm_head.weight) beside safetensors inputs, or
    the other way round, merges as if both were saved by save_pretrained (it was refused: "not in")."""
    forms = {"pivot": ("bin-tied", "safetensors"), "inputs": ("safetensors", "bin-tied")}[holding]
    pivot_model = tiny_model("gpt2", 7)
    pivots = {form: save_in_form(pivot_model, tmp_path / f"pivot-{form}", form) for form in set(forms)}
    models = [tiny_model("gpt2", i) for i in range(2)]
    inputs = {form: [save_in_form(model, tmp_path / f"{form}{i}", form) for i, model in enumerate(models)]
              for form in set(forms)}
    options = dict(optimizer="sgd", lr=0.5, momentum=0.9, epochs=2)
    out = fedsoup.merge_files(inputs[forms[1]], tmp_path / "out", pivot=pivots[forms[0]], **options)
    expected = fedsoup.merge_files(inputs["safetensors"], tmp_path / "expected", pivot=pivots["safetensors"], **options)
    written, wanted = fio.load_state_dict(out), fio.load_state_dict(expected)
    assert TIED not in written and written.keys() == wanted.keys()
    assert all(torch.equal(written[key], wanted[key]) for key in wanted)


def _depth_upscaled_gpt2(folder: Path, seed: int) -> str:
    """A 3-layer GPT-2 made from a 2-layer one by depth up-scaling (SOLAR-style, mergekit's
    passthrough): its third layer is its second layer again, the same storage in the state
    dict ``torch.save`` writes (a ``pytorch_model.bin`` beside a ``config.json`` of n_layer 3;
    ``lm_head.weight`` is held too, as ``model.state_dict()`` has it)."""
    model = tiny_model("gpt2", seed)
    model.transformer.h.append(model.transformer.h[1])  # one module twice: its tensors under both names
    model.config.n_layer = 3
    state = model.state_dict()
    shared = [key for key in state if key.startswith("transformer.h.2.")]
    assert shared and all(state[key].data_ptr() == state[key.replace(".h.2.", ".h.1.")].data_ptr() for key in shared)
    folder.mkdir(parents=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    torch.save(state, folder / "pytorch_model.bin")
    return str(folder / "pytorch_model.bin")


@pytest.mark.parametrize("upscaled_first", [True, False], ids=["upscaled-first", "upscaled-second"])
def test_a_depth_upscaled_model_is_refused_not_cut_to_the_smaller_one(tmp_path, capsys, upscaled_first):
    """The third layer of a depth up-scaled model is a bitwise copy of its second, but no tied
    weight: from_pretrained ties embeddings only. Leaving it out wrote 2 layers of weights
    under a config of 3, which from_pretrained loads with a random third layer (a logged
    warning, exit 0). Only a copy of an embedding (2-D, vocab_size rows) may be left out."""
    upscaled = _depth_upscaled_gpt2(tmp_path / "upscaled", 0)
    small = save_in_form(tiny_model("gpt2", 1), tmp_path / "small", "safetensors")
    inputs = [upscaled, small] if upscaled_first else [small, upscaled]
    for low_memory in (False, True):
        with pytest.raises(MergeInputError) as caught:
            fedsoup.merge_files(inputs, tmp_path / "out", low_memory=low_memory)
        assert caught.value.key.startswith("transformer.h.2."), caught.value
        assert caught.value.path in inputs and caught.value.path in str(caught.value)
        assert caught.value.ingredient == inputs.index(caught.value.path)
        assert not (tmp_path / "out").exists()
    _cli_refuses(inputs, tmp_path / "out", capsys, r"tensor 'transformer\.h\.2\.")
    report = fedsoup.inspect_files(inputs)
    assert report["mergeable"] is False and report["tied_copies"] == [{"file": upscaled, "tensor": TIED, "copy_of": TIE}]
    assert any("transformer.h.2." in line for line in report["differences"])


def test_a_tied_copy_with_no_config_beside_any_input_is_refused_saying_how_to_merge_it(tmp_path, capsys):
    """Without a config.json nothing says that lm_head.weight is a tied embedding (a copy of
    another tensor may be a layer of a depth up-scaled model): nothing is left out, and the
    refusal says that the config beside the weights lets the merge go through."""
    inputs = _gpt2_inputs(tmp_path, ("bin-tied", "safetensors"))
    for path in inputs:
        (Path(path).parent / "config.json").unlink()
    with pytest.raises(MergeInputError, match=rf"not in \S*client1\S*; it is a bitwise copy of '{re.escape(TIE)}', "
                                              rf"but with no config\.json beside the inputs") as caught:
        fedsoup.merge_files(inputs, tmp_path / "out")
    assert (caught.value.key, caught.value.path, caught.value.ingredient) == (TIED, inputs[0], 0)
    _cli_refuses(inputs, tmp_path / "out", capsys, r"put the model's config\.json beside the weights files$")
    report = fedsoup.inspect_files(inputs)
    assert report["mergeable"] is False and report["tied_copies"] == []
    assert any("no config.json beside the inputs" in line for line in report["refusals"])


# ------------------------------------------------------------------------- links among the carried files
# A model directory from a stranger (an archive can hold links) with tokenizer.json -> ~/.ssh/id_rsa
# must not make the merge copy the user's secret into the model they then publish. A carried file
# that is a link is followed only to a regular file inside the input's model directory, or, for a
# Hugging Face cache snapshot (models--org--name/snapshots/<rev>/), inside models--org--name/.

SECRET = b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA not for publishing\n"


def _rich_clients(tmp_path: Path) -> list[str]:
    """Two tiny GPT-2 directories, the first carrying one file of every kind: config, generation
    config, tokenizer (with a named chat template) and the custom code its config's auto_map names."""
    inputs = _templated_clients(tmp_path)
    first = Path(inputs[0])
    (first / "configuration_tiny_custom.py").write_text(CUSTOM_CONFIG)
    (first / "modeling_tiny_custom.py").write_text(CUSTOM_MODEL)
    (first / "layers_tiny_custom.py").write_text("SCALE = 1.0\n")
    for folder in map(Path, inputs):  # (the same config: no warning that they differ)
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomModel"}
        (folder / "config.json").write_text(json.dumps(config))
    return inputs


def _secret_for(tmp_path: Path, name: str) -> Path:
    """A file of the user's, outside every input: an SSH key; for config.json a JSON file the merge
    would read as a config (a copy of the model's own with a token added), so that nothing before
    the carrying refuses it."""
    secret = tmp_path / "home" / ".ssh" / "id_rsa"
    secret.parent.mkdir(parents=True, exist_ok=True)
    if name == "config.json":
        config = json.loads((tmp_path / "client0" / "config.json").read_text())
        secret.write_text(json.dumps({**config, "hf_token": SECRET.decode()}))
    else:
        secret.write_bytes(SECRET)
    return secret


def _copies_of(tmp_path: Path, secret: Path) -> list[Path]:
    """Every regular file under ``tmp_path`` but ``secret`` holding its bytes (links not counted)."""
    data = secret.read_bytes()
    return [p for p in tmp_path.rglob("*") if p != secret and not p.is_symlink() and p.is_file()
            and p.read_bytes() == data]


def _assert_refused(call, link: Path, out: Path, secret: Path, tmp_path: Path) -> MergeInputError:
    with pytest.raises(MergeInputError) as caught:
        call()
    assert caught.value.path == str(link), caught.value
    assert "copy the file into the directory" in str(caught.value) and "\n" not in str(caught.value)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]
    assert not _copies_of(tmp_path, secret)
    return caught.value


CARRIED_KINDS = ["tokenizer.json", "config.json", "generation_config.json", "tokenizer_config.json",
                 "additional_chat_templates/tool_use.jinja", "modeling_tiny_custom.py"]


@pytest.mark.parametrize("name", CARRIED_KINDS)
@pytest.mark.parametrize("low_memory", [False, True], ids=["in-memory", "low-memory"])
def test_a_carried_file_linking_outside_the_model_directory_is_refused(tmp_path, name, low_memory):
    """Before: the link was followed and the secret written into the merged model, exit 0."""
    inputs = _rich_clients(tmp_path)
    link = Path(inputs[0]) / name
    assert link.is_file()  # (the layout has it)
    secret = _secret_for(tmp_path, name)
    link.unlink()
    link.symlink_to(secret)
    out = tmp_path / "out"
    error = _assert_refused(lambda: fedsoup.merge_files(inputs, out, low_memory=low_memory),
                            link, out, secret, tmp_path)
    assert str(secret) in str(error) and "outside the model directory" in str(error)


@pytest.mark.parametrize("target", ["relative-outside", "into-another-model", "through-an-inside-link", "dangling",
                                    "a-folder-inside", "a-pipe-inside", "a-loop"])
def test_every_link_that_is_not_to_a_regular_file_inside_is_refused(tmp_path, target, no_hang):
    """Before: the three first were followed (the secret carried), the others skipped silently."""
    inputs = _rich_clients(tmp_path)
    folder = Path(inputs[0])
    secret = _secret_for(tmp_path, "tokenizer.json")
    link = folder / "tokenizer.json"
    link.unlink()
    if target == "relative-outside":
        link.symlink_to(Path("..") / "home" / ".ssh" / "id_rsa")
    elif target == "into-another-model":  # client1 is the user's own model, not this one's
        secret = secret.rename(Path(inputs[1]) / "tokenizer.json")
        link.symlink_to(Path("..") / "client1" / "tokenizer.json")
    elif target == "through-an-inside-link":
        (folder / "inside").symlink_to(secret)
        link.symlink_to("inside")
    elif target == "dangling":
        link.symlink_to("nowhere.json")
    elif target == "a-folder-inside":
        (folder / "sub").mkdir()
        link.symlink_to("sub")
    elif target == "a-pipe-inside":
        os.mkfifo(folder / "pipe")  # opened, it would block the merge forever
        link.symlink_to("pipe")
    else:
        link.symlink_to("tokenizer.json")
    out = tmp_path / "out"
    _assert_refused(lambda: fedsoup.merge_files(inputs, out), link, out, secret, tmp_path)


def test_the_cli_refuses_a_link_outside_with_one_line_exit_2_writing_nothing(tmp_path, capsys):
    inputs = _rich_clients(tmp_path)
    secret = _secret_for(tmp_path, "tokenizer.json")
    link = Path(inputs[0]) / "tokenizer.json"
    link.unlink()
    link.symlink_to(secret)
    capsys.readouterr()
    out = tmp_path / "out"
    for mode in ("--in-memory", "--low-memory"):
        assert cli.main(["merge", *inputs, "-o", f"{out}/", mode]) == 2, mode
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"fedsoup: error: {link}: links to ") and not captured.out, err
        assert "copy the file into the directory" in err[0]
        assert not out.exists() and not _copies_of(tmp_path, secret)
    # A single weights file carries nothing: the link is not read, and the merge goes on (warning).
    assert cli.main(["merge", *inputs, "-o", str(tmp_path / "soup.safetensors"), "-q"]) == 0
    assert not _copies_of(tmp_path, secret)


@pytest.mark.parametrize("low_memory", [False, True], ids=["in-memory", "low-memory"])
def test_a_base_model_whose_tokenizer_links_outside_is_refused(tmp_path, low_memory):
    """A LoRA merge into the base carries the base's files: the same rule."""
    from tests.lora_helpers import gpt2_base, make_adapter

    base = tmp_path / "base"
    gpt2_base().save_pretrained(str(base))
    byte_tokenizer().save_pretrained(base)
    secret = _secret_for(tmp_path, "tokenizer.json")
    link = base / "tokenizer.json"
    link.unlink()
    link.symlink_to(secret)
    adapters = [str(make_adapter(tmp_path / f"a{i}", "gpt2", seed=i)) for i in range(2)]
    out = tmp_path / "out"
    _assert_refused(lambda: fedsoup.merge_files(adapters, out, base=str(base), low_memory=low_memory),
                    link, out, secret, tmp_path)


def _as_hub_cache(folder: Path, cache: Path, repo: str = "models--org--tiny", revision: str = "0a1b2c3d") -> Path:
    """``folder`` laid out as huggingface_hub's cache: each file's bytes in
    ``<repo>/blobs/<sha256>``, and ``<repo>/snapshots/<revision>/<name>`` a relative link to it
    (``../../blobs/<hash>``, one ``..`` more per subfolder). Returns the snapshot folder."""
    blobs = cache / repo / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot = cache / repo / "snapshots" / revision
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (cache / repo / "refs").mkdir(exist_ok=True)
    (cache / repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.mark.parametrize("low_memory", [False, True], ids=["in-memory", "low-memory"])
def test_a_hugging_face_cache_snapshot_merges_and_its_files_are_carried(tmp_path, low_memory):
    import huggingface_hub

    inputs = _templated_clients(tmp_path)
    snapshot = _as_hub_cache(Path(inputs[0]), tmp_path / "hub")
    assert (snapshot / "tokenizer.json").is_symlink()
    assert (snapshot / "additional_chat_templates" / "tool_use.jinja").is_symlink()
    # The layout is the hub's own: huggingface_hub lists it, transformers loads the repo id from it.
    assert [repo.repo_id for repo in huggingface_hub.scan_cache_dir(tmp_path / "hub").repos] == ["org/tiny"]
    assert transformers.AutoConfig.from_pretrained("org/tiny", cache_dir=tmp_path / "hub",
                                                   local_files_only=True).model_type == "gpt2"
    assert fedsoup.merge_files([str(snapshot / "model.safetensors"), inputs[1]], tmp_path / "from-weights-file",
                               low_memory=low_memory).joinpath("tokenizer.json").is_file()
    out = fedsoup.merge_files([str(snapshot), inputs[1]], tmp_path / "out", low_memory=low_memory)
    carried = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                     if p.is_file() and p.suffix != ".safetensors" and not p.name.endswith(".fedsoup.json"))
    assert carried == sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*")
                             if p.is_file() and p.suffix != ".safetensors")
    for name in carried:
        assert not (out / name).is_symlink()
        if name != "config.json":  # (its dtype is set to the weights')
            assert (out / name).read_bytes() == (Path(inputs[0]) / name).read_bytes(), name
    _assert_templates_load(out)
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.model_type == "gpt2"


def test_a_cache_snapshot_linking_outside_its_repo_folder_is_refused(tmp_path):
    """Inside the cache, but in another repository's blobs (or anywhere else): refused."""
    inputs = _templated_clients(tmp_path)
    snapshot = _as_hub_cache(Path(inputs[0]), tmp_path / "hub")
    other = tmp_path / "hub" / "models--someone--else" / "blobs" / "feedbeef"
    other.parent.mkdir(parents=True)
    other.write_bytes(SECRET)
    link = snapshot / "tokenizer.json"
    link.unlink()
    link.symlink_to(Path("..") / ".." / ".." / "models--someone--else" / "blobs" / "feedbeef")
    out = tmp_path / "out"
    error = _assert_refused(lambda: fedsoup.merge_files([str(snapshot), inputs[1]], out), link, out, other, tmp_path)
    assert "models--org--tiny" in str(error)


def test_a_link_to_a_file_inside_the_model_directory_is_carried(tmp_path):
    """Links inside the directory (one through ``..`` and back in; the directory itself named
    through a link) are followed; the output holds the bytes, not links."""
    inputs = _templated_clients(tmp_path)
    folder = Path(inputs[0])
    originals = folder / "originals"
    originals.mkdir()
    for name, target in (("tokenizer.json", "originals/tokenizer.json"),
                         ("chat_template.jinja", "../client0/originals/chat_template.jinja"),
                         ("additional_chat_templates/tool_use.jinja", "../originals/tool_use.jinja")):
        (folder / name).rename(originals / Path(name).name)
        (folder / name).symlink_to(target)
        assert (folder / name).is_file(), name
    named = tmp_path / "named-through-a-link"
    named.symlink_to(folder, target_is_directory=True)
    for given in (str(folder), str(named)):
        out = fedsoup.merge_files([given, inputs[1]], tmp_path / f"out-{Path(given).name}")
        for name in ("tokenizer.json", "chat_template.jinja", "additional_chat_templates/tool_use.jinja"):
            assert not (out / name).is_symlink()
            assert (out / name).read_bytes() == (originals / Path(name).name).read_bytes()
        assert not (out / "originals").exists()
        _assert_templates_load(out)
