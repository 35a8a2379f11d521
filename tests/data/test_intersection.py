"""psi-class intersection numbers (ssmjax.data.intersection) against values known by hand
or in closed form, the string/dilaton equations, symmetry, the dimension rule, and the
sequence encodings."""

import math
from fractions import Fraction as F

import numpy as np
import pytest

from ssmjax.data import intersection as ix


def test_initial_and_classical_values():
    assert ix.intersection_number(0, (0, 0, 0)) == 1
    assert ix.intersection_number(1, (1,)) == F(1, 24)
    assert ix.intersection_number(2, (4,)) == F(1, 1152)
    assert ix.intersection_number(2, (2, 3)) == F(29, 5760)
    assert ix.intersection_number(3, (7,)) == F(1, 82944)


@pytest.mark.parametrize("genus", [1, 2, 3, 4])
def test_one_point_numbers_are_one_over_24_to_the_g_g_factorial(genus):
    assert ix.intersection_number(genus, (3 * genus - 2,)) == F(1, 24 ** genus * math.factorial(genus))


def test_genus_zero_closed_form_and_genus_one_tau1_powers():
    # <tau_{d_1} ... tau_{d_n}>_0 = (n - 3)! / prod d_i!  (multinomial)
    for genus, degrees, value in ix.intersection_table(0, 7):
        assert value == F(math.factorial(len(degrees) - 3), math.prod(math.factorial(d) for d in degrees))
    # <tau_1^n>_1 = (n - 1)! / 24 (dilaton applied n - 1 times to <tau_1>_1)
    for n in range(1, 6):
        assert ix.intersection_number(1, (1,) * n) == F(math.factorial(n - 1), 24)


def test_string_and_dilaton_equations():
    cache = {}
    for genus, degrees in [(1, (1, 2)), (2, (1, 2, 3)), (2, (2, 2, 2, 1)), (3, (3, 4, 2))]:
        n = len(degrees)
        base = ix.intersection_number(genus, degrees, cache)
        assert ix.intersection_number(genus, (1, *degrees), cache) == (2 * genus - 2 + n) * base  # dilaton
        raised = (degrees[0] + 1,) + degrees[1:]  # <tau_0 tau_raised> matches the dimension
        assert ix.intersection_number(genus, (0, *raised), cache) == sum(
            ix.intersection_number(genus, raised[:j] + (raised[j] - 1,) + raised[j + 1:], cache)
            for j in range(n) if raised[j] > 0)  # string


def test_dvv_gives_the_same_number_whichever_insertion_it_removes():
    cache = {}
    lookup = lambda g, d: ix.intersection_number(g, d, cache)  # noqa: E731
    for genus, degrees in [(2, (2, 3)), (2, (1, 2, 3, 1)), (3, (2, 3, 4)), (3, (5, 4))]:
        value = ix.intersection_number(genus, degrees, cache)
        for j, d in enumerate(degrees):
            if d >= 1:
                assert ix.dvv_rhs(genus, d - 1, degrees[:j] + degrees[j + 1:], lookup) == value


def test_symmetric_zero_off_dimension_and_unstable():
    assert ix.intersection_number(2, (3, 2)) == ix.intersection_number(2, (2, 3))
    assert ix.intersection_number(3, (4, 2, 3, 0)) == ix.intersection_number(3, (0, 2, 3, 4))
    assert ix.intersection_number(2, (2, 2)) == 0  # 4 != 3g - 3 + n = 5
    assert ix.intersection_number(0, (0, 0)) == 0  # Mbar_{0,2} is unstable
    assert ix.intersection_number(1, ()) == 0
    assert ix.intersection_number(1, (-1, 3)) == 0
    with pytest.raises(ValueError, match="genus"):
        ix.intersection_number(-1, (0,))


def test_helpers_by_hand():
    assert [ix.double_factorial(m) for m in (-1, 0, 1, 5, 6)] == [1, 1, 1, 15, 48]
    with pytest.raises(ValueError, match="m:"):
        ix.double_factorial(-3)
    assert ix.partitions(3, 2) == [(0, 3), (1, 2)]
    assert ix.partitions(2, 3) == [(0, 0, 2), (0, 1, 1)]
    rows = ix.intersection_table(1, 3)  # genus 0 needs n >= 3; <tau_0 tau_2>_1 = <tau_1>_1 (string)
    assert rows == [(0, (0, 0, 0), 1), (1, (1,), F(1, 24)), (1, (0, 2), F(1, 24)), (1, (1, 1), F(1, 24)),
                    (1, (0, 0, 3), F(1, 24)), (1, (0, 1, 2), F(1, 12)), (1, (1, 1, 1), F(1, 12))]
    assert all(v > 0 for _, _, v in ix.intersection_table(3, 4))
    with pytest.raises(ValueError, match="max_points"):
        ix.intersection_table(1, 0)


def test_log10_is_exact_beyond_float_range():
    assert ix.log10_value(F(1, 1152)) == pytest.approx(-math.log10(1152), abs=1e-12)
    assert ix.log10_value(F(10 ** 400, 3)) == pytest.approx(400 - math.log10(3), abs=1e-9)
    with pytest.raises(ValueError, match="value"):
        ix.log10_value(F(0))


def test_encodings_by_hand():
    rows = [(1, (1,), F(1, 24)), (0, (0, 0, 0, 1), F(1))]
    tokens = ix.encode_tokens(rows, max_genus=1, max_points=4)  # genus 1+g, n 3+(n-1), degree 7+d
    assert tokens.tolist() == [[0, 0, 0, 2, 3, 8], [1, 6, 7, 7, 7, 8]]
    assert ix.vocab_size(1, 4) == 12 and tokens.max() < ix.vocab_size(1, 4)
    values = ix.encode_values(rows, max_points=4)
    assert values.shape == (2, 6, 4)
    np.testing.assert_allclose(values[0, 3:], [[0.1, 1, 0, 0], [0.1, 0, 1, 0], [0.1, 0, 0, 1]])
    assert not values[0, :3].any()
    with pytest.raises(ValueError, match="rows"):
        ix.encode_tokens([(2, (4,), F(1, 1152))], max_genus=1, max_points=4)
