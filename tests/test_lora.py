"""LoRA adapters merged on purpose (fedsoup.lora): against the hand computation Σ ω_i s_i B_i A_i
in plain torch, and against PEFT (loading, add_weighted_adapter's cat, merge_and_unload)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from fedsoup import MergeInputError, MergeOptions, MergeWarning, OptionError
import fedsoup.lora.measure
import fedsoup.lora.modes
from fedsoup.inputs import compute_dtype
from fedsoup.lora import (
    LoraPair,
    dense_deltas,
    factor_product_errors,
    load_adapter,
    merge_adapters,
    merge_into_base,
    parse_adapter_config,
    split_adapter,
    write_adapter,
    write_model,
)
from fedsoup.lora.linalg import factored_svd, randomized_svd
from fedsoup.lora.measure import stacked

from tests.lora_helpers import (
    hand_products,
    llama_base,
    gpt2_base,
    make_adapter,
    peft_deltas,
    products_of,
    read,
    relative_error,
)

from peft import PeftModel  # noqa: E402  (lora_helpers skipped the module if peft is missing)


def _merged_products(merged, directory):
    """``{path: s·B·A}`` of a merged adapter, computed by hand from the tensors and config written."""
    write_adapter(directory, merged.state_dict, merged.config)
    return products_of(directory)


def _close(products, expected, tol):
    assert products.keys() == expected.keys()
    for path in expected:
        assert relative_error(products[path], expected[path]) < tol, path


@pytest.fixture(scope="module")
def gpt2_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    return [make_adapter(root / f"a{i}", "gpt2", seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def llama_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    return [make_adapter(root / f"a{i}", "llama", seed=10 + i) for i in range(3)]


def _load(directories):
    return [load_adapter(d, ingredient=i) for i, d in enumerate(directories)]


# --- the modes against the hand computation -----------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_products_cat_is_the_soup_of_products(family, gpt2_adapters, llama_adapters, tmp_path):
    directories = gpt2_adapters if family == "gpt2" else llama_adapters
    weights = [1.0, 2.0, 5.0]
    merged = merge_adapters(_load(directories), mode="products", weights=weights)
    assert merged.report.how == "cat" and set(merged.report.ranks.values()) == {12}
    assert merged.config["r"] == 12 and merged.config["rank_pattern"] == {}
    _close(_merged_products(merged, tmp_path / "out"), hand_products(directories, weights), 1e-6)


def test_products_with_mixed_ranks_alphas_and_rslora(tmp_path):
    directories = [
        make_adapter(tmp_path / "a", seed=1, r=2, lora_alpha=4),
        make_adapter(tmp_path / "b", seed=2, r=4, lora_alpha=32),
        make_adapter(tmp_path / "c", seed=3, r=8, lora_alpha=8, use_rslora=True),
    ]
    merged = merge_adapters(_load(directories), mode="products")
    assert merged.config["r"] == 14
    _close(_merged_products(merged, tmp_path / "out"), hand_products(directories), 1e-6)
    # the soup of factors is not defined across ranks: said, not guessed
    assert merged.report.max_error is None


@pytest.mark.parametrize("rslora", [False, True])
def test_factors_fold_each_scale_into_b(tmp_path, rslora):
    """Different alphas: B_i is scaled by s_i/s before averaging; the output keeps adapter 0's scale.
    The target is the soup of factors, s·(Σ ω_i (s_i/s) B_i)(Σ ω_i A_i), computed by hand."""
    directories = [make_adapter(tmp_path / f"a{i}", seed=i, r=4, lora_alpha=alpha, use_rslora=rslora)
                   for i, alpha in enumerate([8, 16, 64])]
    weights = [3.0, 1.0, 1.0]
    merged = merge_adapters(_load(directories), mode="factors", weights=weights)
    omega = [w / sum(weights) for w in weights]
    configs_tensors = [read(d) for d in directories]
    s = [c["lora_alpha"] / (2.0 if rslora else 4.0) for c, _ in configs_tensors]
    products = _merged_products(merged, tmp_path / "out")
    assert merged.config["lora_alpha"] == 8 and merged.config["use_rslora"] is rslora
    for path in products:
        a = sum(w * t[path + ".lora_A.weight"].double() for w, (_, t) in zip(omega, configs_tensors))
        b = sum(w * (si / s[0]) * t[path + ".lora_B.weight"].double() for w, si, (_, t) in zip(omega, s, configs_tensors))
        assert relative_error(products[path], s[0] * b @ a) < 1e-6


def test_factors_of_equal_scale_are_fedavg_bit_for_bit(gpt2_adapters):
    adapters = _load(gpt2_adapters)
    merged = merge_adapters(adapters, mode="factors")
    tensors = [read(d)[1] for d in gpt2_adapters]
    for key, value in merged.state_dict.items():
        expected = (tensors[0][key] / 3 + tensors[1][key] / 3 + tensors[2][key] / 3)
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    assert merged.config == {**read(gpt2_adapters[0])[0]}


def test_factors_refuse_mixed_ranks_naming_the_ingredient(tmp_path):
    directories = [make_adapter(tmp_path / "a", seed=1, r=4), make_adapter(tmp_path / "b", seed=2, r=2)]
    with pytest.raises(MergeInputError) as info:
        merge_adapters(_load(directories), mode="factors")
    assert info.value.ingredient == 1 and info.value.key.endswith(".lora_A.weight")


def test_factor_product_error_measured(tmp_path, gpt2_adapters):
    """0 for one adapter; small for clients drifting 10% from one adapter; large for independent ones."""
    alone = _load(gpt2_adapters[:1])
    assert max(factor_product_errors(alone, [1.0]).values()) < 1e-7
    drifted = [make_adapter(tmp_path / f"d{i}", seed=100 + i, drift_from=gpt2_adapters[0]) for i in range(3)]
    small = merge_adapters(_load(drifted), mode="factors").report
    independent = merge_adapters(_load(gpt2_adapters), mode="factors").report
    assert 0 < small.max_error < 0.05
    assert independent.mean_error > 0.5
    # the measure itself, by hand on one module with dense matrices
    adapters = _load(gpt2_adapters)
    path = sorted(adapters[0].pairs)[0]
    pairs = [a.pairs[path] for a in adapters]
    soup_b = sum(p.B.double() for p in pairs) / 3
    soup_a = sum(p.A.double() for p in pairs) / 3
    target = sum(p.scale * p.B.double() @ p.A.double() for p in pairs) / 3
    expected = relative_error(pairs[0].scale * soup_b @ soup_a, target)
    assert independent.errors[path] == pytest.approx(expected, rel=1e-9)


# --- SVD ---------------------------------------------------------------------------------------

def test_svd_at_full_rank_is_exact_and_below_it_optimal(gpt2_adapters, tmp_path):
    adapters = _load(gpt2_adapters)
    expected = hand_products(gpt2_adapters)
    full = merge_adapters(adapters, mode="products", rank=12)
    assert full.report.how == "svd" and full.report.min_energy == pytest.approx(1.0, abs=1e-12)
    _close(_merged_products(full, tmp_path / "full"), expected, 1e-6)
    low = merge_adapters(adapters, mode="products", rank=3)
    products = _merged_products(low, tmp_path / "low")
    for path, target in expected.items():
        u, s, vh = torch.linalg.svd(target)
        best = (u[:, :3] * s[:3]) @ vh[:3]  # Eckart–Young: the optimal rank-3 approximation
        assert relative_error(products[path], best) < 1e-6
        energy = float((s[:3] ** 2).sum() / (s ** 2).sum())
        assert low.report.energies[path] == pytest.approx(energy, rel=1e-6)  # float32 inputs
        error = relative_error(products[path], target)
        assert error == pytest.approx((1 - energy) ** 0.5, rel=1e-6)


def test_factored_svd_equals_dense_svd():
    torch.manual_seed(0)
    b, a = torch.randn(40, 12, dtype=torch.float64), torch.randn(12, 30, dtype=torch.float64)
    u, s, vh = factored_svd(b, a)
    torch.testing.assert_close(s, torch.linalg.svdvals(b @ a)[:12])
    torch.testing.assert_close((u * s) @ vh, b @ a)


def test_randomized_svd_is_seeded_and_accurate():
    torch.manual_seed(0)
    m = torch.randn(200, 8, dtype=torch.float64) @ torch.randn(8, 150, dtype=torch.float64)
    m += 1e-3 * torch.randn(200, 150, dtype=torch.float64)
    first = randomized_svd(m, 8, seed=3)
    again = randomized_svd(m, 8, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    torch.testing.assert_close(first[1], torch.linalg.svdvals(m)[:8], rtol=1e-8, atol=0)


def test_ame_over_products_is_dense_then_truncated(gpt2_adapters, tmp_path):
    """AME with another optimizer merges the dense ΔW_i; the written adapter is its seeded SVD."""
    adapters = _load(gpt2_adapters)
    options = MergeOptions(optimizer="sgd", lr=0.5, schedule="constant", epochs=2)
    merged = merge_adapters(adapters, mode="products", rank=12, options=options)
    from fedsoup import merge
    dense = merge([{p: (pair.scale * pair.B.double() @ pair.A.double()) for p, pair in a.pairs.items()}
                   for a in adapters], **options.to_kwargs())
    products = _merged_products(merged, tmp_path / "out")
    for path, delta in dense.items():
        u, s, vh = torch.linalg.svd(delta)
        best = (u[:, :12] * s[:12]) @ vh[:12]
        assert relative_error(products[path], best) < 1e-5
    assert 0.5 < merged.report.min_energy <= 1.0


# --- PEFT as the anchor --------------------------------------------------------------------------

def _peft_load(directory, family="gpt2"):
    base = gpt2_base() if family == "gpt2" else llama_base()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(directory))
    complaints = [str(w.message) for w in caught if "missing" in str(w.message).lower()
                  or "unexpected" in str(w.message).lower()]
    assert not complaints, complaints
    return model


@pytest.mark.parametrize("mode,rank", [("factors", None), ("products", None), ("products", 5)])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peft_loads_every_output_with_its_scale(family, mode, rank, gpt2_adapters, llama_adapters, tmp_path):
    directories = gpt2_adapters if family == "gpt2" else llama_adapters
    merged = merge_adapters(_load(directories), mode=mode, rank=rank)
    write_adapter(tmp_path / "out", merged.state_dict, merged.config)
    model = _peft_load(tmp_path / "out", family)
    from peft import get_peft_model_state_dict
    loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == merged.state_dict.keys()
    for key, value in loaded.items():
        assert torch.equal(value, merged.state_dict[key]), key
    # PEFT's own delta weights are what we claim to have written
    _close(peft_deltas(model), products_of(tmp_path / "out"), 1e-6)


def test_peft_loads_mixed_rank_rslora_output(tmp_path):
    directories = [make_adapter(tmp_path / "a", seed=1, r=2, lora_alpha=4, use_rslora=True,
                                rank_pattern={"h.1.attn.c_attn": 3}),
                   make_adapter(tmp_path / "b", seed=2, r=4, lora_alpha=32, use_rslora=True)]
    merged = merge_adapters(_load(directories), mode="products")
    assert sorted(merged.report.ranks.values()) == [6, 7]
    write_adapter(tmp_path / "out", merged.state_dict, merged.config)
    model = _peft_load(tmp_path / "out")
    _close(peft_deltas(model), hand_products(directories), 1e-6)


def test_cat_equals_peft_add_weighted_adapter(gpt2_adapters, tmp_path):
    weights = [0.5, 0.3, 0.2]
    merged = merge_adapters(_load(gpt2_adapters), mode="products", weights=weights)
    model = PeftModel.from_pretrained(gpt2_base(), str(gpt2_adapters[0]), adapter_name="a0")
    for i, directory in enumerate(gpt2_adapters[1:], start=1):
        model.load_adapter(str(directory), adapter_name=f"a{i}")
    model.add_weighted_adapter(["a0", "a1", "a2"], weights, "cat", combination_type="cat")
    theirs = peft_deltas(model, "cat")
    ours = _merged_products(merged, tmp_path / "out")
    _close(ours, theirs, 1e-6)


# --- into the base model -------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_merged_into_base_gives_the_logits_of_the_hand_merge(family, gpt2_adapters, llama_adapters, tmp_path):
    directories = gpt2_adapters if family == "gpt2" else llama_adapters
    factory = gpt2_base if family == "gpt2" else llama_base
    base_dir = tmp_path / "base"
    factory().save_pretrained(str(base_dir))
    from fedsoup.io.resolve import load_state_dict
    base = load_state_dict(base_dir)
    result, report = merge_into_base(_load(directories), base, mode="products")
    write_model(tmp_path / "merged", result, base_dir)
    model = type(factory()).from_pretrained(str(tmp_path / "merged")).eval()
    # by hand: W + ΔW, with GPT-2's Conv1D weights stored transposed (d_in, d_out)
    hand = factory()
    with torch.no_grad():
        for path, delta in hand_products(directories).items():
            name = path.removeprefix("base_model.model.") + ".weight"
            weight = dict(hand.named_parameters())[name]
            weight += (delta.T if family == "gpt2" else delta).to(weight.dtype)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hand(ids).logits, rtol=1e-5, atol=1e-5)
        # and PEFT's own merge of our cat adapter agrees
        merged = merge_adapters(_load(directories), mode="products")
        write_adapter(tmp_path / "cat", merged.state_dict, merged.config)
        peft_merged = PeftModel.from_pretrained(factory(), str(tmp_path / "cat")).merge_and_unload()
        torch.testing.assert_close(model(ids).logits, peft_merged(ids).logits, rtol=1e-5, atol=1e-5)
    assert report.how == "base"


# --- one stack and one dense update a module, the bytes of the copies they replaced -------------------

def _pairs(dtypes, ranks, scales=(2.0, 0.7071067811865476, 1 / 3)):
    generator = torch.Generator().manual_seed(0)
    return [LoraPair(torch.randn(r, 9, generator=generator).to(dtype), torch.randn(7, r, generator=generator).to(dtype),
                     scale) for dtype, r, scale in zip(dtypes, ranks, scales)]


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.bfloat16,) * 3, (torch.float64,) * 3,
                                    (torch.float32, torch.float64, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("ranks", [(4, 4, 4), (2, 5, 3)], ids=str)
def test_stacked_factors_are_the_bytes_of_both_former_copies(dtypes, ranks):
    """``measure.stacked`` replaced the offline merge's ``B_cat = [ω_i s_i B_i]`` (each block times a
    Python float) and the federated round's ``(B_cat, A_cat, c)`` (``c`` in the compute dtype):
    the merges' inputs stay the same bytes."""
    pairs, omega = _pairs(dtypes, ranks), [1 / 7, 2 / 7, 4 / 7]
    dtype = compute_dtype([t for p in pairs for t in (p.A, p.B)])
    stack = stacked(pairs, omega)
    assert torch.equal(stack.scaled_B(), torch.cat([p.B.to(dtype) * (w * p.scale) for p, w in zip(pairs, omega)], 1))
    assert torch.equal(stack.weights(), torch.cat([torch.full((p.rank,), w * p.scale, dtype=dtype)
                                                   for p, w in zip(pairs, omega)]))
    assert torch.equal(stack.B, torch.cat([p.B.to(dtype) for p in pairs], 1))
    assert torch.equal(stack.A, torch.cat([p.A.to(dtype) for p in pairs], 0))
    assert stack.scaled_B().dtype == stack.A.dtype == dtype
    soup = sum(w * p.scale * (p.B.double() @ p.A.double()) for p, w in zip(pairs, omega))
    torch.testing.assert_close((stack.scaled_B() @ stack.A).double(), soup, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.bfloat16,) * 3, (torch.float64,) * 3,
                                    (torch.float32, torch.float64, torch.bfloat16)], ids=str)
