"""pLSTM: linear recurrences on the line graph of a DAG (1-D sequences and 2-D grids).

Pöppel, Freinschlag, Schmied, Lin and Hochreiter, 2025, "pLSTM: parallelizable Linear
Source Transition Mark networks". The cell state lives on the *edges* of a directed
acyclic graph. Every node ``n`` has a query, key and value ``q_n, k_n [dk]``, ``v_n
[dv]`` and three gates: a **Source** ``S^n_{e'}`` (node input -> outgoing edge ``e'``), a
**Transition** ``T^n_{e' e}`` (incoming edge ``e`` -> outgoing edge ``e'``) and a **Mark**
``M^n_e`` (incoming edge ``e`` -> node output), plus a **Direct** ``D^n`` (node input ->
node output). Each edge state is ``C_e [J, dk, dv]`` (``J`` = ``transition_dim``; the
gates are ``J``-vectors and ``J x J`` matrices)::

    C_{e'}[i] = sum_{e in in(n)} sum_j T^n_{e' e}[i, j] C_e[j]  +  S^n_{e'}[i] k_n v_n^T
    y_n       = sum_{e in in(n)} sum_j M^n_e[j] C_e[j]^T q_n    +  D^n (q_n . k_n) v_n

Unrolled, ``y_n = sum_{m <= n} G_{nm} (q_n . k_m) v_m`` (plus the initial boundary
states), with the *gating matrix* ``G_{nm} = sum_{paths m -> n} M T ... T S`` (``G_nn =
D^n``): linear attention whose decay is a sum over paths in the DAG.

Graphs handled here:

* **1-D** (the line graph of a sequence): one incoming edge (from ``t - 1``), one outgoing
  edge (to ``t + 1``); ``C_t`` is the state on the edge ``t -> t + 1``::

      y_t = q_t^T (sum_j mark_t[j] C_{t-1}[j]) + direct_t (q_t . k_t) v_t
      C_t[i] = sum_j transition_t[i, j] C_{t-1}[j] + source_t[i] k_t v_t^T

  A linear recurrence with matrix-valued (``J x J``) gates whose output reads the state
  *before* the node's own write (the direct term covers ``m = n``).
* **2-D grid**, edges from the left and from the top: node ``(i, j)`` receives ``L`` (the
  right-going edge state from ``(i, j-1)``) and ``U`` (the down-going one from
  ``(i-1, j)``) and emits ``R``, ``D``. Edge order ``[right, down]`` for outgoing and
  ``[left, up]`` for incoming::

      y_ij = q^T (mark[left] . L + mark[up] . U) + direct (q . k) v
      R_ij = T[right, left] L + T[right, up] U + source[right] k v^T
      D_ij = T[down,  left] L + T[down,  up] U + source[down]  k v^T

  The grid border receives the initial boundary states (zeros by default) and the
  states leaving the right column / bottom row are returned, so grids can be stitched.

The stability modes of the paper (P-mode: for every incoming edge the absolute
transitions to all outgoing edges sum to at most one; D-mode: the line graph is reduced
to a multitree and each remaining ``|T| <= 1``) are properties of the gate values; the
layers in :mod:`ssmjax.layers.plstm` build them. The functions here take any gates.

Evaluations:

* ``"sequential"``: the DAG recurrence node by node in topological (raster) order, a
  ``lax.scan`` (1-D) or a ``lax.scan`` over rows of ``lax.scan`` over columns (2-D);
  the oracle.
* ``"chunked"`` (1-D): chunks of ``chunk_size`` nodes. Inside a chunk the gating
  coefficients are propagated once for all chunks at once (:func:`_line_coefficients`):
  every edge state is a linear combination of the chunk's *origins* (its incoming
  boundary state and each node's source), so a scan over the chunk's positions carrying
  the ``[origins, J]`` coefficients gives the in-chunk gating matrix ``G``, the read-out of
  the incoming state, and the chunk's transfer ``C_out = A C_in + U``. The chunk
  transfers are chained by :func:`ssmjax.scan.linear.matrix_scan` (its custom VJP is the
  reverse scan), and outputs are the masked attention form ``((q k^T) * G) v`` plus the
  read of ``C_in``: ``O(T C (dk + dv) + T dk dv J)`` work, ``C + T / C`` sequential steps.
* ``"tiled"`` (2-D): the same idea on ``tile_size`` tiles: the coefficient propagation
  runs inside every tile at once (origins: the tile's left and top boundary edges and its
  nodes' sources), giving each tile's in-tile gating matrix, boundary read-out and
  boundary transfer ``[R_out; D_out] = A [L_in; U_in] + U``; the tile transfers are then
  chained over the (coarse) tile grid by the same 2-D recurrence with block transitions,
  and every output is finished in parallel. Sequential depth ``tH tW + (H / tH)(W / tW)``
  instead of ``H W``. Grids that the tile does not divide are padded with nodes that pass
  boundary states straight through.
* ``"auto"``: ``"chunked"`` / ``"tiled"``.

Gradients are JAX autodiff of the above (the across-chunk 1-D pass through
``matrix_scan``'s reverse-scan VJP).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike
from jaxtyping import Float

from ssmjax.scan import _dispatch
from ssmjax.scan._checks import (
    carry_cut_mask,
    check_chunk_size,
    check_ndim,
    check_real_floating,
    check_shape,
    flip_time,
    pad_time,
    state_dtype,
)
from ssmjax.scan.linear import matrix_scan

PLSTM_METHODS = _dispatch.TABLE["plstm_1d"].methods
PLSTM_2D_METHODS = _dispatch.TABLE["plstm_2d"].methods


def _time_major(x: Array, axes: int = 1) -> Array:
    """Move the leading ``axes`` axes after batch to the front: ``[b, t, ...] -> [t, b, ...]``
    (``axes=2``: ``[b, H, W, ...] -> [H, W, b, ...]``)."""
    return jnp.moveaxis(x, tuple(range(1, 1 + axes)), tuple(range(axes)))


def _batch_major(x: Array, axes: int = 1) -> Array:
    return jnp.moveaxis(x, tuple(range(axes)), tuple(range(1, 1 + axes)))


# ============================================================================= 1-D
def plstm_1d_sequential(
    q: Float[Array, "batch time heads dk"],
    k: Float[Array, "batch time heads dk"],
    v: Float[Array, "batch time heads dv"],
    source: Float[Array, "batch time heads J"],
    transition: Float[Array, "batch time heads J J"],
    mark: Float[Array, "batch time heads J"],
    direct: Float[Array, "batch time heads"],
    initial_state: Float[Array, "batch heads J dk dv"],
) -> tuple[Float[Array, "batch time heads dv"], Float[Array, "batch heads J dk dv"]]:
    """The 1-D recurrence node by node (``lax.scan``); the oracle of :func:`plstm_1d`."""

    def node(C, inputs):
        q_t, k_t, v_t, s_t, T_t, m_t, d_t = inputs
        read = jnp.einsum("bhj,bhjkv->bhkv", m_t, C)
        y = jnp.einsum("bhk,bhkv->bhv", q_t, read) + (d_t * jnp.sum(q_t * k_t, -1))[..., None] * v_t
        kv = k_t[..., :, None] * v_t[..., None, :]
        C = jnp.einsum("bhij,bhjkv->bhikv", T_t, C) + s_t[..., None, None] * kv[:, :, None]
        return C, y

    inputs = tuple(_time_major(x) for x in (q, k, v, source, transition, mark, direct))
    final, y = jax.lax.scan(node, initial_state, inputs)
    return _batch_major(y), final


def _line_coefficients(
    transition: Float[Array, "C *lead J J"],
    source: Float[Array, "C *lead J"],
    mark: Float[Array, "C *lead J"],
) -> tuple[Float[Array, "C *lead O"], Float[Array, "*lead O J"]]:
    """Gating coefficients of a line of ``C`` nodes (position-major), for every leading
    index at once.

    The origins ``O = J + C`` are the ``J`` components of the incoming boundary state and
    the ``C`` node sources; ``E [O, J]`` holds the coefficients of the edge state entering
    the current node, ``E[o, i]`` = weight of origin ``o`` in state component ``i``. At
    node ``c``: ``read[c] = E mark_c`` (the node's read-out of every origin), then
    ``E <- E T_c^T + onehot(J + c) source_c^T``. Returns the reads ``[C, ..., O]`` (zero
    for the node's own and later sources: read before write) and the final ``E``, the
    coefficients of the state leaving the line.
    """
    length, j = source.shape[0], source.shape[-1]
    origins = j + length
    lead = source.shape[1:-1]
    start = jnp.broadcast_to(jnp.eye(origins, j, dtype=source.dtype), lead + (origins, j))

    def node(E, inputs):
        T_c, s_c, m_c, c = inputs
        read = jnp.einsum("...oj,...j->...o", E, m_c)
        own = jax.nn.one_hot(j + c, origins, dtype=E.dtype)
        E = jnp.einsum("...oj,...ij->...oi", E, T_c) + own[:, None] * s_c[..., None, :]
        return E, read

    final, reads = jax.lax.scan(node, start, (transition, source, mark, jnp.arange(length)))
    return reads, final


def _to_chunks(x: Array, chunk: int) -> Array:
    """``[b, n*C, ...] -> [C, b, n, ...]`` (position in chunk first, for the scan)."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape((b, t // chunk, chunk) + x.shape[2:]), 2, 0)


def plstm_1d_chunked(
    q: Float[Array, "batch time heads dk"],
    k: Float[Array, "batch time heads dk"],
    v: Float[Array, "batch time heads dv"],
    source: Float[Array, "batch time heads J"],
    transition: Float[Array, "batch time heads J J"],
    mark: Float[Array, "batch time heads J"],
    direct: Float[Array, "batch time heads"],
    initial_state: Float[Array, "batch heads J dk dv"],
    chunk_size: int,
) -> tuple[Float[Array, "batch time heads dv"], Float[Array, "batch heads J dk dv"]]:
    """Chunkwise-parallel form of :func:`plstm_1d_sequential` (module docstring)."""
    batch, time, heads, j = source.shape
    c = min(chunk_size, time)
    pad = -time % c
    if pad:  # identity transitions, zero sources / marks / directs: the state passes through
        eye = jnp.broadcast_to(jnp.eye(j, dtype=transition.dtype), (batch, pad, heads, j, j))
        transition = jnp.concatenate([transition, eye], axis=1)
        q, k, v, source, mark, direct = (pad_time(x, c) for x in (q, k, v, source, mark, direct))
    n = q.shape[1] // c

    reads, final = _line_coefficients(*(_to_chunks(x, c) for x in (transition, source, mark)))
    reads = jnp.moveaxis(reads, 0, -2)  # [b, n, h, C(node), O]
    gate = reads[..., j:]  # in-chunk gating G[node, source node], strictly lower triangular
    read_in = reads[..., :j]  # read-out of the incoming chunk state
    transfer = jnp.swapaxes(final[..., :j, :], -1, -2)  # A[i, j]: C_out[i] += A[i, j] C_in[j]
    out_weight = final[..., j:, :]  # [b, n, h, C, J]: C_out[i] += w[s, i] k_s v_s^T

    def chunked(x):  # [b, n*C, h, ...] -> [b, n, h, C, ...]
        return jnp.moveaxis(x.reshape((batch, n, c) + x.shape[2:]), 2, 3)

    qc, kc, vc, dc = (chunked(x) for x in (q, k, v, direct))
    gate = gate + dc[..., :, None] * jnp.eye(c, dtype=gate.dtype)
    scores = jnp.einsum("bnhsk,bnhrk->bnhsr", qc, kc) * gate
    y = jnp.einsum("bnhsr,bnhrv->bnhsv", scores, vc)

    # Chunk transfers C_out = A C_in + U, chained across chunks (state component J last).
    update = jnp.einsum("bnhsi,bnhsk,bnhsv->bnhkvi", out_weight, kc, vc)
    c0 = jnp.moveaxis(initial_state, 2, -1)  # [b, h, dk, dv, J]
    after, last = matrix_scan(transfer[:, :, :, None, None], update, initial_state=c0)
    entering = jnp.concatenate([c0[:, None], after[:, :-1]], axis=1)  # [b, n, h, dk, dv, J]
    y = y + jnp.einsum("bnhsj,bnhsk,bnhkvj->bnhsv", read_in, qc, entering)
    y = jnp.moveaxis(y, 3, 2).reshape((batch, n * c, heads, v.shape[-1]))
    return y[:, :time], jnp.moveaxis(last, -1, 2)


def plstm_1d(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    source: ArrayLike,
    transition: ArrayLike,
    mark: ArrayLike,
    direct: ArrayLike,
    *,
    initial_state: ArrayLike | None = None,
    reverse: bool = False,
    segment_ids: ArrayLike | None = None,
    reset: ArrayLike | None = None,
    chunk_size: int = 64,
    method: str = "auto",
) -> tuple[Array, Array]:
    """pLSTM on a sequence (the line graph; module docstring)::

        y_t = q_t^T (sum_j mark_t[j] C_{t-1}[j]) + direct_t (q_t . k_t) v_t
        C_t[i] = sum_j transition_t[i, j] C_{t-1}[j] + source_t[i] k_t v_t^T

    Args:
      q, k: ``[batch, time, heads, dk]`` (no scale is applied: scale ``q`` beforehand).
      v: ``[batch, time, heads, dv]``.
      source: ``[batch, time, heads, J]``.
      transition: ``[batch, time, heads, J, J]``.
      mark: ``[batch, time, heads, J]``.
      direct: ``[batch, time, heads]``.
      initial_state: ``C_{-1} [batch, heads, J, dk, dv]``; zeros if ``None``.
      reverse: run from the last node to the first (every input is read in reverse).
      segment_ids, reset: packed documents: at a document start the node neither reads
        nor transmits the previous state (its mark and transition act as zero).
      chunk_size: nodes per chunk for ``"chunked"``; any ``time`` works (padded).
      method: ``"auto"`` (= ``"chunked"``), ``"sequential"`` or ``"chunked"``.

    Returns:
      ``(y [batch, time, heads, dv], final_state [batch, heads, J, dk, dv])``; ``y`` in the
      promoted input dtype, the state in at least float32.
    """
    _dispatch.check_method("plstm_1d", method)
    check_chunk_size(chunk_size)
    arrays = dict(q=q, k=k, v=v, source=source, transition=transition, mark=mark, direct=direct)
    arrays = {name: jnp.asarray(x) for name, x in arrays.items()}
    for name, x in arrays.items():
        check_real_floating(name, x)
    q = arrays["q"]
    check_ndim("q", q, 4, "[batch, time, heads, dk]")
    batch, time, heads, dk = q.shape
    check_shape("k", arrays["k"], q.shape, "[batch, time, heads, dk]")
    check_ndim("v", arrays["v"], 4, "[batch, time, heads, dv]")
    dv = arrays["v"].shape[-1]
    check_shape("v", arrays["v"], (batch, time, heads, dv), "[batch, time, heads, dv]")
    check_ndim("source", arrays["source"], 4, "[batch, time, heads, J]")
    j = arrays["source"].shape[-1]
    check_shape("source", arrays["source"], (batch, time, heads, j), "[batch, time, heads, J]")
    check_shape("transition", arrays["transition"], (batch, time, heads, j, j), "[batch, time, heads, J, J]")
    check_shape("mark", arrays["mark"], (batch, time, heads, j), "[batch, time, heads, J]")
    check_shape("direct", arrays["direct"], (batch, time, heads), "[batch, time, heads]")
    out_dtype = jnp.result_type(*(arrays[n].dtype for n in ("q", "k", "v")))
    dtypes = [x.dtype for x in arrays.values()]
    if initial_state is not None:
        initial_state = jnp.asarray(initial_state)
        check_real_floating("initial_state", initial_state)
        check_shape("initial_state", initial_state, (batch, heads, j, dk, dv), "[batch, heads, J, dk, dv]")
        dtypes.append(initial_state.dtype)
    dtype = state_dtype(*dtypes)
    c0 = jnp.zeros((batch, heads, j, dk, dv), dtype) if initial_state is None else initial_state.astype(dtype)
    arrays = {name: x.astype(dtype) for name, x in arrays.items()}
    cut = carry_cut_mask(
        None if segment_ids is None else jnp.asarray(segment_ids),
        None if reset is None else jnp.asarray(reset),
        batch, time, reverse,
    )
    if cut is not None:  # a document start reads and transmits nothing of the previous state
        arrays["transition"] = jnp.where(cut[:, :, None, None, None], 0.0, arrays["transition"])
        arrays["mark"] = jnp.where(cut[:, :, None, None], 0.0, arrays["mark"])
    if time == 0:
        return jnp.zeros((batch, 0, heads, dv), out_dtype), c0
    names = ("q", "k", "v", "source", "transition", "mark", "direct")
    inputs = [arrays[n] for n in names]
    if reverse:
        inputs = flip_time(inputs)

    def branch(resolved: str, platform: str):
        if resolved == "sequential":
            return plstm_1d_sequential
        return lambda *args: plstm_1d_chunked(*args, chunk_size)

    choice = _dispatch.plan("plstm_1d", method, _dispatch.case(out_dtype, time=time))
    y, last = _dispatch.dispatch(choice, branch, *inputs, c0)
    if reverse:
        y = flip_time(y)
    return y.astype(out_dtype), last


# ============================================================================= 2-D
def grid_scan(node_fn: Callable, inputs, left, top):
    """Run a node function over a grid DAG with edges from the left and from the top.

    ``inputs``: pytree of arrays ``[H, W, ...]``; ``left``: pytree ``[H, ...]`` (the states
    entering column 0 of every row); ``top``: pytree ``[W, ...]`` (entering row 0).
    ``node_fn(l, u, x) -> (r, d, out)`` maps the incoming left/top edge states and the
    node's inputs to its outgoing right/down states and an output. Nodes run row by row,
    left to right (a ``lax.scan`` over rows of a ``lax.scan`` over columns).

    Returns ``(outs [H, W, ...], right [H, ...], bottom [W, ...])``: the outputs, the
    states leaving the last column and the states leaving the last row.
    """

    def row(top_row, row_inputs):
        x_row, left_in = row_inputs

        def cell(left_state, cell_inputs):
            up_state, x = cell_inputs
            r, d, out = node_fn(left_state, up_state, x)
            return r, (d, out)

        r_last, (d_row, out_row) = jax.lax.scan(cell, left_in, (top_row, x_row))
        return d_row, (out_row, r_last)

    bottom, (outs, right) = jax.lax.scan(row, top, (inputs, left))
    return outs, right, bottom


def plstm_2d_sequential(
    q: Float[Array, "batch H W heads dk"],
    k: Float[Array, "batch H W heads dk"],
    v: Float[Array, "batch H W heads dv"],
    source: Float[Array, "batch H W heads 2 J"],
    transition: Float[Array, "batch H W heads 2 2 J J"],
    mark: Float[Array, "batch H W heads 2 J"],
    direct: Float[Array, "batch H W heads"],
    left: Float[Array, "batch H heads J dk dv"],
    top: Float[Array, "batch W heads J dk dv"],
) -> tuple[
    Float[Array, "batch H W heads dv"], Float[Array, "batch H heads J dk dv"], Float[Array, "batch W heads J dk dv"]
]:
    """The 2-D grid recurrence node by node in raster order; the oracle of :func:`plstm_2d`."""

    def node(left_in, up_in, inputs):
        q_n, k_n, v_n, s_n, T_n, m_n, d_n = inputs
        incoming = jnp.stack([left_in, up_in], axis=2)  # [b, h, 2 (left, up), J, dk, dv]
        read = jnp.einsum("bhej,bhejkv->bhkv", m_n, incoming)
        y = jnp.einsum("bhk,bhkv->bhv", q_n, read) + (d_n * jnp.sum(q_n * k_n, -1))[..., None] * v_n
        kv = k_n[..., :, None] * v_n[..., None, :]
        out = jnp.einsum("bhoeij,bhejkv->bhoikv", T_n, incoming) + s_n[..., None, None] * kv[:, :, None, None]
        return out[:, :, 0], out[:, :, 1], y

    inputs = tuple(_time_major(x, 2) for x in (q, k, v, source, transition, mark, direct))
    y, right, bottom = grid_scan(node, inputs, _time_major(left), _time_major(top))
    return _batch_major(y, 2), _batch_major(right), _batch_major(bottom)


def _grid_coefficients(
    transition: Float[Array, "tH tW *lead 2 2 J J"],
    source: Float[Array, "tH tW *lead 2 J"],
    mark: Float[Array, "tH tW *lead 2 J"],
) -> tuple[Float[Array, "tH tW *lead O"], Float[Array, "tH *lead O J"], Float[Array, "tW *lead O J"]]:
    """Gating coefficients of a ``tH x tW`` tile, for every leading index at once.

    Origins ``O = tH J + tW J + tH tW``: the components of the tile's left boundary edges
    (row-major ``(row, j)``), of its top boundary edges (``(column, j)``) and the sources
    of its nodes (raster order). Every edge carries ``[O, J]`` coefficients; the node
    update is the recurrence itself applied to them (``grid_scan``), so ``reads[p, o]`` is
    the weight with which node ``p`` reads origin ``o``, and the returned right / bottom
    edges give the tile's boundary transfer.
    """
    th, tw = source.shape[:2]
    j = source.shape[-1]
    lead = source.shape[2:-2]
    n_left, n_top = th * j, tw * j
    origins = n_left + n_top + th * tw
    eye = jnp.eye(origins, dtype=source.dtype)
    ones = (1,) * len(lead)

    def boundary(rows: Array, edges: int) -> Array:  # [edges * J, O] -> [edges, *lead, O, J]
        coef = rows.reshape(edges, j, origins).swapaxes(1, 2)
        return jnp.broadcast_to(coef.reshape((edges,) + ones + (origins, j)), (edges,) + lead + (origins, j))

    left = boundary(eye[:n_left], th)
    top = boundary(eye[n_left:n_left + n_top], tw)
    own = jnp.arange(th * tw).reshape(th, tw) + n_left + n_top  # each node's source origin

    def node(left_in, up_in, inputs):
        T_n, s_n, m_n, p = inputs
        incoming = jnp.stack([left_in, up_in], axis=-3)  # [..., 2 (left, up), O, J]
        read = jnp.einsum("...ej,...eoj->...o", m_n, incoming)
        onehot = jax.nn.one_hot(p, origins, dtype=incoming.dtype)[:, None]  # [O, 1]
        out = jnp.einsum("...xeij,...eoj->...xoi", T_n, incoming) + onehot * s_n[..., :, None, :]
        return out[..., 0, :, :], out[..., 1, :, :], read

    return grid_scan(node, (transition, source, mark, own), left, top)


def _pad_grid(arrays: dict, left: Array, top: Array, th: int, tw: int) -> tuple[dict, Array, Array]:
    """Pad ``[b, H, W, ...]`` inputs to tile multiples. Padded nodes in the real rows pass
    the right-going state through (``T[right, left] = I``), padded nodes in the real
    columns pass the down-going state through (``T[down, up] = I``), everything else is
    zero: real outputs never see padded nodes (they lie right of / below them) and the
    returned boundary states are those of the real last column / row."""
    batch, h_, w_ = arrays["q"].shape[:3]
    ph, pw = -h_ % th, -w_ % tw
    if not (ph or pw):
        return arrays, left, top

    def pad(x):
        return jnp.pad(x, [(0, 0), (0, ph), (0, pw)] + [(0, 0)] * (x.ndim - 3))

    out = {name: pad(x) for name, x in arrays.items()}
    rows = jnp.arange(h_ + ph)[:, None] < h_
    cols = jnp.arange(w_ + pw)[None, :] < w_
    j = arrays["source"].shape[-1]
    eye = jnp.eye(j, dtype=arrays["transition"].dtype)
    through = jnp.zeros((2, 2, j, j), eye.dtype)
    pass_right = through.at[0, 0].set(eye)
    pass_down = through.at[1, 1].set(eye)
    extra = jnp.where((rows & ~cols)[..., None, None, None, None], pass_right, 0.0)
    extra = extra + jnp.where((~rows & cols)[..., None, None, None, None], pass_down, 0.0)
    out["transition"] = out["transition"] + extra[None, :, :, None]
    left = jnp.pad(left, [(0, 0), (0, ph)] + [(0, 0)] * (left.ndim - 2))
    top = jnp.pad(top, [(0, 0), (0, pw)] + [(0, 0)] * (top.ndim - 2))
    return out, left, top


def plstm_2d_tiled(
    q: Float[Array, "batch H W heads dk"],
    k: Float[Array, "batch H W heads dk"],
    v: Float[Array, "batch H W heads dv"],
    source: Float[Array, "batch H W heads 2 J"],
    transition: Float[Array, "batch H W heads 2 2 J J"],
    mark: Float[Array, "batch H W heads 2 J"],
    direct: Float[Array, "batch H W heads"],
    left: Float[Array, "batch H heads J dk dv"],
    top: Float[Array, "batch W heads J dk dv"],
    tile: tuple[int, int],
) -> tuple[
    Float[Array, "batch H W heads dv"], Float[Array, "batch H heads J dk dv"], Float[Array, "batch W heads J dk dv"]
]:
    """Tiled form of :func:`plstm_2d_sequential` (module docstring)."""
    batch, height, width, heads, dk = q.shape
    dv, j = v.shape[-1], source.shape[-1]
    th, tw = min(tile[0], height), min(tile[1], width)
    arrays = dict(q=q, k=k, v=v, source=source, transition=transition, mark=mark, direct=direct)
    arrays, left_p, top_p = _pad_grid(arrays, left, top, th, tw)
    nh, nw = arrays["q"].shape[1] // th, arrays["q"].shape[2] // tw

    def tile_major(x):  # [b, nh*th, nw*tw, h, ...] -> [th, tw, b, nh, nw, h, ...]
        x = x.reshape((batch, nh, th, nw, tw) + x.shape[3:])
        return jnp.moveaxis(x, (2, 4), (0, 1))

    reads, right_c, bottom_c = _grid_coefficients(
        *(tile_major(arrays[n]) for n in ("transition", "source", "mark")))
    n_border = (th + tw) * j
    nodes = th * tw
    reads = jnp.moveaxis(reads.reshape((nodes,) + reads.shape[2:]), 0, -2)  # [b, nh, nw, h, P, O]

    def by_node(x):  # [b, H, W, h, ...] -> [b, nh, nw, h, P, ...]
        x = tile_major(x)
        return jnp.moveaxis(x.reshape((nodes,) + x.shape[2:]), 0, 4)

    qt, kt, vt, dt = (by_node(arrays[n]) for n in ("q", "k", "v", "direct"))
    gate = reads[..., n_border:] + dt[..., :, None] * jnp.eye(nodes, dtype=reads.dtype)
    y = jnp.einsum("...sr,...rv->...sv", jnp.einsum("...sk,...rk->...sr", qt, kt) * gate, vt)

    # Tile boundary transfer [R_out; D_out] = A [L_in; U_in] + U (components (edge, j)).
    def border(c):  # [n_edges, b, nh, nw, h, O, J] -> [b, nh, nw, h, n_edges * J, O]
        c = jnp.moveaxis(c, 0, -3)
        return jnp.swapaxes(c, -1, -2).reshape(c.shape[:-3] + (c.shape[-3] * j, c.shape[-2]))

    out_coef = jnp.concatenate([border(right_c), border(bottom_c)], axis=-2)  # [..., n_border, O]
    transfer = out_coef[..., :n_border]
    update = jnp.einsum("...ap,...pk,...pv->...akv", out_coef[..., n_border:], kt, vt)

    def tile_node(l_in, u_in, inputs):
        A, U = inputs
        incoming = jnp.concatenate([l_in, u_in], axis=-3)  # [b, h, n_border, dk, dv]
        out = jnp.einsum("bhac,bhckv->bhakv", A, incoming) + U
        return out[..., : th * j, :, :], out[..., th * j:, :, :], incoming

    def boundary(x, n_tiles, size):  # [b, n*size, h, J, dk, dv] -> [n, b, h, size*J, dk, dv]
        x = x.reshape((batch, n_tiles, size) + x.shape[2:])
        x = jnp.moveaxis(x, (1, 2), (0, 3))  # [n, b, h, size, J, dk, dv]
        return x.reshape(x.shape[:3] + (size * j,) + x.shape[5:])

    def tile_grid(x):  # [b, nh, nw, h, ...] -> [nh, nw, b, h, ...]
        return jnp.moveaxis(x, (1, 2), (0, 1))

    incoming, right_t, bottom_t = grid_scan(
        tile_node, (tile_grid(transfer), tile_grid(update)), boundary(left_p, nh, th), boundary(top_p, nw, tw))
    incoming = jnp.moveaxis(incoming, (0, 1), (1, 2))  # [b, nh, nw, h, n_border, dk, dv]
    y = y + jnp.einsum("...pa,...pk,...akv->...pv", reads[..., :n_border], qt, incoming)

    # [b, nh, nw, h, P, dv] -> [b, H, W, h, dv]
    y = jnp.moveaxis(y.reshape(y.shape[:4] + (th, tw, dv)), (4, 5), (2, 4))
    y = y.reshape((batch, nh * th, nw * tw, heads, dv))[:, :height, :width]

    def unboundary(x, n_tiles, size):  # [n, b, h, size*J, dk, dv] -> [b, n*size, h, J, dk, dv]
        x = x.reshape(x.shape[:3] + (size, j) + x.shape[4:])
        x = jnp.moveaxis(x, (0, 3), (1, 2))
        return x.reshape((batch, n_tiles * size) + x.shape[3:])

    right = unboundary(right_t, nh, th)[:, :height]
    bottom = unboundary(bottom_t, nw, tw)[:, :width]
    return y, right, bottom


def plstm_2d(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    source: ArrayLike,
    transition: ArrayLike,
    mark: ArrayLike,
    direct: ArrayLike,
    *,
    initial_state: tuple[ArrayLike, ArrayLike] | None = None,
    tile_size: int | tuple[int, int] = 8,
    method: str = "auto",
) -> tuple[Array, tuple[Array, Array]]:
    """pLSTM on a 2-D grid with edges from the left and from the top (module docstring)::

        y_ij = q^T (mark[left] . L + mark[up] . U) + direct (q . k) v
        [R_ij; D_ij] = transition [L; U] + source k v^T

    Args:
      q, k: ``[batch, H, W, heads, dk]`` (no scale applied).
      v: ``[batch, H, W, heads, dv]``.
      source: ``[batch, H, W, heads, 2, J]``, outgoing edges ``(right, down)``.
      transition: ``[batch, H, W, heads, 2, 2, J, J]``: ``[..., out_edge, in_edge, i, j]``
        with out edges ``(right, down)`` and in edges ``(left, up)``.
      mark: ``[batch, H, W, heads, 2, J]``, incoming edges ``(left, up)``.
      direct: ``[batch, H, W, heads]``.
      initial_state: ``(left, top)``: the edge states entering the grid from the left
        ``[batch, H, heads, J, dk, dv]`` and from the top ``[batch, W, heads, J, dk, dv]``;
        zeros if ``None``.
      tile_size: tile ``(tH, tW)`` (or one int for both) for ``"tiled"``; any grid works
        (padded).
      method: ``"auto"`` (= ``"tiled"``), ``"sequential"`` or ``"tiled"``.

    Returns:
      ``(y [batch, H, W, heads, dv], (right, bottom))``: the states leaving the last column
      ``[batch, H, heads, J, dk, dv]`` and the last row ``[batch, W, heads, J, dk, dv]``;
      passing them as the ``left`` / ``top`` initial state of a neighbouring grid continues
      the recurrence exactly.
    """
    _dispatch.check_method("plstm_2d", method)
    tile = (tile_size, tile_size) if isinstance(tile_size, int) else tuple(tile_size)
    if len(tile) != 2 or not all(isinstance(s, int) and s >= 1 for s in tile):
        raise ValueError(f"tile_size: expected a positive int or a pair of them, got {tile_size!r}")
    arrays = dict(q=q, k=k, v=v, source=source, transition=transition, mark=mark, direct=direct)
    arrays = {name: jnp.asarray(x) for name, x in arrays.items()}
    for name, x in arrays.items():
        check_real_floating(name, x)
    q = arrays["q"]
    check_ndim("q", q, 5, "[batch, H, W, heads, dk]")
    batch, height, width, heads, dk = q.shape
    grid = (batch, height, width, heads)
    check_shape("k", arrays["k"], q.shape, "[batch, H, W, heads, dk]")
    check_ndim("v", arrays["v"], 5, "[batch, H, W, heads, dv]")
    dv = arrays["v"].shape[-1]
    check_shape("v", arrays["v"], grid + (dv,), "[batch, H, W, heads, dv]")
    check_ndim("source", arrays["source"], 6, "[batch, H, W, heads, 2, J]")
    j = arrays["source"].shape[-1]
    check_shape("source", arrays["source"], grid + (2, j), "[batch, H, W, heads, 2, J]")
    check_shape("transition", arrays["transition"], grid + (2, 2, j, j), "[batch, H, W, heads, 2, 2, J, J]")
    check_shape("mark", arrays["mark"], grid + (2, j), "[batch, H, W, heads, 2, J]")
    check_shape("direct", arrays["direct"], grid, "[batch, H, W, heads]")
    out_dtype = jnp.result_type(*(arrays[n].dtype for n in ("q", "k", "v")))
    dtypes = [x.dtype for x in arrays.values()]
    left_shape, top_shape = (batch, height, heads, j, dk, dv), (batch, width, heads, j, dk, dv)
    if initial_state is None:
        dtype = state_dtype(*dtypes)
        left, top = jnp.zeros(left_shape, dtype), jnp.zeros(top_shape, dtype)
    else:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise ValueError("initial_state: expected a pair (left, top) of boundary states")
        left, top = (jnp.asarray(x) for x in initial_state)
        check_real_floating("initial_state", left)
        check_real_floating("initial_state", top)
        check_shape("initial_state[0]", left, left_shape, "[batch, H, heads, J, dk, dv]")
        check_shape("initial_state[1]", top, top_shape, "[batch, W, heads, J, dk, dv]")
        dtype = state_dtype(*dtypes, left.dtype, top.dtype)
        left, top = left.astype(dtype), top.astype(dtype)
    inputs = [arrays[n].astype(dtype) for n in ("q", "k", "v", "source", "transition", "mark", "direct")]
    if height == 0 or width == 0:
        return jnp.zeros(grid + (dv,), out_dtype), (left, top)

    def branch(resolved: str, platform: str):
        if resolved == "sequential":
            return plstm_2d_sequential
        return lambda *args: plstm_2d_tiled(*args, tile)

    choice = _dispatch.plan("plstm_2d", method, _dispatch.case(out_dtype))
    y, right, bottom = _dispatch.dispatch(choice, branch, *inputs, left, top)
    return y.astype(out_dtype), (right, bottom)
