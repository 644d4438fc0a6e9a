import math

import pytest

from sae_kit import sweeps


def rows(label, pts, seed=0):
    return [{"label": label, "k": k, "l0": l0, "fvu": f, "seed": seed} for k, l0, f in pts]


def test_matched_l0_gap_interpolates_the_reference_frontier_in_log_log():
    ref = rows("ref", [(8, 8.0, 0.4), (32, 32.0, 0.1)])  # FVU ∝ L0^-1 on log-log
    var = rows("var", [(16, 16.0, 0.1)])  # reference at L0 16 is 0.2
    assert sweeps.matched_l0_gap(ref + var, "var", "ref")[0] == pytest.approx(math.log(0.5))
    out = rows("out", [(64, 64.0, 0.05)])  # extrapolated reference: 0.05
    assert sweeps.matched_l0_gap(ref + out, "out", "ref")[0] == pytest.approx(0.0, abs=1e-9)


def test_decided_gap_needs_seeds_and_a_gap_beyond_their_noise():
    ref = rows("ref", [(8, 8.0, 0.4), (32, 32.0, 0.1)])
    better = rows("var", [(8, 8.0, 0.2), (32, 32.0, 0.05)])
    assert sweeps.decided_gap(ref + better, "var", "ref", 32)[1] is None  # one seed: undecided
    seeds = rows("ref", [(32, 32.0, 0.101)], seed=1) + rows("var", [(32, 32.0, 0.051)], seed=1)
    gaps, held, noise = sweeps.decided_gap(ref + better + seeds, "var", "ref", 32)
    assert held is True and noise < 0.1
    noisy = rows("ref", [(32, 32.0, 0.3)], seed=1) + rows("var", [(32, 32.0, 0.051)], seed=1)
    assert sweeps.decided_gap(ref + better + noisy, "var", "ref", 32)[1] is None