def test_dense_deltas_are_the_bytes_of_both_former_copies(dtypes):
    """``dense_deltas`` replaced the offline AME-over-products loop and the round's ``dense_products``:
    ``s · (B @ A)`` in each pair's compute dtype, full tensors passed through as they are."""
    pairs = dict(zip("abc", _pairs(dtypes, (4, 2, 3))))
    full = {"head.weight": torch.ones(2, 2, dtype=torch.bfloat16)}
    dense = dense_deltas(pairs, full)
    assert list(dense) == ["a", "b", "c", "head.weight"] and dense["head.weight"] is full["head.weight"]
    for path, p in pairs.items():
        dtype = compute_dtype([p.B, p.A])
        assert torch.equal(dense[path], p.scale * (p.B.to(dtype) @ p.A.to(dtype))) and dense[path].dtype == dtype


@pytest.mark.parametrize("merge", ["adapter", "base"])
def test_a_soup_of_products_stacks_each_module_once(merge, monkeypatch):
    """The merge and its factor/product error share one stack a module (twice before)."""
    calls = []

    def counted(original):
        return lambda *args: calls.append(1) or original(*args)

    for module in (fedsoup.lora.measure, fedsoup.lora.modes):
        monkeypatch.setattr(module, "stacked", counted(module.stacked))
    settings = parse_adapter_config(_config(target_modules=["q", "v"]))
    adapters = [split_adapter({f"base_model.model.{m}.lora_{f}.weight": t for m in ("q", "v")
                               for f, t in (("A", p.A), ("B", p.B))}, settings)
                for p in _pairs((torch.float32,) * 3, (4, 4, 4))]
    if merge == "adapter":
        report = merge_adapters(adapters, mode="products").report
    else:
        report = merge_into_base(adapters, {"q.weight": torch.zeros(7, 9), "v.weight": torch.zeros(7, 9)})[1]
    assert len(calls) == 2 and set(report.errors) == {"base_model.model.q", "base_model.model.v"}
    assert report.max_error > 0.1  # measured: independent factors


