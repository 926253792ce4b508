"""Group-relative advantages against the upstream trackers, and across ranks (gloo)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from regclip import group_advantages
from strategies import seeds


def numpy_reference(rewards, ids, std_mode, eps, ddof):
    """Per-prompt statistics as Flow-GRPO's tracker (ddof=0) / DanceGRPO (ddof=1) compute them."""
    out = np.zeros_like(rewards)
    global_std = np.std(rewards, ddof=ddof)
    for g in np.unique(ids):
        sel = ids == g
        group = rewards[sel]
        std = (
            global_std
            if std_mode == "global"
            else (np.std(group, ddof=ddof) if group.size > ddof else 0.0)
        )
        out[sel] = (group - group.mean()) / (std + eps)
    return out


@pytest.mark.filterwarnings("ignore:a group has a single sample")  # groups of 1 drawn
@given(
    seed=seeds,
    groups=st.integers(1, 6),
    std_mode=st.sampled_from(["group", "global"]),
    flavour=st.sampled_from([(1e-4, False), (1e-8, True)]),
)
def test_matches_per_prompt_reference(seed, groups, std_mode, flavour):
    eps, unbiased = flavour
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, groups, size=24)
    rewards = rng.normal(size=24) * rng.uniform(0.1, 3)
    ours = group_advantages(
        torch.from_numpy(rewards), torch.from_numpy(ids), std=std_mode, eps=eps, unbiased=unbiased
    )
    expected = numpy_reference(rewards, ids, std_mode, eps, int(unbiased))
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:a group has a single sample")  # groups of 1 drawn
@given(seed=seeds)
def test_advantages_are_permutation_equivariant_and_zero_mean_per_group(seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 4, (20,), generator=gen)
    rewards = torch.randn(20, generator=gen, dtype=torch.float64)
    adv = group_advantages(rewards, ids)
    perm = torch.randperm(20, generator=gen)
    torch.testing.assert_close(group_advantages(rewards[perm], ids[perm]), adv[perm])
    for g in ids.unique():
        assert abs(float(adv[ids == g].sum())) < 1e-9


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="`group_ids`"):
        group_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="`rewards`"):
        group_advantages(torch.tensor([0.0, float("nan")]), torch.zeros(2, dtype=torch.long))


def test_group_of_one_warns_and_gets_zero_advantage():
    rewards = torch.tensor([1.0, 2.0, 3.0])
    ids = torch.tensor([0, 0, 1])  # group 1 has one sample
    with pytest.warns(UserWarning, match="single sample"):
        adv = group_advantages(rewards, ids)
    assert adv[2] == 0


def test_groups_of_two_or_more_do_not_warn(recwarn):
    group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([0, 0, 1, 1]))
    assert not [w for w in recwarn if "single sample" in str(w.message)]


def test_integer_rewards_give_float_advantages_equal_to_the_float_rewards():
    """[0, 0, 1, 1] used to come back truncated to int64 zeros."""
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    for dtype in (torch.int64, torch.int32, torch.uint8):
        rewards = torch.tensor([0, 0, 1, 1, 3, 5, 10], dtype=dtype)
        adv = group_advantages(rewards, ids)
        assert adv.dtype == torch.float32
        torch.testing.assert_close(adv, group_advantages(rewards.float(), ids))
        assert bool((adv[:2] < 0).all() and (adv[2:4] > 0).all())


def test_bool_rewards_are_refused_naming_the_explicit_conversion():
    with pytest.raises(ValueError, match=r"`rewards`.*rewards\.float\(\)"):
        group_advantages(torch.tensor([True, False, True, False]), torch.tensor([0, 0, 1, 1]))


@pytest.mark.parametrize("std_mode", ["group", "global"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_groups_of_equal_rewards_get_exactly_zero_advantage_even_with_eps_zero(std_mode, unbiased):
    """eps = 0 with equal rewards was 0/0 = NaN; 0.1 * 3 / 3 != 0.1 made it +/-1."""
    rewards = torch.tensor([0.1, 0.1, 0.1, 2.0, 2.0, 0.3, 0.7], dtype=torch.float64)
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    adv = group_advantages(rewards, ids, std=std_mode, eps=0.0, unbiased=unbiased)
    assert bool(torch.isfinite(adv).all())
    assert torch.equal(adv[:5], torch.zeros(5, dtype=torch.float64))
    assert bool(adv[5] < 0 < adv[6])
    same = group_advantages(torch.full((4,), 0.7), torch.zeros(4, dtype=torch.long), eps=0.0)
    assert torch.equal(same, torch.zeros(4))


@pytest.mark.parametrize("eps", [-1e-4, float("nan"), float("inf")])
def test_bad_eps_is_refused(eps):
    with pytest.raises(ValueError, match="`eps`"):
        group_advantages(torch.tensor([0.0, 1.0]), torch.tensor([0, 0]), eps=eps)
