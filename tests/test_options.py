"""One validated options type: every misspelling path, typed errors with attributes, no work before validation."""

from __future__ import annotations

import dataclasses
import inspect
import pickle

import pytest
import torch
from safetensors.torch import save_file

import fedsoup
from fedsoup import cli
from fedsoup.errors import MergeInputError, OptionError, OutputExistsError, UnknownOptionError
from fedsoup.options import CALL_INPUTS, MergeOptions, OptimizerOptions


def models(n=3):
    g = torch.Generator().manual_seed(0)
    return [{"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)} for _ in range(n)]


def checkpoints(tmp_path, n=3):
    paths = []
    for i, model in enumerate(models(n)):
        save_file(model, tmp_path / f"m{i}.safetensors")
        paths.append(str(tmp_path / f"m{i}.safetensors"))
    return paths


# --------------------------------------------------------------------------- misspellings


@pytest.mark.parametrize(
    "kwargs, option, suggestion, owner",
    [
        ({"shufle": True}, "shufle", "shuffle", None),
        ({"batchsize": 2}, "batchsize", "batch_size", None),
        ({"optimizer": "adam", "beta": (0.9, 0.99)}, "beta", "betas", "Adam"),
        ({"optimizer": "sgd", "momentun": 0.9}, "momentun", "momentum", "SGD"),
        ({"optimizer": "fedyogi", "tau": 1e-3}, "tau", None, None),
    ],
)
def test_merge_refuses_unknown_options_with_the_closest_name(kwargs, option, suggestion, owner):
    with pytest.raises(UnknownOptionError) as info:
        fedsoup.merge(models(), **kwargs)
    error = info.value
    assert isinstance(error, TypeError) and isinstance(error, ValueError)
    assert (error.option, error.suggestion, error.owner) == (option, suggestion, owner)
    if suggestion:
        assert str(error).startswith(f"unknown option {option!r}; did you mean {suggestion!r}")
    else:
        assert "neither a merge option nor an argument of FedYogi" in str(error)


def test_the_issue_example_reads_as_a_misspelling_not_an_optimizer_bug():
    with pytest.raises(UnknownOptionError, match=r"^unknown option 'shufle'; did you mean 'shuffle'\?$"):
        fedsoup.merge(models(), shufle=True)


def test_options_are_checked_before_the_models():
    # An empty model list is bad input too, but the option is refused first: no work was done.
    with pytest.raises(UnknownOptionError):
        fedsoup.merge([], shufle=True)


@pytest.mark.parametrize(
    "kwargs, option, suggestion",
    [
        ({"optimizer": "adamm"}, "optimizer", "adam"),
        ({"schedule": "harmonc"}, "schedule", "harmonic"),
        ({"pivot": "frist"}, "pivot", "first"),
        ({"epochs": 0}, "epochs", None),
        ({"batch_size": 1.5}, "batch_size", None),
        ({"lr": float("nan")}, "lr", None),
        ({"shuffle": "yes"}, "shuffle", None),
        ({"weights": "num_examples"}, "weights", None),
        ({"greedy": True}, "evaluate", None),
        ({"device": "warp-drive"}, "device", None),
    ],
)
def test_bad_option_values_name_the_option(kwargs, option, suggestion):
    with pytest.raises(OptionError) as info:
        MergeOptions.from_kwargs(**kwargs)
    assert not isinstance(info.value, UnknownOptionError)
    assert (info.value.option, info.value.suggestion) == (option, suggestion)
    with pytest.raises(OptionError):
        fedsoup.merge(models(), **kwargs)


def test_merge_files_refuses_misspelt_options_before_reading_anything(tmp_path, monkeypatch):
    inputs = checkpoints(tmp_path)
    monkeypatch.setattr(fedsoup.io.Checkpoint, "get", lambda self, key: pytest.fail("read a tensor"))
    with pytest.raises(UnknownOptionError) as info:
        fedsoup.merge_files(inputs, tmp_path / "o.safetensors", shufle=True)
    assert info.value.suggestion == "shuffle"
    # merge_files' own arguments are suggested too
    with pytest.raises(UnknownOptionError) as info:
        fedsoup.merge_files(inputs, tmp_path / "o.safetensors", shard_sise="1GB")
    assert info.value.suggestion == "shard_size"
    with pytest.raises(UnknownOptionError) as info:
        fedsoup.merge_files(inputs, tmp_path / "o.safetensors", optimizer="adam", beta=(0.9, 0.9))
    assert (info.value.suggestion, info.value.owner) == ("betas", "Adam")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--opt", "beta=0.9,0.9", "--optimizer", "adam"], "unknown option 'beta'; did you mean 'betas' (an argument of Adam)?"),
        (["--optimizer", "adamm"], "unknown optimizer 'adamm'; did you mean 'adam'?"),
        (["--optimizer", "adam", "--momentum", "0.9"], "unknown option 'momentum': neither a merge option nor an argument of Adam"),
    ],
)
def test_cli_flags_misspellings_exit_2_with_the_suggestion(tmp_path, capsys, argv, message):
    inputs = checkpoints(tmp_path)
    assert cli.main(["merge", *inputs, "-o", str(tmp_path / "o.safetensors"), *argv]) == 2
    assert capsys.readouterr().err.strip() == f"fedsoup: error: {message}"