# --- configs, pairing and refusals -----------------------------------------------------------------

def _config(**fields):
    return {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q"], **fields}


@pytest.mark.parametrize("field,value", [
    ("use_dora", True), ("lora_bias", True), ("use_qalora", True), ("target_parameters", ["w"]),
    ("layer_replication", [[0, 1]]), ("bias", "all"),
])
def test_variants_are_refused_by_name(field, value):
    with pytest.raises(MergeInputError) as info:
        parse_adapter_config(_config(**{field: value}), ingredient=2, path="x")
    assert info.value.ingredient == 2 and info.value.field == field and info.value.path == "x"


def test_other_peft_methods_are_refused():
    with pytest.raises(MergeInputError) as info:
        parse_adapter_config(_config(peft_type="IA3"))
    assert info.value.field == "peft_type"


def test_scales_follow_patterns_and_rslora():
    settings = parse_adapter_config(_config(rank_pattern={"layers.1.q": 2}, alpha_pattern={"q": 32},
                                            use_rslora=True))
    assert settings.rank("model.layers.0.q") == 4 and settings.rank("model.layers.1.q") == 2
    assert settings.scale("model.layers.1.q") == pytest.approx(32 / 2 ** 0.5)
    assert parse_adapter_config(_config()).scale("x.q") == 2.0


@pytest.mark.parametrize("key,reason", [
    ("base_model.model.emb.lora_embedding_A", "embedding"),
    ("base_model.model.q.lora_magnitude_vector", "DoRA"),
    ("base_model.model.q.lora_B.bias", "bias"),
    ("base_model.model.other.weight", "modules_to_save"),
])
def test_variant_keys_are_refused(key, reason):
    tensors = {"base_model.model.q.lora_A.weight": torch.ones(4, 3), "base_model.model.q.lora_B.weight": torch.ones(5, 4),
               key: torch.ones(4, 3)}
    with pytest.raises(MergeInputError, match=reason) as info:
        split_adapter(tensors, parse_adapter_config(_config()), ingredient=1)
    assert info.value.key == key and info.value.ingredient == 1


def test_a_without_b_and_a_lying_config_are_refused():
    settings = parse_adapter_config(_config())
    with pytest.raises(MergeInputError, match="without its pair"):
        split_adapter({"base_model.model.q.lora_A.weight": torch.ones(4, 3)}, settings)
    with pytest.raises(MergeInputError, match="rank 2 in the tensors") as info:
        split_adapter({"base_model.model.q.lora_A.weight": torch.ones(2, 3),
                       "base_model.model.q.lora_B.weight": torch.ones(5, 2)}, settings)
    assert info.value.key == "base_model.model.q.lora_A.weight"


def test_modules_to_save_are_merged_as_full_tensors(tmp_path):
    directories = [make_adapter(tmp_path / f"a{i}", seed=i, modules_to_save=["lm_head"]) for i in range(2)]
    tensors = [read(d)[1] for d in directories]
    full_keys = [k for k in tensors[0] if "lora_" not in k]
    assert full_keys
    for mode in ("factors", "products"):
        merged = merge_adapters(_load(directories), mode=mode, weights=[1, 3])
        for key in full_keys:
            torch.testing.assert_close(merged.state_dict[key], tensors[0][key] / 4 + 3 * tensors[1][key] / 4)


def test_incompatible_adapters_are_refused(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1)
    b = make_adapter(tmp_path / "b", seed=2, target_modules=["c_attn", "c_proj"])
    with pytest.raises(MergeInputError) as info:
        merge_adapters(_load([a, b]))
    assert info.value.ingredient == 1 and info.value.field == "target_modules"
    c = make_adapter(tmp_path / "c", seed=3, modules_to_save=["lm_head"])
    with pytest.raises(MergeInputError) as info:
        merge_adapters(_load([a, c]))
    assert info.value.field == "modules_to_save"


def test_non_finite_adapter_is_refused(tmp_path):
    a, b = make_adapter(tmp_path / "a", seed=1), make_adapter(tmp_path / "b", seed=2)
    config, tensors = read(b)
    key = sorted(tensors)[1]
    tensors[key][0, 0] = float("nan")
    adapters = _load([a]) + [split_adapter(tensors, parse_adapter_config(config), ingredient=1)]
    with pytest.raises(MergeInputError, match="NaN") as info:
        merge_adapters(adapters)
    assert info.value.ingredient == 1 and info.value.key == key


def test_differing_base_model_warns(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1)
    b = make_adapter(tmp_path / "b", seed=2)
    config = json.loads((b / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/somewhere/else"
    (b / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(MergeWarning, match="base_model_name_or_path"):
        merge_adapters(_load([a, b]))


def test_bad_options_are_refused(gpt2_adapters):
    with pytest.raises(OptionError) as info:
        merge_adapters(_load(gpt2_adapters), mode="product")
    assert info.value.suggestion == "products"
    with pytest.raises(OptionError):
        merge_adapters(_load(gpt2_adapters), mode="factors", rank=4)


def test_directory_without_weights_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps(_config()))
    with pytest.raises(MergeInputError, match="no weights") as info:
        load_adapter(tmp_path / "empty", ingredient=0)
    assert info.value.path == str(tmp_path / "empty")


def test_weights_file_and_bin_format_are_read(gpt2_adapters, tmp_path):
    config, tensors = read(gpt2_adapters[0])
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_text(json.dumps(config))
    torch.save(tensors, tmp_path / "bin" / "adapter_model.bin")
    from_bin = load_adapter(tmp_path / "bin")
    from_file = load_adapter(gpt2_adapters[0] / "adapter_model.safetensors")
    for path, pair in from_file.pairs.items():
        assert torch.equal(pair.A, from_bin.pairs[path].A) and pair.scale == from_bin.pairs[path].scale


# --- files in, directory out (fedsoup.lora.driver) ------------------------------------------------

def test_adapter_files_merge_writes_a_loadable_adapter_and_records_the_report(gpt2_adapters, tmp_path):
    from fedsoup.lora.driver import merge_adapter_files
    from safetensors import safe_open
    report = merge_adapter_files([str(d / "adapter_model.safetensors") for d in gpt2_adapters],
                                 tmp_path / "out", mode="products", rank=6)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as handle:
        recorded = json.loads(handle.metadata()["fedsoup.lora"])
    assert recorded["lora_mode"] == "products" and recorded["lora_rank"] == 6
    assert recorded["factor_product_error_max"] == pytest.approx(report.lora.max_error)
    _peft_load(tmp_path / "out")


def test_adapter_files_merge_into_base_loads_with_from_pretrained(llama_adapters, tmp_path):
    from fedsoup.lora.driver import merge_adapter_files
    llama_base().save_pretrained(str(tmp_path / "base"))
    merge_adapter_files(llama_adapters, tmp_path / "merged", base=tmp_path / "base")
    model = type(llama_base()).from_pretrained(str(tmp_path / "merged")).eval()
    merge_adapter_files(llama_adapters, tmp_path / "cat")
    peft_merged = PeftModel.from_pretrained(llama_base(), str(tmp_path / "cat")).merge_and_unload()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, peft_merged(ids).logits, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "merged" / "config.json").read_bytes() == (tmp_path / "base" / "config.json").read_bytes()


def test_merge_into_base_cast_by_dtype_says_so_in_config_json(llama_adapters, tmp_path):
    """`--base --dtype bf16` writes bf16 weights: config.json must name bfloat16, as a plain model merge does."""
    from fedsoup.lora.driver import merge_adapter_files
    llama_base().save_pretrained(str(tmp_path / "base"))
    merge_adapter_files(llama_adapters, tmp_path / "merged", base=tmp_path / "base", dtype=torch.bfloat16)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    model = type(llama_base()).from_pretrained(str(tmp_path / "merged"), dtype="auto")
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("bad", ["nan", "other_targets", "no_weights", "model"])
def test_bad_adapter_inputs_write_nothing(bad, gpt2_adapters, tmp_path):
    from fedsoup.lora.driver import merge_adapter_files
    inputs = [str(gpt2_adapters[0]), str(tmp_path / "bad")]
    if bad == "nan":
        config, tensors = read(gpt2_adapters[1])
        key = sorted(tensors)[0]
        tensors[key][1, 1] = float("inf")
        (tmp_path / "bad").mkdir()
        from safetensors.torch import save_file
        save_file(tensors, str(tmp_path / "bad" / "adapter_model.safetensors"))
        (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps(config))
    elif bad == "other_targets":
        make_adapter(tmp_path / "bad", seed=5, target_modules=["c_proj"])
    elif bad == "no_weights":
        (tmp_path / "bad").mkdir()
    else:
        gpt2_base().save_pretrained(str(tmp_path / "bad"))
    with pytest.raises(MergeInputError) as info:
        merge_adapter_files(inputs, tmp_path / "out")
    assert info.value.path == str(tmp_path / "bad") and info.value.ingredient == 1
    assert not (tmp_path / "out").exists()


# --- merge_files and the command line -----------------------------------------------------------

def test_merge_files_on_adapters_writes_an_adapter_peft_loads(gpt2_adapters, tmp_path):
    """The bug of the issue: adapters merged into a bare model.safetensors without adapter_config.json."""
    import fedsoup
    output = fedsoup.merge_files([str(d) for d in gpt2_adapters], tmp_path / "out")
    assert (output / "adapter_config.json").is_file() and not (output / "model.safetensors").exists()
    model = _peft_load(output)
    _close(peft_deltas(model), hand_products(gpt2_adapters), 1e-6)  # the default: exact products


def test_merge_files_lora_options_on_models_are_refused(tmp_path):
    import fedsoup
    from safetensors.torch import save_file
    for i in range(2):
        save_file({"w": torch.ones(2)}, str(tmp_path / f"m{i}.safetensors"))
    with pytest.raises(OptionError) as info:
        fedsoup.merge_files([str(tmp_path / "m0.safetensors"), str(tmp_path / "m1.safetensors")],
                            tmp_path / "out.safetensors", lora="factors")
    assert info.value.option == "lora"
    with pytest.raises(OptionError) as info:
        fedsoup.merge_files([str(tmp_path / "m0.safetensors")], tmp_path / "o.safetensors", lora="cat")
    assert info.value.suggestion is None or info.value.option == "lora"


def test_cli_merges_adapters_and_reports_the_error(gpt2_adapters, tmp_path, capsys):
    from fedsoup import cli
    code = cli.main(["merge", *map(str, gpt2_adapters), "-o", str(tmp_path / "out"), "--lora", "products",
                     "--lora-rank", "4", "--weights", "1,1,2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "lora products (svd, rank 4): factor/product error max" in out and "SVD energy min" in out
    _peft_load(tmp_path / "out")
    code = cli.main(["merge", *map(str, gpt2_adapters), "-o", str(tmp_path / "model"), "--base", str(tmp_path / "b")])
    assert code == 2  # no such base: one line, exit 2
    gpt2_base().save_pretrained(str(tmp_path / "b"))
    code = cli.main(["merge", *map(str, gpt2_adapters), "-o", str(tmp_path / "model"), "--base", str(tmp_path / "b"),
                     "--lora", "factors"])
    assert code == 0 and (tmp_path / "model" / "config.json").is_file()
    assert "lora factors (base, rank 4)" in capsys.readouterr().out


def test_cli_refuses_mixed_inputs_and_writes_nothing(gpt2_adapters, tmp_path, capsys):
    from fedsoup import cli
    gpt2_base().save_pretrained(str(tmp_path / "model"))
    capsys.readouterr()  # (transformers' own progress output)
    code = cli.main(["merge", str(gpt2_adapters[0]), str(tmp_path / "model"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "adapter" in err
    assert not (tmp_path / "out").exists()
    mixed = make_adapter(tmp_path / "r2", seed=7, r=2)
    code = cli.main(["merge", str(gpt2_adapters[0]), str(mixed), "-o", str(tmp_path / "out"), "--lora", "factors"])
    err = capsys.readouterr().err
    assert code == 2 and str(mixed) in err and "equal ranks" in err
    assert not (tmp_path / "out").exists()


def test_the_report_counts_the_ame_steps_run_over_adapters(gpt2_adapters, tmp_path, capsys):
    """AME-Adam over adapters ran epochs·⌈N/B⌉ steps; the report (and the printed summary) said 0."""
    import fedsoup
    from fedsoup import cli
    from fedsoup.offline import run_merge_files
    configs, tensors = zip(*(read(d) for d in gpt2_adapters))
    n = len(tensors)
    for mode in ("products", "factors"):
        _, report = fedsoup.merge(list(tensors), lora=mode, optimizer="adam", lr=1e-2, epochs=3, batch_size=2,
                                  adapter_config=configs[0], report=True)
        assert report.steps == 3 * -(-n // 2)
        _, soup = fedsoup.merge(list(tensors), lora=mode, adapter_config=configs[0], report=True)
        assert soup.steps == 0
    written = run_merge_files(list(map(str, gpt2_adapters)), tmp_path / "out", optimizer="adam", lr=1e-2, epochs=2)
    assert written.steps == 2 * n
    capsys.readouterr()
    assert cli.main(["merge", *map(str, gpt2_adapters), "-o", str(tmp_path / "cli"), "--optimizer", "adam",
                     "--epochs", "2"]) == 0
    assert f"Adam, {2 * n} steps" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["merged.safetensors", "merged.pt", "merged.bin"])
@pytest.mark.parametrize("base", [False, True])
def test_cli_refuses_a_file_output_for_adapters(name, base, gpt2_adapters, tmp_path, capsys):
    """An adapter merge writes a directory: `-o merged.safetensors` must not become a folder of that name."""
    from fedsoup import cli
    extra = []
    if base:
        gpt2_base().save_pretrained(str(tmp_path / "base"))
        extra = ["--base", str(tmp_path / "base")]
    capsys.readouterr()
    code = cli.main(["merge", *map(str, gpt2_adapters), "-o", str(tmp_path / name), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and name in err and "directory" in err
    assert not (tmp_path / name).exists()


# --- the lora option of MergeOptions and fedsoup.merge -----------------------------------------

def test_merge_takes_the_lora_option_on_adapter_state_dicts(gpt2_adapters, tmp_path):
    import fedsoup
    configs, tensors = zip(*(read(d) for d in gpt2_adapters))
    merged, report = fedsoup.merge(list(tensors), lora="products", lora_rank=5, adapter_config=configs[0],
                                   weights=[1, 2, 3], report=True)
    assert report.path == "lora-svd" and report.lora.config["r"] == 5
    assert report.to_dict()["factor_product_error_max"] == report.lora.max_error
    write_adapter(tmp_path / "out", merged, report.lora.config)
    exact = merge_adapters(_load(gpt2_adapters), mode="products", rank=5, weights=[1, 2, 3])
    for key, value in exact.state_dict.items():
        assert torch.equal(merged[key], value)
    # factors through merge equal FedAvg on the tensors, one config per model accepted too
    options = MergeOptions(lora="factors")
    fedavg = fedsoup.merge(list(tensors), options, adapter_config=list(configs))
    for key in fedavg:
        torch.testing.assert_close(fedavg[key], sum(t[key] for t in tensors) / 3)


def test_lora_option_values_are_checked_when_built():
    with pytest.raises(OptionError) as info:
        MergeOptions(lora="product")
    assert info.value.option == "lora" and info.value.suggestion == "products"
    with pytest.raises(OptionError) as info:
        MergeOptions(lora="factors", lora_rank=4)
    assert info.value.option == "lora_rank"
    with pytest.raises(OptionError):
        MergeOptions(lora="products", lora_rank=0)


def test_merge_with_lora_needs_the_adapter_config(gpt2_adapters):
    import fedsoup
    with pytest.raises(OptionError) as info:
        fedsoup.merge([read(d)[1] for d in gpt2_adapters], lora="products")
    assert info.value.option == "adapter_config"


def test_the_strategy_refuses_a_lora_mode_without_the_servers_adapter_config():
    """Without the adapter's config from the server (FedSoup(adapter_config=...)) every round would fail."""
    strategies = pytest.importorskip("strategies")
    with pytest.raises(OptionError) as info:
        strategies.FedSoup(soup={"lora": "products"})
    assert info.value.option == "lora"


def test_modules_to_save_replace_the_base_tensors_when_merged_into_the_base(tmp_path):
    directories = [make_adapter(tmp_path / f"a{i}", "llama", seed=20 + i, modules_to_save=["lm_head"]) for i in range(2)]
    llama_base().save_pretrained(str(tmp_path / "base"))
    from fedsoup.io.resolve import load_state_dict
    base = load_state_dict(tmp_path / "base")
    result, _ = merge_into_base(_load(directories), base, mode="products", weights=[1, 3])
    tensors = [read(d)[1] for d in directories]
    torch.testing.assert_close(result["lm_head.weight"], tensors[0]["base_model.model.lm_head.weight"] / 4
                               + 3 * tensors[1]["base_model.model.lm_head.weight"] / 4)
    write_model(tmp_path / "merged", result, tmp_path / "base")
    merged = type(llama_base()).from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged.lm_head.weight, result["lm_head.weight"])


def test_a_tied_module_to_save_is_refused_not_dropped(tmp_path):
    """GPT-2 ties lm_head to wte (save_pretrained writes no lm_head.weight): writing it would be
    re-tied away on load, so the merge refuses loudly instead of exiting 0 with it lost."""
    directories = [make_adapter(tmp_path / f"a{i}", seed=30 + i, modules_to_save=["lm_head"]) for i in range(2)]
    gpt2_base().save_pretrained(str(tmp_path / "base"))
    from fedsoup.io.resolve import load_state_dict
    with pytest.raises(MergeInputError, match="modules_to_save") as info:
        merge_into_base(_load(directories), load_state_dict(tmp_path / "base"))
    assert info.value.key == "base_model.model.lm_head.weight"


def test_the_svd_of_products_never_forms_a_dense_update():
    """products at a lower rank works on the factors only: no (d_out, d_in) tensor is ever made."""
    from torch.overrides import TorchFunctionMode

    d_out, d_in, r = 96, 80, 3
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 6, "target_modules": ["q"]}
    generator = torch.Generator().manual_seed(0)
    adapters = [split_adapter({"base_model.model.layer.q.lora_A.weight": torch.randn(r, d_in, generator=generator),
                               "base_model.model.layer.q.lora_B.weight": torch.randn(d_out, r, generator=generator)},
                              parse_adapter_config(config), ingredient=i) for i in range(4)]
    shapes = []

    class Shapes(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for item in result if isinstance(result, tuple) else (result,):
                if isinstance(item, torch.Tensor):
                    shapes.append(tuple(item.shape))
            return result

    with Shapes():
        merged = merge_adapters(adapters, mode="products", rank=5)
    assert shapes and not [s for s in shapes if s in ((d_out, d_in), (d_in, d_out))]
    # and it is the SVD of the dense soup all the same
    dense = sum(2.0 * p.pairs["base_model.model.layer.q"].B @ p.pairs["base_model.model.layer.q"].A for p in adapters) / 4
    u, s, vh = torch.linalg.svd(dense.double())
    a = merged.state_dict["base_model.model.layer.q.lora_A.weight"].double()
    b = merged.state_dict["base_model.model.layer.q.lora_B.weight"].double()
    assert relative_error((6 / 5) * b @ a, (u[:, :5] * s[:5]) @ vh[:5]) < 1e-5


def test_a_refused_field_survives_pickling_and_is_in_the_message():
    import pickle
    with pytest.raises(MergeInputError) as info:
        parse_adapter_config(_config(use_dora=True), ingredient=1, path="client1/")
    again = pickle.loads(pickle.dumps(info.value))
    assert (again.field, again.ingredient, again.path) == ("use_dora", 1, "client1/")
    assert str(again).startswith("client1/, field 'use_dora': ")


def test_factored_randomized_svd_matches_the_exact_one_without_the_product():
    """For many adapters (k = Σ r large) the range finder works through the factors only."""
    from fedsoup.lora.linalg import factored_randomized_svd
    generator = torch.Generator().manual_seed(1)
    k = 200  # e.g. 50 clients of r=4
    # a soup of clients that agree on a few directions: 8 strong singular values, the rest small
    left = torch.linalg.qr(torch.randn(300, k, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(250, k, generator=generator, dtype=torch.float64)).Q
    sigma = torch.cat([torch.linspace(10, 3, 8, dtype=torch.float64), 1e-2 * torch.rand(k - 8, generator=generator,
                                                                                       dtype=torch.float64)])
    mix = torch.linalg.qr(torch.randn(k, k, generator=generator, dtype=torch.float64)).Q
    b, a = (left * sigma) @ mix, mix.T @ right.T
    u, s, vh = factored_randomized_svd(b, a, 8, seed=5)
    again = factored_randomized_svd(b, a, 8, seed=5)
    assert all(torch.equal(x, y) for x, y in zip((u, s, vh), again))
    eu, es, evh = factored_svd(b, a)
    torch.testing.assert_close(s, es[:8], rtol=1e-6, atol=0)
    best = (eu[:, :8] * es[:8]) @ evh[:8]
    assert relative_error((u * s) @ vh, best) < 1e-5


# Float64 values that torch's float64 -> bf16/fp16 cast rounds twice (through float32) to the
# wrong neighbour: just above a bf16 (fp16) tie, but within float32's precision of it.
_TIES_ABOVE = [1 + 2**-8 + 2**-30, -(1 + 2**-8 + 2**-30), 1 + 2**-11 + 2**-30, -(1 + 2**-11 + 2**-30),
               3 * (1 + 2**-8 + 2**-30), 0.1, -2.5, 1e-3]


def _float64_adapter(directory, a):
    from safetensors.torch import save_file
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"]}))
    save_file({"base_model.model.layer.q.lora_A.weight": a,
               "base_model.model.layer.q.lora_B.weight": torch.zeros(3, 2, dtype=torch.float64)},
              str(directory / "adapter_model.safetensors"))
    return directory


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_float64_adapter_written_in_a_narrower_dtype_is_rounded_once(tmp_path, dtype):
    """`dtype` rounds the merged float64 tensors once (fedsoup.rounding.round_to, as every
    other output), not twice through float32 as torch's cast does."""
    from fedsoup.lora.driver import merge_adapter_files
    from fedsoup.rounding import round_to
    a = torch.tensor(_TIES_ABOVE, dtype=torch.float64).reshape(2, 4)
    inputs = [_float64_adapter(tmp_path / f"in{i}", a) for i in range(2)]  # equal: their soup is `a` exactly
    merge_adapter_files(inputs, tmp_path / "out", mode="factors", dtype=dtype)
    _, written = read(tmp_path / "out")
    expected = round_to(a, dtype)
    assert written["base_model.model.layer.q.lora_A.weight"].dtype == dtype
    assert torch.equal(written["base_model.model.layer.q.lora_A.weight"].view(torch.int16), expected.view(torch.int16))
    assert not torch.equal(a.to(dtype).view(torch.int16), expected.view(torch.int16))  # (torch's cast differs here)


def test_a_float64_base_merged_into_and_written_as_bf16_is_rounded_once(tmp_path):
    from safetensors.torch import load_file, save_file

    from fedsoup.lora.driver import merge_adapter_files
    from fedsoup.rounding import round_to
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    weight = torch.tensor(_TIES_ABOVE + _TIES_ABOVE[:4], dtype=torch.float64).reshape(3, 4)
    save_file({"layer.q.weight": weight}, str(base / "model.safetensors"))
    inputs = [_float64_adapter(tmp_path / f"in{i}", torch.ones(2, 4, dtype=torch.float64)) for i in range(2)]
    merge_adapter_files(inputs, tmp_path / "out", base=base, dtype=torch.bfloat16)  # B = 0: W + ΔW = W
    written = load_file(str(tmp_path / "out" / "model.safetensors"))["layer.q.weight"]
    assert torch.equal(written.view(torch.int16), round_to(weight, torch.bfloat16).view(torch.int16))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float8_e4m3fn])
@pytest.mark.parametrize("base,mode", [(False, "factors"), (False, "products"), (True, "products"),
                                       (True, "factors")])
def test_a_dtype_the_merge_overflows_is_refused_and_nothing_is_written(tmp_path, dtype, base, mode):
    """1e5 is finite in the merge and Inf (NaN in float8_e4m3fn) in `dtype`: an adapter or model
    holding it would load and be useless, so the merge refuses, naming the option."""
    from safetensors.torch import save_file

    from fedsoup.lora.driver import merge_adapter_files
    a = torch.tensor([[1e5, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]], dtype=torch.float64)
    inputs = [_float64_adapter(tmp_path / f"in{i}", a if not base else torch.ones(2, 4, dtype=torch.float64))
              for i in range(2)]
    if base:
        (tmp_path / "base").mkdir()
        (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "llama"}))
        save_file({"layer.q.weight": torch.full((3, 4), 1e5, dtype=torch.float64)},
                  str(tmp_path / "base" / "model.safetensors"))
    with pytest.raises(OptionError) as caught:
        merge_adapter_files(inputs, tmp_path / "out", mode=mode, base=tmp_path / "base" if base else None, dtype=dtype)
    assert (caught.value.option, caught.value.value) == ("dtype", str(dtype).removeprefix("torch."))
    assert not (tmp_path / "out").exists()


# --- dtype: every LoRA output rounded once, from its float32/float64 result ----------------------
# Hand computations in float64 (or exact fractions) rounded once, against outputs that used to be
# rounded into the adapters' (or the base's) dtype first and then into the dtype asked for.

_Q = "base_model.model.layer.q."


def _adapter_of(directory, a, b, *, alpha, extra=None):
    """An adapter on module ``layer.q`` holding ``a``/``b`` as they are (their dtype), ``r`` from ``a``."""
    from safetensors.torch import save_file
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": a.shape[0], "lora_alpha": alpha, "target_modules": ["q"],
         **({"modules_to_save": ["head"]} if extra is not None else {})}))
    tensors = {_Q + "lora_A.weight": a.contiguous(), _Q + "lora_B.weight": b.contiguous()}
    if extra is not None:
        tensors["base_model.model.layer.head.weight"] = extra.contiguous()
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


def _base_of(directory, weight, head=None):
    from safetensors.torch import save_file
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"layer.q.weight": weight, **({} if head is None else {"layer.head.weight": head})},
              str(directory / "model.safetensors"))
    return directory


