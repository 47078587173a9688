import math

import pytest

from mtplab import theory


def test_expected_tokens_hand_values():
    # alpha=0.5, gamma=3: 1 + .5 + .25 + .125 = 1.875
    assert theory.expected_tokens_per_round(0.5, 3) == pytest.approx(1.875)
    assert theory.expected_tokens_per_round(0.8, 4) == pytest.approx((1 - 0.8**5) / 0.2)  # 3.3616
    assert theory.expected_tokens_per_round(0.8, 4) == pytest.approx(3.3616)
    assert theory.expected_tokens_per_round(1.0, 5) == 6
    assert theory.expected_tokens_per_round(0.0, 7) == 1
    assert theory.expected_tokens_per_round(0.3, 0) == 1


def test_walltime_factor_hand_values():
    # Leviathan: alpha=0.8, gamma=4, c=0.05 -> 3.3616 / 1.2 = 2.80133
    assert theory.walltime_factor(0.8, 4, 0.05) == pytest.approx(3.3616 / 1.2)
    # with a measured verify cost v(4)=1.5 the same draft pays less: 3.3616 / (0.2 + 1.5)
    assert theory.walltime_factor(0.8, 4, 0.05, {1: 1.1, 4: 1.5}) == pytest.approx(3.3616 / 1.7)
    # interpolation between measured points: v(2) = 1.1 + (1.5-1.1)/3
    assert theory.verify_cost_of({1: 1.1, 4: 1.5}, 2) == pytest.approx(1.1 + 0.4 / 3)
    assert theory.verify_cost_of(lambda g: 1 + 0.1 * g, 5) == pytest.approx(1.5)
    assert "Leviathan" in theory.assumption(None) and "measured" in theory.assumption({1: 1.0})


def test_best_gamma():
    # alpha=0.8, c=0.05: factors 1.714, 2.213, 2.529, 2.801(γ=4)... peak is at γ=8..9 region; check by brute force
    g = theory.best_gamma(0.8, 0.05)
    values = {k: theory.walltime_factor(0.8, k, 0.05) for k in range(1, 17)}
    assert values[g] == max(values.values())
    assert theory.best_gamma(0.5, 0.5) == 1  # expensive drafter, weak acceptance: draft one token
    # a costly verify curve shortens the best draft
    steep = lambda k: 1 + 0.3 * k
    assert theory.best_gamma(0.8, 0.05, steep) < g


def test_alpha_inversion_round_trips():
    for a in (0.1, 0.5, 0.9):
        e = theory.expected_tokens_per_round(a, 4)
        assert theory.alpha_from_acceptance_length(e, 4) == pytest.approx(a, abs=1e-9)
    with pytest.raises(ValueError, match="mean acceptance length"):
        theory.alpha_from_acceptance_length(7.0, 4)


def test_simulation_converges_to_formula():
    sim = theory.simulate(0.7, 5, 0.1, num_rounds=20000, seed=3)
    expected = theory.expected_tokens_per_round(0.7, 5)
    assert sim.tokens_per_round == pytest.approx(expected, rel=0.02)
    assert sim.walltime_factor == pytest.approx(theory.walltime_factor(0.7, 5, 0.1), rel=0.02)
    r = sim.rounds[0]
    assert len(r.outcomes) == 5 and r.outcomes.count("accepted") == r.accepted
    assert theory.simulate(0.7, 5, 0.1, seed=3).rounds == theory.simulate(0.7, 5, 0.1, seed=3).rounds


@pytest.mark.parametrize("bad", [dict(alpha=1.2, gamma=2, c=0.1), dict(alpha=0.5, gamma=-1, c=0.1),
                                 dict(alpha=0.5, gamma=2, c=-1)])
def test_bad_theory_input(bad):
    with pytest.raises(ValueError):
        theory.walltime_factor(**bad)
    assert not math.isnan(theory.walltime_factor(0.5, 2, 0.1))
