"""``compiled(op)``: a scan op called under ``jax.jit`` instead of eagerly.

Eager calls dispatch op by op under the tests' beartype shape-checking hook, which is far
slower than compiling the small test programs once. Every argument whose leaves are all
arrays is traced; every other one (``method=``, ``chunk_size=``, flags, ``None``, cells)
is static, so one compiled program is cached per set of static values (and jax's cache
per shape). The op's own argument checks run while tracing, as in an eager call.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

_cache: dict = {}


def _traced(value) -> bool:
    leaves = jax.tree.leaves(value)
    return bool(leaves) and all(isinstance(leaf, (jax.Array, np.ndarray, np.generic)) for leaf in leaves)


def compiled(fn):
    """``fn`` with its array (pytree) arguments traced and the others static, jitted once per static set."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        traced_pos = tuple(i for i, a in enumerate(args) if _traced(a))
        traced_kw = tuple(sorted(k for k, v in kwargs.items() if _traced(v)))
        static_pos = tuple((i, a) for i, a in enumerate(args) if i not in traced_pos)
        static_kw = tuple(sorted((k, v) for k, v in kwargs.items() if k not in traced_kw))
        key = (fn, len(args), traced_pos, traced_kw, static_pos, static_kw)
        jitted = _cache.get(key)
        if jitted is None:
            def inner(pos, kw):
                full = dict(static_pos)
                full.update(zip(traced_pos, pos))
                return fn(*(full[i] for i in range(len(full))), **dict(static_kw), **kw)

            jitted = _cache[key] = jax.jit(inner)
        return jitted(tuple(args[i] for i in traced_pos), {k: kwargs[k] for k in traced_kw})

    return call