def _bits(tensor):
    return tensor.view(torch.int16 if tensor.dtype.itemsize == 2 else torch.uint8)


def _assert_same_bits(written, expected):
    assert written.dtype == expected.dtype
    assert torch.equal(_bits(written), _bits(expected)), (written, expected)


def _narrow_pair(dtype, shape, seed):
    """Two ``dtype`` tensors whose first elements make the mean's double rounding go wrong: the
    mean of 1 and 1 + 2⁻⁷ is the bf16 tie 1 + 2⁻⁸ (exact in fp16); the mean of 1 + 2⁻⁷ + 2⁻¹⁰
    and 1 − 2⁻¹¹ is 1 + 2⁻⁸ + 2⁻¹², which fp16 rounds onto that tie and bf16 rounds up.
    The rest is random."""
    generator = torch.Generator().manual_seed(seed)
    x, y = (torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for _ in range(2))
    firsts = ([1.0, 1.0 + 2**-7, 1.0 - 2**-9] if dtype == torch.bfloat16
              else [1.0 + 2**-7 + 2**-10, 1.0 + 2**-8, 1.0 - 2**-11])
    seconds = ([1.0 + 2**-7, 1.0 + 2**-6, 1.0 - 2**-8] if dtype == torch.bfloat16
               else [1.0 - 2**-11, 1.0 - 2**-10, 1.0 + 2**-10])
    x.view(-1)[:3] = torch.tensor(firsts, dtype=torch.float64).to(dtype)
    y.view(-1)[:3] = torch.tensor(seconds, dtype=torch.float64).to(dtype)
    return x, y


