"""Exact psi-class intersection numbers on the moduli space of stable curves, the data of
"Can Transformers Do Enumerative Geometry?" (Hashemi, Corominas & Giacchetto, ICLR 2025).

The correlator

    <tau_{d_1} ... tau_{d_n}>_g = int_{Mbar_{g,n}} psi_1^{d_1} ... psi_n^{d_n}

is a positive rational number when the degree matches the dimension,
``d_1 + ... + d_n = 3g - 3 + n``, and the curve is stable (``2g - 2 + n > 0``); it is 0
otherwise. It is symmetric in the ``d_i``. All values here are exact
(:class:`fractions.Fraction`), computed from two initial values

    <tau_0^3>_0 = 1,        <tau_1>_1 = 1/24

by the string equation (a ``tau_0`` removed),

    <tau_0 tau_{d_1} ... tau_{d_n}>_g = sum_j <tau_{d_1} ... tau_{d_j - 1} ... tau_{d_n}>_g,

and, when every ``d_i >= 1``, the Virasoro constraints in the DVV form of the
Witten-Kontsevich theorem (Dijkgraaf, Verlinde & Verlinde, 1991; Witten, 1991): for
``k >= -1``,

    (2k+3)!! <tau_{k+1} tau_{d_1} ... tau_{d_n}>_g
        = sum_j (2k + 2 d_j + 1)!! / (2 d_j - 1)!! <tau_{d_1} ... tau_{d_j + k} ... tau_{d_n}>_g
        + 1/2 sum_{r + s = k - 1} (2r+1)!! (2s+1)!! <tau_r tau_s tau_{d_1} ... tau_{d_n}>_{g-1}
        + 1/2 sum_{r + s = k - 1} (2r+1)!! (2s+1)!!
              sum_{g_1 + g_2 = g, I ⊔ J = {1..n}} <tau_r tau_I>_{g_1} <tau_s tau_J>_{g_2},

with ``(-1)!! = 1`` and unstable correlators 0. (``k = -1`` is the string equation,
``k = 0`` the dilaton equation ``<tau_1 ...>_g = (2g - 2 + n) <...>_g``.) Memoised over
sorted tuples, so a table up to genus 5 and 8 points takes about a second.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np

Key = tuple[int, tuple[int, ...]]


def double_factorial(m: int) -> int:
    """``m!! = m (m - 2) (m - 4) ...`` down to 1 or 2; ``(-1)!! = 0!! = 1``."""
    if m < -1:
        raise ValueError(f"m: expected >= -1, got {m}")
    out = 1
    for factor in range(m, 1, -2):
        out *= factor
    return out


def is_stable(genus: int, n: int) -> bool:
    """``Mbar_{g,n}`` exists: ``g >= 0``, ``n >= 0`` and ``2g - 2 + n > 0``."""
    return genus >= 0 and n >= 0 and 2 * genus - 2 + n > 0


def dimension_matches(genus: int, degrees: tuple[int, ...]) -> bool:
    """``sum d_i == dim Mbar_{g,n} = 3g - 3 + n`` and every ``d_i >= 0``."""
    return all(d >= 0 for d in degrees) and sum(degrees) == 3 * genus - 3 + len(degrees)


def intersection_number(genus: int, degrees, cache: dict[Key, Fraction] | None = None) -> Fraction:
    """``<tau_{d_1} ... tau_{d_n}>_g`` exactly (module docstring); 0 when unstable or when
    the degrees do not add up to the dimension. ``cache``: a dict reused across calls (the
    recursion fills it with every correlator it visits)."""
    degrees = tuple(sorted(int(d) for d in degrees))
    if genus < 0:
        raise ValueError(f"genus: expected >= 0, got {genus}")
    if not is_stable(genus, len(degrees)) or not dimension_matches(genus, degrees):
        return Fraction(0)
    cache = {} if cache is None else cache
    return _correlator(genus, degrees, cache)


def _correlator(genus: int, degrees: tuple[int, ...], cache: dict[Key, Fraction]) -> Fraction:
    """The recursion on a sorted key; unstable or mismatched keys are 0."""
    if not is_stable(genus, len(degrees)) or not dimension_matches(genus, degrees):
        return Fraction(0)
    key = (genus, degrees)
    if key in cache:
        return cache[key]
    if key == (0, (0, 0, 0)):
        value = Fraction(1)
    elif key == (1, (1,)):
        value = Fraction(1, 24)
    elif degrees[0] == 0:  # string equation
        rest = degrees[1:]
        value = sum((_correlator(genus, _sorted_replace(rest, j, rest[j] - 1), cache)
                     for j in range(len(rest)) if rest[j] > 0), Fraction(0))
    else:  # every d_i >= 1: DVV with tau_{k+1} the largest insertion
        value = dvv_rhs(genus, degrees[-1] - 1, degrees[:-1], lambda g, d: _correlator(g, tuple(sorted(d)), cache))
    cache[key] = value
    return value


def _sorted_replace(degrees: tuple[int, ...], j: int, value: int) -> tuple[int, ...]:
    return tuple(sorted(degrees[:j] + (value,) + degrees[j + 1:]))


def dvv_rhs(genus: int, k: int, others: tuple[int, ...], correlator) -> Fraction:
    """``<tau_{k+1} tau_{others}>_g`` from the DVV recursion (module docstring), where
    ``correlator(g, degrees)`` gives the smaller correlators (0 when unstable). Every
    ``others`` entry must be ``>= 0``; ``k >= -1``."""
    if k < -1:
        raise ValueError(f"k: expected >= -1, got {k}")
    n = len(others)
    total = Fraction(0)
    for j, d in enumerate(others):
        if d + k < 0:
            continue
        weight = Fraction(double_factorial(2 * k + 2 * d + 1), double_factorial(2 * d - 1))
        total += weight * correlator(genus, others[:j] + (d + k,) + others[j + 1:])
    for r in range(k):  # r + s = k - 1
        s = k - 1 - r
        weight = Fraction(double_factorial(2 * r + 1) * double_factorial(2 * s + 1), 2)
        if genus >= 1:
            total += weight * correlator(genus - 1, (r, s) + others)
        for size in range(n + 1):
            for part in itertools.combinations(range(n), size):
                first = tuple(others[i] for i in part)
                second = tuple(others[i] for i in range(n) if i not in part)
                for g1 in range(genus + 1):
                    left = correlator(g1, (r,) + first)
                    if left:
                        total += weight * left * correlator(genus - g1, (s,) + second)
    return total / double_factorial(2 * k + 3)


def partitions(total: int, parts: int, largest: int | None = None) -> list[tuple[int, ...]]:
    """Every non-decreasing tuple of ``parts`` integers ``>= 0`` (each ``<= largest``) that
    sums to ``total``, in lexicographic order."""
    if parts < 0 or total < 0:
        return []
    largest = total if largest is None else largest
    if parts == 0:
        return [()] if total == 0 else []
    out = []
    for last in range(min(total, largest), -1, -1):  # the largest part, then the rest below it
        out += [rest + (last,) for rest in partitions(total - last, parts - 1, last)]
    return sorted(out)


def intersection_table(max_genus: int, max_points: int, min_genus: int = 0,
                       cache: dict[Key, Fraction] | None = None) -> list[tuple[int, tuple[int, ...], Fraction]]:
    """Every non-zero correlator ``(g, (d_1 <= ... <= d_n), value)`` with
    ``min_genus <= g <= max_genus`` and ``1 <= n <= max_points`` (stable, dimension
    matching), ordered by ``(g, n, degrees)``."""
    if max_genus < 0 or max_points < 1 or min_genus < 0:
        raise ValueError(f"max_genus, max_points, min_genus: expected >= 0, >= 1, >= 0, got "
                         f"{max_genus}, {max_points}, {min_genus}")
    cache = {} if cache is None else cache
    rows = []
    for genus in range(min_genus, max_genus + 1):
        for n in range(1, max_points + 1):
            if not is_stable(genus, n):
                continue
            for degrees in partitions(3 * genus - 3 + n, n):
                rows.append((genus, degrees, intersection_number(genus, degrees, cache)))
    return rows


# ----------------------------------------------------------------------------- encodings

PAD = 0
ENCODINGS = ("tokens", "values")
VALUE_FEATURES = 4  # per position: value / VALUE_SCALE, is genus, is n, is degree
VALUE_SCALE = 10.0

Row = tuple[int, tuple[int, ...], Fraction]


def log10_value(value: Fraction) -> float:
    """``log10`` of a positive fraction, exact in the integers before rounding (no float overflow)."""
    if value <= 0:
        raise ValueError(f"value: expected > 0, got {value}")
    return math.log10(value.numerator) - math.log10(value.denominator)


def vocab_size(max_genus: int, max_points: int) -> int:
    """Tokens of :func:`encode_tokens`: padding, genus ``0..max_genus``, ``n`` in
    ``1..max_points``, degree ``0..3 max_genus - 3 + max_points``."""
    return 1 + (max_genus + 1) + max_points + (3 * max_genus - 2 + max_points)


def encode_tokens(rows: list[Row], max_genus: int, max_points: int) -> np.ndarray:
    """``[N, max_points + 2]`` int32: each correlator as the tokens ``g, n, d_1, ..., d_n``
    (degrees ascending), left-padded with :data:`PAD` so the last position is always the
    last degree. Genus token ``1 + g``, count token ``2 + max_genus + (n - 1)``, degree
    token ``2 + max_genus + max_points + d``."""
    length = max_points + 2
    out = np.full((len(rows), length), PAD, np.int32)
    for i, (genus, degrees, _) in enumerate(rows):
        if genus > max_genus or not 1 <= len(degrees) <= max_points:
            raise ValueError(f"rows: ({genus}, {degrees}) is outside genus <= {max_genus}, 1 <= n <= {max_points}")
        tokens = [1 + genus, 2 + max_genus + len(degrees) - 1] + [2 + max_genus + max_points + d for d in degrees]
        out[i, length - len(tokens):] = tokens
    return out


def encode_values(rows: list[Row], max_points: int) -> np.ndarray:
    """``[N, max_points + 2, 4]`` float32: the same layout as :func:`encode_tokens` with each
    position ``(number / 10, is genus, is n, is degree)`` (padding all zero), so a genus
    unseen in training is a new value on a trained axis rather than an untrained token."""
    length = max_points + 2
    out = np.zeros((len(rows), length, VALUE_FEATURES), np.float32)
    for i, (genus, degrees, _) in enumerate(rows):
        if not 1 <= len(degrees) <= max_points:
            raise ValueError(f"rows: ({genus}, {degrees}) has more than max_points = {max_points} points")
        numbers = [genus, len(degrees), *degrees]
        kinds = [1, 2] + [3] * len(degrees)
        start = length - len(numbers)
        out[i, start:, 0] = np.asarray(numbers, np.float32) / VALUE_SCALE
        out[i, np.arange(start, length), kinds] = 1.0
    return out
