import itertools

import pytest

from tidal import ResidencyPlan
from tidal.errors import ConfigError
from tidal.plan import spread_streamed


@pytest.mark.parametrize("n", range(1, 41))
def test_fraction_plans_have_the_right_count_and_spread(n):
    for k in range(n + 1):
        plan = ResidencyPlan.from_fraction(n, k / n)
        assert len(plan.resident_layers) == k
        streamed = plan.streamed_layers
        assert len(set(streamed)) == len(streamed) == n - k
        assert set(plan.resident_layers) | set(streamed) == set(range(n))
        # evenly spread: the gaps between consecutive streamed layers differ by at most one
        if len(streamed) > 1:
            gaps = [b - a for a, b in zip(streamed, streamed[1:])]
            assert max(gaps) - min(gaps) <= 1, (n, k, streamed)


def test_spread_examples():
    assert spread_streamed(8, 4) == [1, 3, 5, 7]
    assert spread_streamed(6, 2) == [1, 4]
    assert spread_streamed(5, 5) == [0, 1, 2, 3, 4]
    assert str(ResidencyPlan.from_fraction(4, 0.5)) == "ResidencyPlan(2/4 resident: RsRs)"


def test_next_streamed_wraps_into_the_next_forward():
    plan = ResidencyPlan.from_layers(8, [0, 2, 4, 6])
    assert plan.next_streamed(0, 2) == [1, 3]
    assert plan.next_streamed(5, 3) == [7, 1, 3]
    assert plan.next_streamed(7, 10) == [1, 3, 5]  # never itself, never more than exist
    assert plan.next_streamed(3, 0) == []
    assert ResidencyPlan.from_fraction(4, 1.0).next_streamed(0, 2) == []


def test_explicit_layers():
    plan = ResidencyPlan.from_layers(5, [4, 0])
    assert plan.resident_layers == (0, 4) and plan.streamed_layers == (1, 2, 3)
    assert plan.resident_fraction == pytest.approx(0.4)


@pytest.mark.parametrize("bad", [[5], [-1], [1, 1], ["0"], [True], [0.0]])
def test_explicit_layers_rejects_bad_indices(bad):
    with pytest.raises(ConfigError, match="resident_layers"):
        ResidencyPlan.from_layers(5, bad)


@pytest.mark.parametrize("bad", [-0.1, 1.01, float("nan"), "0.5", None])
def test_fraction_rejects_out_of_range(bad):
    with pytest.raises(ConfigError, match="resident_fraction"):
        ResidencyPlan.from_fraction(4, bad)


def test_budget_picks_the_most_resident_plan_that_fits():
    layer_bytes = [100] * 10
    fixed, slots = 50, 3
    for budget in range(0, 1200, 7):
        try:
            plan = ResidencyPlan.from_budget(layer_bytes, budget, fixed, ring_slots=slots)
        except ConfigError as e:
            assert "device_budget_bytes" in str(e)
            assert budget < fixed + slots * 100
            continue
        assert plan.device_bytes(layer_bytes, fixed, slots) <= budget
        k = len(plan.resident_layers)
        if k < 10:  # one more resident layer would not fit
            bigger = ResidencyPlan.from_fraction(10, (k + 1) / 10)
            assert bigger.device_bytes(layer_bytes, fixed, slots) > budget


def test_budget_counts_a_ring_no_larger_than_the_streamed_layers():
    plan = ResidencyPlan.from_fraction(4, 0.75)
    assert plan.device_bytes([10, 20, 30, 40], 5, ring_slots=3) == 5 + (10 + 30 + 40) + 1 * 20
    assert ResidencyPlan.from_fraction(4, 1.0).device_bytes([10] * 4, 0, 3) == 40


def test_every_explicit_plan_round_trips():
    for mask in itertools.product([False, True], repeat=6):
        plan = ResidencyPlan.from_layers(6, [i for i, r in enumerate(mask) if r])
        assert plan.resident == mask