@pytest.mark.parametrize("inputs,target", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)],
                         ids=["bf16-as-fp16", "fp16-as-bf16"])
def test_factors_in_another_dtype_are_the_exact_mean_rounded_once(tmp_path, inputs, target):
    """FedAvg on the factors written in `dtype` is the exact mean rounded once into it, not the mean
    rounded into the adapters' dtype and then into `dtype` (files and fedsoup.merge alike)."""
    import fedsoup
    from fedsoup.lora.driver import merge_adapter_files
    from tests.hf_helpers import correctly_rounded_mean
    a, b = _narrow_pair(inputs, (2, 6), seed=1), _narrow_pair(inputs, (5, 2), seed=2)
    directories = [_adapter_of(tmp_path / f"in{i}", a[i], b[i], alpha=4) for i in range(2)]
    merge_adapter_files(directories, tmp_path / "out", mode="factors", dtype=target)
    _, written = read(tmp_path / "out")
    in_memory = fedsoup.merge([read(d)[1] for d in directories], lora="factors", adapter_config=read(directories[0])[0],
                              dtype=target)
    fedsoup.merge_files(directories, tmp_path / "files", lora="factors", dtype=str(target).removeprefix("torch."))
    _, through_merge_files = read(tmp_path / "files")
    for key, pair in ((_Q + "lora_A.weight", a), (_Q + "lora_B.weight", b)):
        expected = correctly_rounded_mean(list(pair), dtype=target)
        _assert_same_bits(written[key], expected)
        _assert_same_bits(in_memory[key], expected)
        _assert_same_bits(through_merge_files[key], expected)
        twice = correctly_rounded_mean(list(pair)).to(target)  # (the mean in the inputs' dtype, then cast)
        assert not torch.equal(_bits(twice), _bits(expected))


