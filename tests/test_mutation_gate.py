"""The mutation gate's arithmetic (tests/mutation_gate.py): a gate with a wrong bound would pass anything."""

import math

import pytest

from hypothesis import given
from hypothesis import strategies as st

from mutation_gate import ALPHA, FileScore, draw, of_file, of_functions


def sample_score(killed: int, survived: int) -> FileScore:
    verdicts = {f"m.x_f__mutmut_{i}": "killed" for i in range(killed)}
    verdicts |= {f"m.x_g__mutmut_{i}": "survived" for i in range(survived)}
    return FileScore("src/pasd_verify/sha.py", verdicts)


@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))))
def test_upper_bound_is_the_exact_binomial_bound(case):
    """The bound u is the true score at which killing at most k of n sampled mutants has probability 5% (the
    binomial tail summed here term by term), and it lies above k/n; all killed gives 1."""
    n, k = case
    u = sample_score(k, n - k).upper_bound
    assert k / n <= u <= 1
    if k < n:
        tail = sum(math.comb(n, i) * u**i * (1 - u) ** (n - i) for i in range(k + 1))
        assert math.isclose(tail, ALPHA, rel_tol=1e-6)
    else:
        assert u == 1


def test_equivalent_and_unchecked_mutants_leave_the_score():
    score = sample_score(9, 2)
    score.verdicts["m.x_h__mutmut_1"] = "not checked"
    score.verdicts["m.x_h__mutmut_2"] = "timeout"  # a mutant that hangs the tests is caught
    score.equivalent.add("m.x_g__mutmut_0")
    assert (score.killed, len(score.counted)) == (10, 11)


def test_a_weakened_suite_fails_the_sampled_gate_and_the_goal_passes_it():
    """At ten mutants a file, one survivor passes the 95% goal and three pass 90%; a file whose tests kill only six
    in ten fails."""
    assert sample_score(9, 1).upper_bound >= 0.95 and sample_score(7, 3).upper_bound >= 0.90
    assert sample_score(6, 4).upper_bound < 0.90


@given(st.dictionaries(st.sampled_from(["a.py", "b.py", "c.py"]),
                       st.sets(st.text("xyz", min_size=1, max_size=4), min_size=1), min_size=1),
       st.integers(1, 5), st.integers(0, 3))
def test_draw_is_seeded_and_takes_k_from_each_file(population, k, seed):
    population = {path: {f"{path}:{name}": "not checked" for name in names} for path, names in population.items()}
    chosen = draw(population, k, seed)
    assert chosen == draw(population, k, seed)
    for path, names in population.items():
        assert len(set(chosen) & names.keys()) == min(k, len(names))


def test_one_file_is_picked_by_its_name_and_nothing_else():
    population = {"src/pasd_verify/sha.py": {"a": "not checked"},
                  "src/pasd_verify/encodings.py": {"b": "not checked", "c": "not checked"}}
    assert of_file(population, "encodings.py") == {"b", "c"}
    assert of_file(population, "pasd_verify/sha.py") == {"a"}
    for wrong in ("ha.py", "nowhere.py"):  # a suffix that is not a whole name picks nothing
        with pytest.raises(SystemExit, match="matches 0"):
            of_file(population, wrong)


def test_functions_are_picked_by_their_source_names_and_a_missing_one_is_refused():
    names = {"pasd_verify.sha.x_convert_to_sha__mutmut_1", "pasd_verify.sha.x_convert_to_sha__mutmut_2",
             "pasd_verify.sha.x_convert_to_sha_helper__mutmut_1", "pasd_verify.sha.xǁSHAǁforward__mutmut_7",
             "pasd_verify.sha.xǁSHAǁforward_all__mutmut_1"}
    assert of_functions(names, ["convert_to_sha"]) == {"pasd_verify.sha.x_convert_to_sha__mutmut_1",
                                                      "pasd_verify.sha.x_convert_to_sha__mutmut_2"}
    assert of_functions(names, ["SHA.forward", "convert_to_sha_helper"]) == {
        "pasd_verify.sha.xǁSHAǁforward__mutmut_7", "pasd_verify.sha.x_convert_to_sha_helper__mutmut_1"}
    with pytest.raises(SystemExit, match="x_forward"):  # a method named without its class is no function here
        of_functions(names, ["forward"])
