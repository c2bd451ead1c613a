"""Every mistake fedsoup/ and strategies/ report is a typed error carrying its culprit.

The one exception is what torch.optim itself does: an optimizer class's own constructor
raises ``ValueError`` for a bad value, as ``torch.optim.Adam`` does, so that FedAdam and
friends behave like the optimizers they stand beside.
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import fedsoup
from fedsoup.errors import StateError

ROOT = Path(__file__).resolve().parent.parent
PLAIN = {"ValueError", "TypeError"}
PENDING: set[str] = set()


def _plain_raises(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    allowed = {id(node) for cls in ast.walk(tree) if isinstance(cls, ast.ClassDef)
               and any("Optimizer" in ast.unparse(base) for base in cls.bases)
               for function in cls.body if isinstance(function, ast.FunctionDef) and function.name == "__init__"
               for node in ast.walk(function)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None and id(node) not in allowed:
            call = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(call, ast.Name) and call.id in PLAIN:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_no_plain_value_or_type_error_is_raised_outside_optimizer_constructors():
    files = sorted((ROOT / "fedsoup").rglob("*.py")) + sorted((ROOT / "strategies").rglob("*.py"))
    offenders = [where for path in files if str(path.relative_to(ROOT)) not in PENDING
                 for where in _plain_raises(path)]
    assert offenders == []


def test_the_allowed_exception_is_still_found_by_the_check():
    # The check above cannot pass by missing raises: the optimizer constructors' own are there.
    tree_path = ROOT / "fedsoup" / "optim.py"
    tree = ast.parse(tree_path.read_text(encoding="utf-8"))
    raises = [n for n in ast.walk(tree) if isinstance(n, ast.Raise) and isinstance(n.exc, ast.Call)
              and getattr(n.exc.func, "id", None) == "ValueError"]
    assert raises, "the optimizer constructors' value checks moved: update this test"


@pytest.mark.parametrize("call, option", [
    (lambda: fedsoup.resolve_optimizer("adamm"), "optimizer"),
    (lambda: fedsoup.make_schedule("harmonik", 1.0), "schedule"),
    (lambda: fedsoup.merge([{"a": fedsoup.soup([{"a": __import__("torch").ones(2)}])["a"]}], _path="fast"), "_path"),
])
def test_option_mistakes_deep_in_the_library_are_option_errors(call, option):
    with pytest.raises(fedsoup.OptionError) as caught:
        call()
    assert caught.value.option == option


@pytest.mark.parametrize("seed", [True, 1.5, "7", np.bool_(True), [7]])
def test_a_per_call_seed_that_is_not_an_integer_is_an_option_error_naming_it(seed):
    models = [{"a": torch.ones(2)}, {"a": torch.zeros(2)}]
    with pytest.raises(fedsoup.OptionError) as caught:
        fedsoup.merge(models, fedsoup.MergeOptions(shuffle=True, epochs=2), seed=seed)
    assert (caught.value.option, caught.value.value) == ("seed", seed)


def test_a_per_call_numpy_integer_seed_is_the_same_seed():
    models = [{"a": torch.arange(3.0) * i} for i in range(4)]
    options = fedsoup.MergeOptions(optimizer="adam", lr=0.1, shuffle=True, batch_size=1)
    by_int = fedsoup.merge(models, options, seed=5)["a"]
    assert torch.equal(fedsoup.merge(models, options, seed=np.int64(5))["a"], by_int)
    assert not torch.equal(fedsoup.merge(models, options, seed=6)["a"], by_int)  # the seed is used


def test_state_error_names_file_and_tensor_and_survives_pickle():
    error = StateError("checksum mismatch", path="ckpt/model.safetensors", key="fc.weight", what="tensor")
    assert str(error) == "ckpt/model.safetensors, tensor 'fc.weight': checksum mismatch"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, copy.path, copy.key) == (error.reason, error.path, error.key)
    assert isinstance(copy, ValueError) and fedsoup.StateError is StateError


def _state_errors() -> list[tuple[str, StateError]]:
    """A StateError from each place that raises one, with the word its key deserves."""
    from fedsoup.state import flatten_state, unflatten_state
    from strategies import ServerStew
    from strategies.state import STATE_FORMAT, RunState

    def raised(call) -> StateError:
        with pytest.raises(StateError) as info:
            call()
        return info.value

    stew = ServerStew("sgd", lr=0.5)
    stew.step({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    stewed = {"format": STATE_FORMAT, "round": 1,
              "stew": {"keys": ["head"], "state": {}}}
    return [
        ("entry 'format'", raised(lambda: RunState.from_dict({"round": 1}))),
        ("entry 'round'", raised(lambda: RunState.from_dict({**stewed, "round": -1, "stew": None}))),
        ("entry 'global'", raised(lambda: RunState.from_dict(stewed))),
        ("array 'head'", raised(lambda: RunState.from_dict({**stewed, "global": {"w": torch.zeros(2)}}))),
        ("entry 'optimizer'", raised(lambda: ServerStew("adam", lr=0.1).load_state_dict(stew.state_dict()))),
        ("entry 'keys'", raised(lambda: ServerStew("sgd", lr=0.5).load_state_dict(
            {**stew.state_dict(), "keys": None}))),
        ("array 'head'", raised(lambda: stew.step({"w": torch.zeros(2), "head": torch.zeros(1)},
                                                  {"w": torch.zeros(2), "head": torch.zeros(1)}))),
        ("entry 'opt/hook'", raised(lambda: flatten_state({"opt": {"hook": object()}}))),
        ("entry 'a'", raised(lambda: flatten_state({"a": np.array([object()])}))),
        ("tensor 'w'", raised(lambda: unflatten_state({}, {"__tensor__": "w"}, source="ckpt.safetensors"))),
    ]


def test_a_state_error_words_its_key_by_what_it_is():
    """Before: every key printed as "tensor 'format'", "tensor 'optimizer'"... though only
    a checkpoint's tensors are tensors; entries of a state and arrays of a model say so."""
    for word, error in _state_errors():
        assert f"{word}:" in str(error), (word, str(error))
        assert "tensor '" not in str(error) or word.startswith("tensor"), str(error)
        assert str(pickle.loads(pickle.dumps(error))) == str(error)
        assert f"{word}:" in str(error.at("state.json")) and type(error.at("state.json")) is type(error)


def test_a_strategy_state_error_keeps_the_word_when_restored_into_a_fedsoup():
    from strategies import FedSoup

    first = FedSoup(stew={"optimizer": "fedadam", "lr": 0.1})
    with pytest.raises(StateError) as info:
        FedSoup(stew={"optimizer": "sgd", "lr": 0.5}).load_state_dict(
            {**first.state_dict(), "stew": {"optimizer": "fedadam", "state": None}})
    assert info.value.key == "optimizer" and "entry 'optimizer': FedSoup state: " in str(info.value)