def test_products_cat_in_another_dtype_is_rounded_once(tmp_path):
    """The soup of products at rank Σ r_i: B_cat = [ω_i s_i B_i] / s_out in float64, rounded once
    into fp16; A_cat = [A_i] (exact in fp16). With weights 1, 3, r = 2, α = 4: s_i = 2, s_out = 1,
    so B_out = [B_1/2, 3/2·B_2], exact in float32, and often a bf16 tie or off bf16's grid."""
    from fedsoup.lora.driver import merge_adapter_files
    from fedsoup.rounding import round_to
    a, b = _narrow_pair(torch.bfloat16, (2, 6), seed=3), _narrow_pair(torch.bfloat16, (5, 2), seed=4)
    directories = [_adapter_of(tmp_path / f"in{i}", a[i], b[i], alpha=4) for i in range(2)]
    merge_adapter_files(directories, tmp_path / "out", mode="products", weights=[1, 3], dtype=torch.float16)
    config, written = read(tmp_path / "out")
    assert config["r"] == 4 and config["lora_alpha"] == 4
    hand_b = torch.cat([b[0].double() * (0.25 * 2 / 1), b[1].double() * (0.75 * 2 / 1)], dim=1)
    expected_b = round_to(hand_b, torch.float16)
    _assert_same_bits(written[_Q + "lora_B.weight"], expected_b)
    _assert_same_bits(written[_Q + "lora_A.weight"], torch.cat([a[0], a[1]]).to(torch.float16))
    assert not torch.equal(_bits(round_to(hand_b, torch.bfloat16).to(torch.float16)), _bits(expected_b))


