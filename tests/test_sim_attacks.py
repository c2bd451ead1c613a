"""Byzantine client updates."""

from __future__ import annotations

import pytest
import torch

from simulations.attacks import attack_update, malicious_partitions

GLOBAL = {"w": torch.zeros(3), "steps": torch.tensor(4)}
LOCAL = {"w": torch.tensor([1.0, -2.0, 0.5]), "steps": torch.tensor(5)}


def test_sign_flip_and_scale():
    flipped = attack_update(LOCAL, GLOBAL, "sign-flip", 2.0, seed=0)
    assert torch.equal(flipped["w"], torch.tensor([-2.0, 4.0, -1.0]))
    scaled = attack_update(LOCAL, GLOBAL, "scale", 3.0, seed=0)
    assert torch.equal(scaled["w"], torch.tensor([3.0, -6.0, 1.5]))
    assert torch.equal(scaled["steps"], LOCAL["steps"])  # integers untouched


@pytest.mark.parametrize("kind", ["gaussian-noise", "cauchy-noise"])
def test_noise_is_seeded_and_scaled_by_the_update(kind):
    local = {"w": torch.ones(10_000)}
    glob = {"w": torch.zeros(10_000)}
    a = attack_update(local, glob, kind, 1.0, seed=1)
    assert torch.equal(a["w"], attack_update(local, glob, kind, 1.0, seed=1)["w"])
    assert not torch.equal(a["w"], attack_update(local, glob, kind, 1.0, seed=2)["w"])
    noise = a["w"] - 1.0
    if kind == "gaussian-noise":
        assert noise.std() == pytest.approx(1.0, rel=0.05)  # update RMS is 1
    else:
        assert noise.abs().max() > 100  # heavy tails
        assert noise.median().abs() < 0.1


def test_nan_makes_every_float_tensor_nan_and_keeps_integers():
    broken = attack_update(LOCAL, GLOBAL, "nan", 1.0, seed=0)
    assert torch.isnan(broken["w"]).all() and broken["w"].dtype == LOCAL["w"].dtype
    assert torch.equal(broken["steps"], LOCAL["steps"])


def test_none_is_identity_and_unknown_is_rejected():
    assert attack_update(LOCAL, GLOBAL, "none", 1.0, seed=0) is LOCAL
    with pytest.raises(ValueError, match="unknown attack 'flip'"):
        attack_update(LOCAL, GLOBAL, "flip", 1.0, seed=0)


def test_malicious_partitions():
    chosen = malicious_partitions(10, 0.3, seed=0)
    assert len(chosen) == 3 and chosen <= set(range(10))
    assert chosen == malicious_partitions(10, 0.3, seed=0)
    assert malicious_partitions(10, 0.0, seed=0) == frozenset()
    assert malicious_partitions(10, 1.0, seed=0) == frozenset(range(10))