@pytest.mark.parametrize(
    "text, message",
    [
        ("shufle = true\n", "unknown option 'shufle'; did you mean 'shuffle'?"),
        ("optimizer = 'adam'\n[optimizer_kwargs]\nbeta = [0.9, 0.9]\n", "unknown option 'beta'; did you mean 'betas'"),
        ("metric = 'm.csv'\n", "unknown option 'metric'; did you mean 'metrics'?"),
    ],
)
def test_config_file_misspellings(tmp_path, capsys, text, message):
    inputs = checkpoints(tmp_path)
    (tmp_path / "c.toml").write_text(text)
    assert cli.main(["merge", *inputs, "-o", str(tmp_path / "o.safetensors"), "--config", str(tmp_path / "c.toml")]) == 2
    assert message in capsys.readouterr().err


def test_soup_and_stew_dicts_use_the_same_type():
    soup = MergeOptions.from_dict({"optimizer": "adam", "lr": 0.1, "betas": (0.5, 0.9), "epochs": 2})
    assert soup.optimizer_kwargs == {"betas": (0.5, 0.9)} and soup.epochs == 2
    with pytest.raises(UnknownOptionError, match="did you mean 'epochs'"):
        MergeOptions.from_dict({"epoch": 2})
    with pytest.raises(OptionError, match="cannot be set here: FedSoup weighs clients") as info:
        MergeOptions.from_dict({"weights": [1, 2]}, reserved={"weights": "FedSoup weighs clients by num-examples"})
    assert info.value.option == "weights"
    stew = OptimizerOptions.from_dict({"optimizer": "fedadam", "lr": 0.1, "betas": (0.9, 0.99), "eps": 1e-3})
    assert stew.optimizer_class is fedsoup.FedAdam and stew.optimizer_kwargs == {"betas": (0.9, 0.99), "eps": 1e-3}
    assert OptimizerOptions.from_dict(None) == OptimizerOptions("sgd", 1.0, {})
    with pytest.raises(UnknownOptionError) as info:
        OptimizerOptions.from_dict({"optimizer": "fedadam", "beta_1": 0.9})
    assert info.value.suggestion == "betas" and info.value.owner == "FedAdam"
    with pytest.raises(UnknownOptionError, match="did you mean 'lr'"):
        OptimizerOptions.from_dict({"optimizer": "sgd", "lr_": 0.1})


# --------------------------------------------------------------------------- the type itself


def test_options_cover_every_merge_keyword_with_the_same_defaults():
    parameters = {
        name: p.default for name, p in inspect.signature(fedsoup.merge).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and not name.startswith("_")
    }
    defaults = MergeOptions()
    fields = {f.name for f in dataclasses.fields(MergeOptions) if f.init and f.name != "optimizer_kwargs"}
    # merge's keywords: what one call merges (CALL_INPUTS), report=, and every option
    assert set(parameters) == fields | set(CALL_INPUTS) | {"report"}
    for name in fields - set(CALL_INPUTS):
        assert getattr(defaults, name) == parameters[name], name