def test_products_into_a_bf16_base_written_as_fp16_are_rounded_once(tmp_path):
    """W + ΔW (exact in float32 here) rounded once into fp16, not into the base's bf16 first."""
    from safetensors.torch import load_file

    from fedsoup.lora.driver import merge_adapter_files
    from fedsoup.rounding import round_to
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(5, 6, generator=generator).to(torch.bfloat16)
    # ΔW = ½(s B_1 A_1 + s B_2 A_2), s = 1, rank 1: columns of powers of two times bf16 values
    a = [torch.full((1, 6), 2.0**-9, dtype=torch.bfloat16), torch.full((1, 6), 2.0**-10, dtype=torch.bfloat16)]
    b = [torch.ones(5, 1, dtype=torch.bfloat16), torch.arange(1, 6, dtype=torch.bfloat16).reshape(5, 1)]
    directories = [_adapter_of(tmp_path / f"in{i}", a[i], b[i], alpha=1) for i in range(2)]
    base = _base_of(tmp_path / "base", weight)
    merge_adapter_files(directories, tmp_path / "out", mode="products", base=base, dtype=torch.float16)
    written = load_file(str(tmp_path / "out" / "model.safetensors"))["layer.q.weight"]
    hand = weight.double() + 0.5 * (b[0].double() @ a[0].double() + b[1].double() @ a[1].double())
    expected = round_to(hand, torch.float16)
    _assert_same_bits(written, expected)
    assert not torch.equal(_bits(round_to(hand, torch.bfloat16).to(torch.float16)), _bits(expected))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_factors_into_an_fp32_base_never_pass_through_the_adapters_bf16(tmp_path, dtype):
    """Merged into the base, the merged factors are intermediates: W + s·B̄·Ā from their exact
    float32 means (Ā = 1 + 2⁻⁸ here, which bf16 rounds to 1), rounded once into the dtype written
    (the base's float32, or bf16)."""
    from safetensors.torch import load_file

    from fedsoup.lora.driver import merge_adapter_files
    from fedsoup.rounding import round_to
    a = [torch.ones(1, 4, dtype=torch.bfloat16), torch.full((1, 4), 1 + 2**-7, dtype=torch.bfloat16)]
    b = [torch.ones(3, 1, dtype=torch.bfloat16)] * 2
    directories = [_adapter_of(tmp_path / f"in{i}", a[i], b[i], alpha=1) for i in range(2)]  # s = 1
    weight = torch.full((3, 4), 2.0**-9)
    base = _base_of(tmp_path / "base", weight)
    merge_adapter_files(directories, tmp_path / "out", mode="factors", base=base, dtype=dtype)
    written = load_file(str(tmp_path / "out" / "model.safetensors"))["layer.q.weight"]
    hand = weight.double() + 1.0 * (b[0].double() @ ((a[0].double() + a[1].double()) / 2))  # 1 + 2⁻⁸ + 2⁻⁹
    expected = round_to(hand, dtype or torch.float32)
    assert torch.equal(written, expected), (written, expected)
    assert float(expected[0, 0]) != float(round_to(weight.double() + 1.0, dtype or torch.float32)[0, 0])


@pytest.mark.parametrize("base", [False, True])
def test_modules_to_save_in_another_dtype_are_the_exact_mean_rounded_once(tmp_path, base):
    """A full tensor of bf16 adapters written as fp16 (as an adapter, or into an fp16 base) is the
    exact mean rounded once into fp16."""
    from safetensors.torch import load_file

    from fedsoup.lora.driver import merge_adapter_files
    from tests.hf_helpers import correctly_rounded_mean
    heads = _narrow_pair(torch.bfloat16, (4, 6), seed=6)
    directories = [_adapter_of(tmp_path / f"in{i}", torch.ones(1, 6, dtype=torch.bfloat16),
                               torch.zeros(3, 1, dtype=torch.bfloat16), alpha=1, extra=heads[i]) for i in range(2)]
    base_dir = _base_of(tmp_path / "base", torch.zeros(3, 6, dtype=torch.float16),
                        torch.zeros(4, 6, dtype=torch.float16)) if base else None
    merge_adapter_files(directories, tmp_path / "out", mode="products", base=base_dir, dtype=torch.float16)
    if base:
        written = load_file(str(tmp_path / "out" / "model.safetensors"))["layer.head.weight"]
    else:
        written = read(tmp_path / "out")[1]["base_model.model.layer.head.weight"]
    _assert_same_bits(written, correctly_rounded_mean(list(heads), dtype=torch.float16))


