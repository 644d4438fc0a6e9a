"""The exercise checks: each passes on the kit's own implementation, and names every known mistake."""

import pytest
import torch

from sae_kit import checks
from sae_kit.checks import CHECKS, CheckFailed, check

PAIRS = [(cid, i) for cid, c in CHECKS.items() for i in range(len(c.mutants))]


def test_at_least_twelve_exercises_across_the_notebooks():
    assert len(CHECKS) >= 12
    assert {cid[:2] for cid in CHECKS} == {"00", "01", "02", "03", "04", "05"}
    assert all(len(c.mutants) >= 2 for c in CHECKS.values())


@pytest.mark.parametrize("cid", sorted(CHECKS))
def test_the_kit_passes_its_own_check(cid, capsys):
    assert check(cid, CHECKS[cid].reference)
    assert capsys.readouterr().out.strip() == f"✔ {cid}: matches the kit on {len(CHECKS[cid].cases())} seeded cases."


@pytest.mark.parametrize("cid,i", PAIRS, ids=[f"{c}-{i}" for c, i in PAIRS])
def test_every_mutant_is_caught_with_its_message(cid, i):
    m = CHECKS[cid].mutants[i]
    with pytest.raises(CheckFailed) as e:
        check(cid, m.fn)
    assert str(e.value) == f"✘ {cid}: your result matches a known mistake: {m.message}."


@pytest.mark.parametrize("cid", sorted(CHECKS))
def test_mutants_are_told_apart(cid):
    """No two mutants of a check give the same results (else the message could name the wrong one)."""
    c = CHECKS[cid]
    cases = c.cases()
    outs = [[m.fn(*checks._clone(a)) for a in cases] for m in c.mutants]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert any(c.difference(a, b) is not None for a, b in zip(outs[i], outs[j])), (i, j)


def test_an_unknown_mistake_gets_where_and_by_how_much():
    def topk_select(pre, k):
        z = checks.CHECKS["00.topk_select"].reference(pre, k)
        z[1, 0] += 0.5
        return z
    with pytest.raises(CheckFailed, match=r"differs from the kit on case 1 of 3 \(tensor \(6, 20\), 3\): the result "
                                          r"differs by up to 0\.5 \(at index \(1, 0\)"):
        check("00.topk_select", topk_select)


def test_wrong_shape_and_type_are_named():
    with pytest.raises(CheckFailed, match=r"shape \(6, 3\), expected \(6, 20\)"):
        check("00.topk_select", lambda pre, k: pre.topk(k, -1).values)
    with pytest.raises(CheckFailed, match="should be a tuple of 3 values"):
        check("03.mp_encode", lambda x, D, s: x)
    with pytest.raises(CheckFailed, match="should be a number, got str"):
        check("00.fvu", lambda x, xh: "0.1")


def test_a_stub_raises_with_its_exercise_id():
    def fvu(x, x_hat):
        raise NotImplementedError("exercise 00.fvu: fill in this function")
    with pytest.raises(NotImplementedError, match="exercise 00.fvu"):
        check("00.fvu", fvu)


def test_inputs_are_not_shared_between_calls():
    """A function that writes into its input must not change what the kit's reference sees."""
    def inplace(pre, k):
        z = checks.CHECKS["00.topk_select"].reference(pre, k)
        pre.zero_()
        return z
    assert check("00.topk_select", inplace, quiet=True)


def test_unknown_id_lists_the_checks():
    with pytest.raises(KeyError, match="00.fvu"):
        check("00.nope", lambda: None)


def test_counts_and_masks_are_not_truncated_into_passing():
    ref_l0 = CHECKS["03.distinct_l0"].reference
    with pytest.raises(CheckFailed, match="whole numbers"):
        check("03.distinct_l0", lambda i, v: ref_l0(i, v).float() + 0.7)
    check("03.distinct_l0", lambda i, v: ref_l0(i, v).tolist(), quiet=True)  # a list of ints is fine
    ref_mc = CHECKS["01.mutual_choice_keep"].reference
    with pytest.raises(CheckFailed, match="boolean mask"):
        check("01.mutual_choice_keep", lambda p, k: 0.5 * ref_mc(p, k))
    check("01.mutual_choice_keep", lambda p, k: ref_mc(p, k).int(), quiet=True)  # 0/1 integers are a mask


def test_a_pursuit_that_stops_early_is_not_rejected_for_its_idle_atoms():
    ref = CHECKS["03.mp_encode"].reference

    def stops(x, D, steps):
        idx, vals, r = ref(x, D, steps)
        return torch.where(vals > 0, idx, 0), vals, r  # idle steps record atom 0, not the argmax
    assert check("03.mp_encode", stops, quiet=True)


def test_a_failed_check_renders_as_one_line_in_ipython():
    with pytest.raises(CheckFailed) as e:
        check("00.fvu", CHECKS["00.fvu"].mutants[0].fn)
    assert e.value._render_traceback_() == [str(e.value)]
