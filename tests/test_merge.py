"""fedsoup.merge / fedsoup.soup against docs/design.md §1-2 and a plain torch.optim loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fedsoup


def make_models(n=6, seed=0, dtype=torch.float32, with_int=True):
    gen = torch.Generator().manual_seed(seed)
    models = []
    for i in range(n):
        model = {
            "layer.weight": torch.randn(4, 3, generator=gen, dtype=torch.float64).to(dtype),
            "layer.bias": torch.randn(4, generator=gen, dtype=torch.float64).to(dtype),
            "head": torch.randn(2, 2, 2, generator=gen, dtype=torch.float64).to(dtype),
        }
        if with_int:
            model["bn.num_batches_tracked"] = torch.tensor(100 + i)
        models.append(model)
    return models


def random_weights(n, seed=1):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).add(0.1).tolist()


def weighted_soup(models, weights=None):
    n = len(models)
    w = [1 / n] * n if weights is None else [x / math.fsum(weights) for x in weights]
    return {
        k: sum(wi * m[k].double() for wi, m in zip(w, models))
        for k in models[0]
        if models[0][k].is_floating_point()
    }


def assert_close_dicts(actual, expected, atol=1e-6, rtol=1e-5):
    for key, value in expected.items():
        torch.testing.assert_close(actual[key].double(), value.double(), atol=atol, rtol=rtol, msg=key)


@pytest.fixture(params=["auto", "stacked", "flat", "reference"])
def path(request):
    """merge's paths (forced with the private ``_path``); "auto" is merge's own choice."""
    return {} if request.param == "auto" else {"_path": request.param}


@pytest.fixture(params=["stacked", "flat"])
def layout(request):
    """The two ways the torch fast path reads ingredients: stacked [N, D] (small models) or per key."""
    return {"_path": request.param}


# ---------------------------------------------------------------------------
# The two soup identities of docs/design.md §1, for every batch size, pivot and weights.
# ---------------------------------------------------------------------------

N = 5


@pytest.mark.parametrize("batch_size", range(1, N + 1))
@pytest.mark.parametrize("pivot", ["soup", "first", 3, "explicit"])
@pytest.mark.parametrize("weights", [None, "random"])
@pytest.mark.parametrize("identity", ["harmonic-adaptive", "constant-fixed"])
def test_soup_identities(batch_size, pivot, weights, identity, path):
    models = make_models(N)
    w = random_weights(N) if weights == "random" else None
    if pivot == "explicit":
        pivot = {k: torch.full_like(v, 7.0) if v.is_floating_point() else v for k, v in models[0].items()}
    schedule, adaptive = ("harmonic", True) if identity == "harmonic-adaptive" else ("constant", False)
    merged = fedsoup.merge(
        models, weights=w, optimizer="sgd", lr=1.0, schedule=schedule, adaptive_pivot=adaptive,
        epochs=1, batch_size=batch_size, pivot=pivot, **path,
    )
    assert_close_dicts(merged, weighted_soup(models, w))
    assert torch.equal(merged["bn.num_batches_tracked"], models[0]["bn.num_batches_tracked"])


def test_soup_function_matches_weighted_mean():
    models = make_models(4)
    weights = [3, 1, 0, 2]
    assert_close_dicts(fedsoup.soup(models, weights), weighted_soup(models, weights))
    assert_close_dicts(fedsoup.soup(models), weighted_soup(models))


# ---------------------------------------------------------------------------
# Parity with a plain torch.optim loop (table-driven, as optax tests optimizers).
# ---------------------------------------------------------------------------


def reference_merge(models, *, weights, opt_cls, lr, schedule, epochs, batch_size, shuffle, seed,
                    adaptive_pivot, zeta=1.0, alpha=-1.1, order=None, **kwargs):
    """The AME update written as plainly as possible: per-key params, for-loop optimizer."""
    n = len(models)
    omega = [1 / n] * n if weights is None else [x / math.fsum(weights) for x in weights]
    order = list(range(n)) if order is None else order
    keys = [k for k in models[0] if models[0][k].is_floating_point()]
    w0 = {k: sum(o * m[k].double() for o, m in zip(omega, models)) for k in keys}
    params = {k: w0[k].clone() for k in keys}
    if "foreach" in opt_cls.__init__.__code__.co_varnames:
        kwargs.setdefault("foreach", False)
    optimizer = opt_cls(list(params.values()), lr=lr, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    k, visited = 0, 0.0
    for _ in range(epochs):
        ep = [order[i] for i in torch.randperm(n, generator=gen).tolist()] if shuffle else order
        for start in range(0, n, batch_size):
            batch = ep[start:start + batch_size]
            k += 1
            visited += sum(omega[j] for j in batch)
            eta = {"constant": lr, "harmonic": lr / visited, "poly": lr * k ** alpha}[schedule]
            for group in optimizer.param_groups:
                group["lr"] = eta
            for key, p in params.items():
                pivot = p if adaptive_pivot else w0[key]
                p.grad = zeta * sum(omega[j] * (pivot - models[j][key].double()) for j in batch)
            optimizer.step()
    return params


OPTIMIZER_TABLE = [
    ("sgd-momentum", "sgd", torch.optim.SGD, 0.5, {"momentum": 0.9}),
    ("sgd-nesterov-wd", "sgd", torch.optim.SGD, 0.5, {"momentum": 0.5, "nesterov": True, "weight_decay": 0.01}),
    ("adam", "adam", torch.optim.Adam, 0.05, {"betas": (0.8, 0.9), "eps": 1e-5}),
    ("adamw", "adamw", torch.optim.AdamW, 0.05, {"weight_decay": 0.05}),
    ("adagrad", "adagrad", torch.optim.Adagrad, 0.1, {}),
    ("adadelta", "adadelta", torch.optim.Adadelta, 1.0, {"rho": 0.8}),
    ("rmsprop", "rmsprop", torch.optim.RMSprop, 0.01, {"alpha": 0.9, "momentum": 0.5}),
    ("nadam", "nadam", torch.optim.NAdam, 0.05, {}),
    ("radam", "radam", torch.optim.RAdam, 0.05, {}),
    ("adamax", "adamax", torch.optim.Adamax, 0.05, {}),
    ("fedadam", "fedadam", fedsoup.FedAdam, 0.05, {"betas": (0.9, 0.99), "eps": 1e-3}),
    ("fedyogi", "fedyogi", fedsoup.FedYogi, 0.05, {"eps": 1e-3}),
    ("fedadagrad", "fedadagrad", fedsoup.FedAdagrad, 0.05, {"eps": 1e-3}),
]


@pytest.mark.parametrize("case", OPTIMIZER_TABLE, ids=[c[0] for c in OPTIMIZER_TABLE])
@pytest.mark.parametrize("adaptive_pivot", [True, False], ids=["adaptive", "fixed"])
@pytest.mark.parametrize("schedule", ["constant", "harmonic"])
@pytest.mark.parametrize("path", ["stacked", "flat", "reference"])
def test_parity_with_plain_torch_loop(case, adaptive_pivot, schedule, path):
    _, name, cls, lr, kwargs = case
    layout = {"_path": path}
    models = make_models(7, seed=3, dtype=torch.float64)
    weights = random_weights(7, seed=4)
    options = dict(weights=weights, lr=lr, schedule=schedule, epochs=3, batch_size=2, shuffle=True,
                   seed=11, adaptive_pivot=adaptive_pivot)
    merged = fedsoup.merge(models, optimizer=name, **options, **kwargs, **layout)
    expected = reference_merge(models, opt_cls=cls, **options, **kwargs)
    assert_close_dicts(merged, expected, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("case", OPTIMIZER_TABLE[:4], ids=[c[0] for c in OPTIMIZER_TABLE[:4]])
def test_parity_in_float32_and_with_order_and_amplification(case):
    _, name, cls, lr, kwargs = case
    models = make_models(6, seed=5)
    scores = [0.3, 0.9, 0.1, 0.5, 0.7, 0.2]
    order = sorted(range(6), key=lambda i: -scores[i])
    merged = fedsoup.merge(models, optimizer=name, lr=lr, schedule="poly", alpha=-0.5, epochs=2,
                           batch_size=4, order_by=scores, amplification=2.0, **kwargs)
    expected = reference_merge(models, weights=None, opt_cls=cls, lr=lr, schedule="poly", alpha=-0.5,
                               epochs=2, batch_size=4, shuffle=False, seed=0, adaptive_pivot=True,
                               zeta=2.0, order=order, **kwargs)
    assert_close_dicts(merged, expected, atol=1e-5, rtol=1e-4)


def test_optimizer_class_and_callable_schedule():
    models = make_models(4, dtype=torch.float64)
    merged = fedsoup.merge(models, optimizer=torch.optim.Adam, lr=0.1, schedule=lambda k: 0.1 / k,
                           epochs=2, amplification=lambda k: 1.0)
    expected = reference_merge(models, weights=None, opt_cls=torch.optim.Adam, lr=0.1, schedule="poly",
                               alpha=-1.0, epochs=2, batch_size=1, shuffle=False, seed=0, adaptive_pivot=True)
    assert_close_dicts(merged, expected, atol=1e-10, rtol=1e-9)


def test_non_elementwise_optimizer_sees_whole_tensors():
    models = make_models(5, dtype=torch.float64)
    assert not fedsoup.is_elementwise(torch.optim.Adafactor)
    merged = fedsoup.merge(models, optimizer=torch.optim.Adafactor, lr=0.05, epochs=2, batch_size=2)
    expected = reference_merge(models, weights=None, opt_cls=torch.optim.Adafactor, lr=0.05, schedule="harmonic",
                               epochs=2, batch_size=2, shuffle=False, seed=0, adaptive_pivot=True)
    assert_close_dicts(merged, expected, atol=1e-10, rtol=1e-9)
    # LBFGS needs a closure; merging with it converges towards the soup.
    lbfgs = fedsoup.merge(models, optimizer=torch.optim.LBFGS, lr=0.5, schedule="constant", epochs=3,
                          batch_size=5, pivot="first")
    assert_close_dicts(lbfgs, weighted_soup(models), atol=1e-4, rtol=1e-4)


def test_key_by_key_equals_whole_model_for_elementwise_optimizers():
    """What --low-memory relies on."""
    models = make_models(6, seed=8)
    options = dict(optimizer="adam", lr=0.05, epochs=3, batch_size=2, shuffle=True, seed=4,
                   weights=random_weights(6))
    whole = fedsoup.merge(models, **options)
    for key in models[0]:
        single = fedsoup.merge([{key: m[key]} for m in models], **options)
        # Equal up to float rounding: vectorised kernels round a buffer's tail differently.
        torch.testing.assert_close(single[key], whole[key], atol=1e-7, rtol=1e-6)


def test_stacked_and_per_key_layouts_agree():
    models = make_models(9, seed=2)
    options = dict(optimizer="adamw", lr=0.02, epochs=2, batch_size=3, shuffle=True)
    stacked = fedsoup.merge(models, **options, _path="stacked")
    per_key = fedsoup.merge(models, **options, _path="flat")
    assert_close_dicts(per_key, stacked, atol=1e-6, rtol=1e-5)


def test_numpy_inputs_and_adam_moves_away_from_soup():
    models = [{k: v.numpy() for k, v in m.items()} for m in make_models(5)]
    merged = fedsoup.merge(models, optimizer="adam", lr=0.1, epochs=2)
    assert isinstance(merged["head"], torch.Tensor)
    soup = fedsoup.soup(models)
    assert not torch.allclose(merged["head"], soup["head"])


# ---------------------------------------------------------------------------
# Greedy AME (Appendix A.4)
# ---------------------------------------------------------------------------


def test_greedy_keeps_only_improving_steps_and_reverts_optimizer_state():
    models = make_models(4, dtype=torch.float64, with_int=False)
    scripted = iter([0.0, 1.0, 0.5, 2.0, 2.0])  # initial, then steps 1..4: keep, reject, keep, reject
    seen = []

    def evaluate(state_dict):
        seen.append({k: v.clone() for k, v in state_dict.items()})
        return next(scripted)

    merged = fedsoup.merge(models, optimizer="sgd", lr=0.5, schedule="constant", momentum=0.9,
                           pivot="first", greedy=True, evaluate=evaluate)
    assert len(seen) == 5
    # Reference: the same loop where the rejected steps (2 and 4) never happened at all,
    # so the momentum buffer is as it was before them.
    params = {k: models[0][k].clone() for k in models[0]}
    opt = torch.optim.SGD(list(params.values()), lr=0.5, momentum=0.9, foreach=False)
    for step, j in enumerate(range(4), start=1):
        if step in (2, 4):
            continue
        for key, p in params.items():
            p.grad = 0.25 * (p - models[j][key])
        opt.step()
    assert_close_dicts(merged, params, atol=1e-12, rtol=1e-12)


def test_greedy_result_never_scores_below_the_pivot():
    models = make_models(6, seed=9, with_int=False)
    target = models[2]

    def evaluate(sd):
        return -float(sum(torch.sum((sd[k] - target[k]) ** 2) for k in sd))

    start = evaluate(models[0])
    merged = fedsoup.merge(models, optimizer="adam", lr=0.1, epochs=3, pivot=0, greedy=True, evaluate=evaluate)
    assert evaluate(merged) > start


# ---------------------------------------------------------------------------
# Projection (Prop. 2), determinism, dtypes
# ---------------------------------------------------------------------------


def test_projection_keeps_the_merge_in_the_ball():
    models = make_models(5, with_int=False, dtype=torch.float64)
    center = weighted_soup(models)

    def dist(sd):
        return math.sqrt(sum(float(torch.sum((sd[k].double() - center[k]) ** 2)) for k in center))

    radius = max(dist(m) for m in models)
    wild = fedsoup.merge(models, optimizer="sgd", lr=12.0, schedule="constant", epochs=2, pivot="first")
    tame = fedsoup.merge(models, optimizer="sgd", lr=12.0, schedule="constant", epochs=2, pivot="first", project=True)
    assert dist(wild) > radius * 1.01
    assert dist(tame) <= radius * (1 + 1e-9)


def test_same_seed_same_bytes_other_seed_other_result():
    models = make_models(8)
    options = dict(optimizer="adam", lr=0.05, epochs=4, batch_size=3, shuffle=True)
    a = fedsoup.merge(models, seed=7, **options)
    b = fedsoup.merge(models, seed=7, **options)
    c = fedsoup.merge(models, seed=8, **options)
    for key in a:
        assert a[key].numpy().tobytes() == b[key].numpy().tobytes()
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_dtype_round_trip(dtype, layout):
    models = make_models(4, dtype=dtype)
    merged = fedsoup.merge(models, optimizer="adam", lr=0.05, epochs=2, **layout)
    for key, value in merged.items():
        assert value.dtype == models[0][key].dtype, key
    upcast = [{k: (v.float() if v.is_floating_point() and dtype != torch.float64 else v) for k, v in m.items()}
              for m in models]
    expected = fedsoup.merge(upcast, optimizer="adam", lr=0.05, epochs=2, **layout)
    for key in merged:
        assert torch.equal(merged[key], expected[key].to(merged[key].dtype)), key


def test_float64_anywhere_computes_in_float64():
    models = make_models(3)
    models[1]["head"] = models[1]["head"].double()
    merged = fedsoup.merge(models, optimizer="adam", lr=0.05)
    assert merged["head"].dtype == torch.float32  # the first ingredient's dtype


def test_non_floating_tensors_come_from_first_in_visiting_order():
    models = make_models(3)
    merged = fedsoup.merge(models, order_by=[0.1, 0.9, 0.5])
    assert merged["bn.num_batches_tracked"].item() == 101
    assert merged["bn.num_batches_tracked"].dtype == torch.int64
    ascending = fedsoup.merge(models, order_by=[0.1, 0.9, 0.5], descending=False, optimizer="adam", lr=0.1)
    assert ascending["bn.num_batches_tracked"].item() == 100


# ---------------------------------------------------------------------------
# Every error path names the ingredient and the tensor.
# ---------------------------------------------------------------------------


def _broken(kind):
    models = make_models(3)
    if kind == "missing":
        del models[2]["head"]
    elif kind == "extra":
        models[1]["extra"] = torch.zeros(1)
    elif kind == "shape":
        models[2]["layer.bias"] = torch.zeros(5)
    elif kind == "nan":
        models[1]["head"][0, 1, 1] = float("nan")
    elif kind == "inf":
        models[2]["layer.weight"][0, 0] = float("-inf")
    elif kind == "dtype":
        models[1]["layer.bias"] = torch.zeros(4, dtype=torch.int32)
    return models


@pytest.mark.parametrize(
    "kind, ingredient, key, pattern",
    [
        ("missing", 2, "head", r"ingredient 2, tensor 'head': missing \(present in ingredient 0\)"),
        ("extra", 1, "extra", r"ingredient 1, tensor 'extra': not in ingredient 0"),
        ("shape", 2, "layer.bias", r"ingredient 2, tensor 'layer.bias': has shape \(5,\), but ingredient 0 has \(4,\)"),
        ("nan", 1, "head", r"ingredient 1, tensor 'head': contains NaN or Inf"),
        ("inf", 2, "layer.weight", r"ingredient 2, tensor 'layer.weight': contains NaN or Inf"),
        ("dtype", 1, "layer.bias", r"ingredient 1, tensor 'layer.bias': is int32, but ingredient 0 has float32"),
    ],
)
@pytest.mark.parametrize("options", [{}, {"optimizer": "adam", "lr": 0.1, "epochs": 2},
                                     {"greedy": True, "evaluate": lambda sd: 0.0}], ids=["soup", "adam", "greedy"])
def test_bad_ingredients_name_index_and_key(kind, ingredient, key, pattern, options):
    with pytest.raises(fedsoup.MergeInputError, match=pattern) as info:
        fedsoup.merge(_broken(kind), **options)
    assert (info.value.ingredient, info.value.key, info.value.path) == (ingredient, key, None)


def test_nan_with_zero_weight_is_still_reported():
    with pytest.raises(ValueError, match="ingredient 1, tensor 'head'"):
        fedsoup.merge(_broken("nan"), weights=[1, 0, 1])


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"weights": [1, -1, 1]}, r"ingredient 1: weight must be finite and >= 0"),
        ({"weights": [0, 0, 0]}, r"weights sum to zero"),
        ({"weights": [1, 1]}, r"weights has 2 entries for 3 ingredients"),
        ({"weights": [1, float("nan"), 1]}, r"ingredient 1: weight"),
        ({"order_by": [1, 2]}, r"order_by has 2 scores"),
        ({"order_by": [1, float("nan"), 2]}, r"ingredient 1: order_by score is NaN"),
        ({"optimizer": "sgdd"}, r"unknown optimizer 'sgdd'"),
        ({"optimizer": object}, r"optimizer must be a name"),
        ({"schedule": "cosine"}, r"unknown schedule 'cosine'"),
        ({"lr": -1.0}, r"'lr' must be >= 0"),
        ({"pivot": "middle"}, r"unknown pivot 'middle'"),
        ({"pivot": 3}, r"pivot index 3 out of range"),
        ({"pivot": {"head": torch.zeros(2, 2, 2)}}, r"tensor '.*': pivot missing"),
        ({"greedy": True}, r"greedy=True needs an evaluate"),
        ({"epochs": 0}, r"'epochs' must be an integer >= 1"),
        ({"batch_size": 0}, r"'batch_size' must be an integer >= 1"),
        ({"optimizer": "adam", "momentum": 0.9}, r"unknown option 'momentum': neither a merge option nor an argument of Adam"),
    ],
)
def test_bad_options(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        fedsoup.merge(make_models(3), **kwargs)


def test_empty_and_non_mapping_inputs():
    with pytest.raises(ValueError, match="empty"):
        fedsoup.merge([])
    with pytest.raises(ValueError, match="ingredient 1: expected a mapping"):
        fedsoup.merge([make_models(1)[0], torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="ingredient 0, tensor 'a': expected torch.Tensor"):
        fedsoup.merge([{"a": [1.0, 2.0]}])
    with pytest.raises(ValueError, match="sequence of state dicts"):
        fedsoup.merge(make_models(1)[0])


@pytest.mark.parametrize("options", [{}, {"optimizer": "adam", "lr": 0.1, "epochs": 2}], ids=["soup", "adam"])
def test_a_state_dict_holding_no_tensors_is_refused_naming_it(options):
    """Before: ``merge([{}, {}])`` and ``soup([{}, {}])`` returned ``{}``, a model of nothing,
    where ``merge_files`` refuses a file of no tensors in every format; and ``{}`` beside a
    model was reported as missing its first tensor. Now refused alike, naming the ingredient
    (a server leaves such a reply out)."""
    good = make_models(1)[0]
    for models, culprit in (([{}, {}], 0), ([good, {}], 1), ([{}, good, good], 0)):
        for merge in (fedsoup.merge, fedsoup.soup):
            with pytest.raises(fedsoup.MergeInputError) as info:
                merge(models, **options) if merge is fedsoup.merge else merge(models)
            assert (info.value.ingredient, info.value.key, info.value.reason) == (culprit, None, "holds no tensors")


def test_state_dicts_of_integer_tensors_only_give_the_first_visited_ones():
    """Nothing is averaged, yet they are models (buffers, counters): as any non-floating
    tensor, each comes from the first ingredient in visiting order, as ``merge_files``
    writes them (tests/test_merge_files.py), not refused as holding no tensors."""
    models = [{"position_ids": torch.arange(4), "bn.num_batches_tracked": torch.tensor(10 + i)} for i in range(3)]
    for options in ({}, {"optimizer": "adam", "lr": 0.1, "epochs": 2}):
        merged = fedsoup.merge(models, order_by=[0.1, 0.9, 0.5], **options)
        assert sorted(merged) == ["bn.num_batches_tracked", "position_ids"]
        assert torch.equal(merged["position_ids"], torch.arange(4)) and merged["bn.num_batches_tracked"].item() == 11
    assert fedsoup.soup(models)["bn.num_batches_tracked"].item() == 10


def test_divergence_is_reported_as_such():
    models = make_models(3, with_int=False)
    with pytest.raises(ValueError, match="merge diverged: tensor"):
        fedsoup.merge(models, optimizer="sgd", lr=1e30, schedule="constant", epochs=50, pivot="first")


def test_inputs_are_not_modified():
    models = make_models(4)
    before = [{k: v.clone() for k, v in m.items()} for m in models]
    fedsoup.merge(models, optimizer="adam", lr=0.1, epochs=2, batch_size=2, project=True)
    fedsoup.merge(models)
    for m, b in zip(models, before):
        for key in m:
            assert torch.equal(m[key], b[key])


def test_numpy_non_writeable_and_object_arrays():
    array = np.ones(3, dtype=np.float32)
    array.setflags(write=False)
    assert torch.equal(fedsoup.merge([{"a": array}, {"a": array}])["a"], torch.ones(3))
    with pytest.raises(ValueError, match="object arrays"):
        fedsoup.merge([{"a": np.array([object()])}])