def test_ame_over_products_in_another_dtype_rounds_its_float32_results_once(tmp_path):
    """AME over the dense updates: the full tensors are the float32 AME result rounded once into
    fp16 (the same merge of their float32 copies, rounded), never through bf16."""
    import fedsoup
    from fedsoup.lora.driver import merge_adapter_files
    from fedsoup.rounding import round_to
    heads = _narrow_pair(torch.bfloat16, (4, 6), seed=7)
    generator = torch.Generator().manual_seed(8)
    directories = [_adapter_of(tmp_path / f"in{i}", torch.randn(2, 6, generator=generator).to(torch.bfloat16),
                               torch.randn(3, 2, generator=generator).to(torch.bfloat16), alpha=2, extra=heads[i])
                   for i in range(2)]
    options = MergeOptions(optimizer="adam", lr=1e-3, epochs=2)
    merge_adapter_files(directories, tmp_path / "out", mode="products", options=options, dtype=torch.float16)
    written = read(tmp_path / "out")[1]["base_model.model.layer.head.weight"]
    ame = fedsoup.merge([{"head": h.float()} for h in heads], options)["head"]
    _assert_same_bits(written, round_to(ame, torch.float16))
    merge_adapter_files(directories, tmp_path / "plain", mode="products", options=options)
    _assert_same_bits(read(tmp_path / "plain")[1]["base_model.model.layer.head.weight"], round_to(ame, torch.bfloat16))


def _as_dtype(directories, root, dtype):
    """Copies of adapter directories with their tensors converted to ``dtype``."""
    from safetensors.torch import save_file
    copies = []
    for directory in directories:
        config, tensors = read(directory)
        copy = root / directory.name
        copy.mkdir(parents=True)
        (copy / "adapter_config.json").write_text(json.dumps(config))
        save_file({k: v.to(dtype) for k, v in tensors.items()}, str(copy / "adapter_model.safetensors"))
        copies.append(copy)
    return copies


@pytest.mark.parametrize("mode,base", [("factors", False), ("products", False), ("products", True),
                                       ("factors", True)])
@pytest.mark.parametrize("own", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_dtype_asked_for_is_what_no_dtype_writes_in_that_dtype(mode, base, own, gpt2_adapters, tmp_path):
    """`dtype` equal to the adapters' (the base's) dtype writes the bytes no `dtype` writes."""
    from safetensors.torch import load_file

    from fedsoup.lora.driver import merge_adapter_files
    adapters = gpt2_adapters if own == torch.float32 else _as_dtype(gpt2_adapters, tmp_path / "adapters", own)
    if base:
        gpt2_base().to(own).save_pretrained(str(tmp_path / "base"))
    outputs = []
    for name, dtype in (("plain", None), ("asked", own)):
        merge_adapter_files(adapters, tmp_path / name, mode=mode, weights=[1, 2, 5], dtype=dtype,
                            base=tmp_path / "base" if base else None)
        outputs.append(load_file(str(tmp_path / name / ("model.safetensors" if base else "adapter_model.safetensors"))))
    assert outputs[0].keys() == outputs[1].keys()
    for key in outputs[0]:
        assert torch.equal(outputs[0][key], outputs[1][key]), key


def test_merge_takes_dtype_with_the_lora_option(gpt2_adapters):
    import fedsoup
    configs, tensors = zip(*(read(d) for d in gpt2_adapters))
    merged = fedsoup.merge(list(tensors), lora="products", lora_rank=5, adapter_config=configs[0], weights=[1, 2, 3],
                           dtype="bf16")
    exact = merge_adapters(_load(gpt2_adapters), mode="products", rank=5, weights=[1, 2, 3], dtype=torch.bfloat16)
    assert merged.keys() == exact.state_dict.keys()
    for key, value in exact.state_dict.items():
        assert value.dtype == torch.bfloat16 and torch.equal(merged[key], value), key


def test_the_svd_factors_are_rounded_once_from_float64(tmp_path):
    """The truncated SVD is computed in float64 and its factors are rounded once from there into
    the dtype written, not through float32 (torch's cast): the same merge of float64 copies of
    the adapters (the stacked factors are exact here: ω_i s_i = 1) writes those float64 values."""
    from fedsoup.lora.driver import merge_adapter_files
    from fedsoup.rounding import round_to
    generator = torch.Generator().manual_seed(9)
    pairs = [(torch.randn(8, 4096, generator=generator).to(torch.bfloat16),
              torch.randn(4096, 8, generator=generator).to(torch.bfloat16)) for _ in range(2)]
    narrow = [_adapter_of(tmp_path / f"bf16-{i}", a, b, alpha=16) for i, (a, b) in enumerate(pairs)]  # s = 2, ω = ½
    wide = [_adapter_of(tmp_path / f"f64-{i}", a.double(), b.double(), alpha=16) for i, (a, b) in enumerate(pairs)]
    merge_adapter_files(narrow, tmp_path / "out", mode="products", rank=14, dtype=torch.float16)
    merge_adapter_files(wide, tmp_path / "reference", mode="products", rank=14)
    written, reference = read(tmp_path / "out")[1], read(tmp_path / "reference")[1]
    twice = 0
    for key in (_Q + "lora_A.weight", _Q + "lora_B.weight"):
        _assert_same_bits(written[key], round_to(reference[key], torch.float16))
        twice += int((_bits(reference[key].float().half()) != _bits(written[key])).sum())
    assert twice > 0  # (rounding through float32 differs somewhere here)


@pytest.mark.parametrize("options", [None, MergeOptions(optimizer="adam", lr=1e-3)], ids=["soup", "adam"])
def test_a_module_to_save_the_dtype_cannot_hold_is_refused(tmp_path, options):
    """A full tensor rounded into `dtype` after AME over products (or by the soup) is checked too."""
    from fedsoup.lora.driver import merge_adapter_files
    head = torch.full((4, 6), 1e5)
    directories = [_adapter_of(tmp_path / f"in{i}", torch.ones(1, 6), torch.ones(3, 1), alpha=1, extra=head + i)
                   for i in range(2)]
    with pytest.raises(OptionError) as caught:
        merge_adapter_files(directories, tmp_path / "out", mode="products", options=options, dtype=torch.float16)
    assert (caught.value.option, caught.value.value) == ("dtype", "float16")
    assert not (tmp_path / "out").exists()


def test_modules_to_save_into_base_tensors_of_two_dtypes_are_each_rounded_once_into_theirs(tmp_path):
    """Two modules_to_save tensors of bf16 adapters replacing an fp16 and a float32 base tensor:
    each is the exact mean rounded once into its base tensor's dtype (none through bf16)."""
    from safetensors.torch import load_file, save_file

    from fedsoup.lora.driver import merge_adapter_files
    from tests.hf_helpers import correctly_rounded_mean
    heads, norms = _narrow_pair(torch.bfloat16, (4, 6), seed=10), _narrow_pair(torch.bfloat16, (6,), seed=11)
    directories = []
    for i in range(2):
        directory = tmp_path / f"in{i}"
        directory.mkdir()
        (directory / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["q"],
             "modules_to_save": ["head", "norm"]}))
        save_file({_Q + "lora_A.weight": torch.ones(1, 6, dtype=torch.bfloat16),
                   _Q + "lora_B.weight": torch.zeros(3, 1, dtype=torch.bfloat16),
                   "base_model.model.layer.head.weight": heads[i], "base_model.model.layer.norm.weight": norms[i]},
                  str(directory / "adapter_model.safetensors"))
        directories.append(directory)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"layer.q.weight": torch.zeros(3, 6), "layer.head.weight": torch.zeros(4, 6, dtype=torch.float16),
               "layer.norm.weight": torch.zeros(6)}, str(base / "model.safetensors"))
    merge_adapter_files(directories, tmp_path / "out", mode="products", base=base)
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    _assert_same_bits(written["layer.head.weight"], correctly_rounded_mean(list(heads), dtype=torch.float16))
    assert torch.equal(written["layer.norm.weight"], correctly_rounded_mean(list(norms), dtype=torch.float32))