def test_the_call_inputs_are_not_options():
    for name in ("weights", "order_by"):
        with pytest.raises(OptionError, match="input of the call") as info:
            MergeOptions.from_kwargs(**{name: [1, 2, 3]})
        assert info.value.option == name
    with pytest.raises(OptionError, match="input of the call"):
        MergeOptions(pivot={"w": torch.zeros(3)})
    with pytest.raises(OptionError, match="not both"):
        fedsoup.merge(models(), MergeOptions(), epochs=2)
    with pytest.raises(OptionError, match="pivot rule is an option"):
        fedsoup.merge(models(), MergeOptions(), pivot="first")


def test_to_kwargs_round_trips_through_merge():
    options = MergeOptions.from_kwargs(optimizer="adam", lr=0.05, epochs=2, batch_size=2, shuffle=True, seed=3,
                                       betas=(0.8, 0.9))
    expected = fedsoup.merge(models(), optimizer="adam", lr=0.05, epochs=2, batch_size=2, shuffle=True, seed=3,
                             weights=[3, 1, 2], betas=(0.8, 0.9))
    assert_same(fedsoup.merge(models(), weights=[3, 1, 2], **options.to_kwargs()), expected)
    assert_same(fedsoup.merge(models(), options, weights=[3, 1, 2]), expected)
    # a per-call seed replaces the options' seed, exactly as the keyword does
    assert_same(fedsoup.merge(models(), options, weights=[3, 1, 2], seed=7),
                fedsoup.merge(models(), weights=[3, 1, 2], **{**options.to_kwargs(), "seed": 7}))
    assert options.describe()["betas"] == [0.8, 0.9] and options.describe()["optimizer"] == "adam"


def assert_same(got, expected):
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_options_are_frozen_and_revalidated_on_replace():
    import dataclasses

    options = MergeOptions(epochs=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.epochs = 3
    with pytest.raises(OptionError):
        dataclasses.replace(options, epochs=-1)


@pytest.mark.parametrize("error", [
    MergeInputError("contains NaN or Inf values", ingredient=2, key="w", path="c.safetensors"),
    OptionError("epochs", 0, "bad epochs"),
    UnknownOptionError("beta", ["betas", "eps"], optimizer="Adam", optimizer_arguments=["betas", "eps"]),
    OutputExistsError("out.safetensors"),
])
def test_errors_keep_their_attributes_through_pickle(error):
    # Ray and multiprocessing pickle exceptions; keyword-only constructors need __reduce__.
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    for attribute in ("ingredient", "key", "path", "option", "suggestion", "owner"):
        assert getattr(copy, attribute, None) == getattr(error, attribute, None)


def test_input_error_message_is_built_from_its_attributes():
    error = MergeInputError("contains NaN or Inf values", ingredient=2, key="w")
    assert str(error) == "ingredient 2, tensor 'w': contains NaN or Inf values"
    located = error.at(path="c.safetensors")
    assert (located.ingredient, located.key, located.path) == (2, "w", "c.safetensors")
    assert str(located) == "c.safetensors, tensor 'w': contains NaN or Inf values"


def test_public_api_holds_no_internal_helpers():
    assert {"merge", "soup", "merge_files", "inspect_files", "MergeOptions", "MergeInputError"} <= set(fedsoup.__all__)
    assert not {"is_plain_sgd", "make_optimizer", "find_non_finite", "make_schedule"} & set(fedsoup.__all__)
    from fedsoup.inputs import find_non_finite  # noqa: F401 - still importable from their modules
    from fedsoup.optim import is_plain_sgd, make_optimizer  # noqa: F401
    # io's streaming writer and the strategy's training-state saver have distinct names
    assert not hasattr(fedsoup.io, "save_checkpoint") and hasattr(fedsoup.io, "write_checkpoint")
