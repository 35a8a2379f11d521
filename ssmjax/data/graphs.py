"""Graph tasks as token sequences, generated in-process from ``(seed, step)`` like
:mod:`ssmjax.data.synthetic`: the graph benchmarks of GSM++ (Behrouz, Parviz, Karami,
Sanford, Perozzi & Mirrokni, ICML 2025, "Best of Both Worlds: Advantages of Hybrid Graph
Sequence Models"), which tokenise a graph into a sequence (a node ordering, or a
hierarchical clustering) and read it with a sequence model.

Graphs: Erdos-Renyi, ``n`` nodes uniform in ``[min_nodes, max_nodes]`` per row, each edge
present with probability ``degree / (n - 1)`` (mean degree ``degree``; the default per
task, :data:`DEFAULT_DEGREE`, sits near the threshold where the labels are mixed); a
graph with more than ``max_edges`` edges is redrawn (:func:`random_graph`).

Tasks (labels by plain union-find / BFS in this module, :func:`graph_label`):

* ``"connectivity"``: are query nodes ``u`` and ``v`` in one component? 2 classes.
* ``"cycle"``: does the graph have a cycle? 2 classes; the wanted label is drawn first
  (uniform; 0 when ``n < 3``) and graphs are redrawn until they have it, so the classes
  are balanced.
* ``"shortest_path"``: the BFS hop distance from ``u`` to ``v``, capped at ``max_dist``
  (class ``d`` for ``1 <= d < max_dist``, class ``max_dist`` for ``d >= max_dist``),
  class ``max_dist + 1`` when unreachable (class 0 is unused: ``u != v``).
* ``"node_count"``: ``n`` (classes ``0..node_capacity``).
* ``"edge_count"``: the number of edges (classes ``0..max_edges``).

For the pair tasks the query is drawn class-first: a class uniform among those the
graph's pairs have, then a pair ``u != v`` uniform among that class's pairs (random
orientation), so a majority-class guess scores well below 1.

Orderings (``ordering=``; the nodes are relabelled ``0..n-1`` in the order, node ``i``
is token ``NODE0 + i``, :func:`node_order`):

* ``"random"``: a random permutation; edges in random order.
* ``"bfs"`` / ``"dfs"``: breadth- / depth-first (pre-order) traversal order from a random
  root (a new random root for each further component); edges sorted by the new labels.
* ``"degree"``: by degree, largest first (ties random); edges sorted.
* ``"hierarchical"``: a recursive 2-way clustering (:func:`cluster_tree`): a cluster of
  more than 2 nodes is ordered by BFS layers (within the cluster's induced subgraph)
  from a peripheral node (the last node BFS from a random node reaches) and cut into
  halves, recursively (depth about ``log2(n) - 1``), so nearby nodes share clusters.
  Nodes are labelled in leaf order and the edges written cluster by cluster: each edge
  in the smallest cluster holding both ends.

Sequence (``inputs``; right-padded with PAD to :func:`graph_seq_len`)::

    flat:          BOS  n_0 .. n_{k-1} SEP  (u v SEP)*  QUERY [u v]  ANSWER
    hierarchical:  BOS  C  QUERY [u v]  ANSWER,   C = OPEN n_0 .. SEP (u v SEP)* CLOSE   (a leaf)
                                                  C = OPEN C C (u v SEP)* CLOSE        (cross edges)

(in both, the node-token group right after BOS / OPEN is a node list, every later one an
edge; ``u < v`` in each edge). ``[u v]`` is present for the pair tasks only. The target
is the class token ``class0(node_capacity) + label`` at the ANSWER position, the mask
true there only. ``node_capacity`` (default ``max_nodes``) and ``max_edges`` (default
``2 * node_capacity``) fix the vocabulary and the length, so batches of different node
ranges (training, evaluation) share them.

Departures from the paper: GSM++ encodes each node's neighbourhood with a local
(GNN-style) encoder before the sequence model; here the tokens are the model's only
input, and locality is carried by the tokenisation alone. Its hierarchical tokenisation
is Hierarchical Affinity Clustering (HAC, merging by learned or feature affinities);
``"hierarchical"`` here is the BFS-layer bisection above, which needs no node features.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ssmjax.checks import check_choice
from ssmjax.data.synthetic import Batch, _check_positive, _to_batch, batch_rng

GRAPH_TASKS = ("connectivity", "cycle", "shortest_path", "node_count", "edge_count")
PAIR_TASKS = ("connectivity", "shortest_path")
ORDERINGS = ("random", "bfs", "dfs", "degree", "hierarchical")
DEFAULT_DEGREE = {"connectivity": 1.5, "cycle": 1.0, "shortest_path": 1.5, "node_count": 1.5, "edge_count": 1.5}
PAD, BOS, SEP, QUERY, ANSWER, OPEN, CLOSE, NODE0 = range(8)  # node i is token NODE0 + i
LEAF_SIZE = 2  # hierarchical clusters of at most this many nodes are not split
MAX_TRIES = 1000  # graph redraws (max_edges, the cycle label) before giving up


class GraphExample(NamedTuple):
    tokens: np.ndarray  # the unpadded sequence, ending with ANSWER
    label: int  # the class
    n: int
    edges: np.ndarray  # [E, 2] the drawn graph's edges, u < v, original labels
    order: np.ndarray  # order[i] = the original node relabelled i
    query: tuple | None  # (u, v) in original labels, pair tasks only


def num_classes(task: str, node_capacity: int, max_edges: int, max_dist: int) -> int:
    check_choice("task", task, GRAPH_TASKS)
    return {"connectivity": 2, "cycle": 2, "shortest_path": max_dist + 2, "node_count": node_capacity + 1,
            "edge_count": max_edges + 1}[task]


def class0(node_capacity: int) -> int:
    """The token of class 0 (classes follow the node tokens)."""
    return NODE0 + node_capacity


def vocab_size(task: str, node_capacity: int, max_edges: int, max_dist: int = 4) -> int:
    return class0(node_capacity) + num_classes(task, node_capacity, max_edges, max_dist)


def graph_seq_len(ordering: str, node_capacity: int, max_edges: int) -> int:
    """Length holding any graph of ``<= node_capacity`` nodes and ``<= max_edges`` edges."""
    check_choice("ordering", ordering, ORDERINGS)
    if ordering == "hierarchical":  # a SEP per leaf (<= n leaves), OPEN/CLOSE per cluster (<= 2n - 1)
        body = 2 * node_capacity + 3 * max_edges + 2 * (2 * node_capacity - 1)
    else:
        body = node_capacity + 1 + 3 * max_edges
    return 1 + body + 4  # BOS, QUERY u v ANSWER


# ----------------------------------------------------------------------------- graphs and labels
def random_graph(rng: np.random.Generator, n: int, p: float) -> np.ndarray:
    """Erdos-Renyi G(n, p): ``[E, 2]`` edges ``u < v`` in lexicographic order."""
    upper = np.triu(rng.random((n, n)) < p, 1)
    return np.argwhere(upper).astype(np.int64).reshape(-1, 2)


def neighbours(n: int, edges: np.ndarray) -> list[list[int]]:
    out = [[] for _ in range(n)]
    for u, v in np.asarray(edges).reshape(-1, 2):
        out[int(u)].append(int(v))
        out[int(v)].append(int(u))
    return [sorted(x) for x in out]


def _find(parent: list[int], x: int) -> int:
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


def components(n: int, edges: np.ndarray) -> np.ndarray:
    """Component id per node (union-find; the id is the component's root)."""
    parent = list(range(n))
    for u, v in np.asarray(edges).reshape(-1, 2):
        parent[_find(parent, int(u))] = _find(parent, int(v))
    return np.array([_find(parent, x) for x in range(n)], np.int64)


def has_cycle(n: int, edges: np.ndarray) -> bool:
    """An edge joining two nodes already connected closes a cycle (union-find)."""
    parent = list(range(n))
    for u, v in np.asarray(edges).reshape(-1, 2):
        a, b = _find(parent, int(u)), _find(parent, int(v))
        if a == b:
            return True
        parent[a] = b
    return False


def bfs_distances(nbrs: list[list[int]], source: int) -> np.ndarray:
    """Hop distance from ``source`` to every node, -1 where unreachable."""
    dist = np.full(len(nbrs), -1, np.int64)
    dist[source] = 0
    frontier = [source]
    while frontier:
        nxt = []
        for u in frontier:
            for v in nbrs[u]:
                if dist[v] < 0:
                    dist[v] = dist[u] + 1
                    nxt.append(v)
        frontier = nxt
    return dist


def graph_label(task: str, n: int, edges: np.ndarray, query: tuple | None = None, *, max_dist: int = 4) -> int:
    """The class of ``task`` for the graph (and the query pair of the pair tasks)."""
    check_choice("task", task, GRAPH_TASKS)
    if task == "node_count":
        return n
    if task == "edge_count":
        return len(edges)
    if task == "cycle":
        return int(has_cycle(n, edges))
    u, v = query
    if task == "connectivity":
        comp = components(n, edges)
        return int(comp[u] == comp[v])
    d = int(bfs_distances(neighbours(n, edges), u)[v])
    return max_dist + 1 if d < 0 else min(d, max_dist)


# ----------------------------------------------------------------------------- orderings
def _search(rng: np.random.Generator, nbrs: list[list[int]], nodes: list[int], depth_first: bool,
            first: int | None = None) -> list[int]:
    """BFS (or DFS pre-order) order of the subgraph induced by ``nodes``, from ``first``
    (or a random node), then from a random unvisited node for each further component."""
    inside, seen, order = set(nodes), set(), []
    while len(order) < len(nodes):
        if first is None:
            rest = [x for x in nodes if x not in seen]
            first = rest[int(rng.integers(len(rest)))]
        if depth_first:
            stack = [first]
            while stack:
                u = stack.pop()
                if u in seen:
                    continue
                seen.add(u)
                order.append(u)
                stack.extend(v for v in reversed(nbrs[u]) if v in inside and v not in seen)
        else:  # a new component: BFS from `first` reaches no node seen before
            queue = bfs_order_component(nbrs, first, inside)
            seen.update(queue)
            order.extend(queue)
        first = None
    return order


def cluster_tree(rng: np.random.Generator, nbrs: list[list[int]], nodes: list[int]):
    """The hierarchical clustering (module docstring): a leaf is a list of nodes, an
    inner cluster a pair ``(left, right)`` of clusters."""
    if len(nodes) <= LEAF_SIZE:
        return list(nodes)
    start = nodes[int(rng.integers(len(nodes)))]
    peripheral = bfs_order_component(nbrs, start, set(nodes))[-1]  # the last node BFS from `start` reaches
    layered = _search(rng, nbrs, list(nodes), False, peripheral)
    half = (len(layered) + 1) // 2
    return cluster_tree(rng, nbrs, layered[:half]), cluster_tree(rng, nbrs, layered[half:])


def bfs_order_component(nbrs: list[list[int]], start: int, inside: set) -> list[int]:
    """The nodes of ``inside`` BFS from ``start`` reaches, in BFS order."""
    seen, queue, head = {start}, [start], 0
    while head < len(queue):
        u = queue[head]
        head += 1
        for v in nbrs[u]:
            if v in inside and v not in seen:
                seen.add(v)
                queue.append(v)
    return queue


def _leaves(tree) -> list[int]:
    return list(tree) if isinstance(tree, list) else _leaves(tree[0]) + _leaves(tree[1])


def node_order(rng: np.random.Generator, n: int, edges: np.ndarray, ordering: str):
    """``(order, tree)``: ``order[i]`` the original node relabelled ``i``; ``tree`` the
    cluster tree (original labels) for ``"hierarchical"``, else None."""
    check_choice("ordering", ordering, ORDERINGS)
    nbrs = neighbours(n, edges)
    if ordering == "random":
        return rng.permutation(n).astype(np.int64), None
    if ordering in ("bfs", "dfs"):
        return np.array(_search(rng, nbrs, list(range(n)), ordering == "dfs"), np.int64), None
    if ordering == "degree":
        degree = np.array([len(x) for x in nbrs])
        return np.lexsort((rng.random(n), -degree)).astype(np.int64), None
    tree = cluster_tree(rng, nbrs, list(range(n)))
    return np.array(_leaves(tree), np.int64), tree


def _edge_tokens(edges: list[tuple[int, int]]) -> list[int]:
    return [t for u, v in sorted(edges) for t in (NODE0 + u, NODE0 + v, SEP)]


def _cluster_tokens(tree, new: np.ndarray, edges: list[tuple[int, int]]) -> list[int]:
    """``edges`` in new labels; each one is written in the smallest cluster holding both ends."""
    if isinstance(tree, list):
        labels = sorted(int(new[x]) for x in tree)
        inner = [(u, v) for u, v in edges if u in labels and v in labels]
        return [OPEN, *(NODE0 + x for x in labels), SEP, *_edge_tokens(inner), CLOSE]
    left, right = {int(new[x]) for x in _leaves(tree[0])}, {int(new[x]) for x in _leaves(tree[1])}
    cross = [(u, v) for u, v in edges if (u in left and v in right) or (u in right and v in left)]
    return [OPEN, *_cluster_tokens(tree[0], new, edges), *_cluster_tokens(tree[1], new, edges),
            *_edge_tokens(cross), CLOSE]


def graph_tokens(rng: np.random.Generator, n: int, edges: np.ndarray, ordering: str) -> tuple[list[int], np.ndarray]:
    """The graph part of the sequence (BOS and the graph; no query) and ``order``."""
    order, tree = node_order(rng, n, edges, ordering)
    new = np.empty(n, np.int64)
    new[order] = np.arange(n)
    relabelled = [tuple(sorted((int(new[u]), int(new[v])))) for u, v in np.asarray(edges).reshape(-1, 2)]
    if ordering == "hierarchical":
        return [BOS, *_cluster_tokens(tree, new, relabelled)], order
    if ordering == "random":
        relabelled = [relabelled[i] for i in rng.permutation(len(relabelled))]
        body = [t for u, v in relabelled for t in (NODE0 + u, NODE0 + v, SEP)]
    else:
        body = _edge_tokens(relabelled)
    return [BOS, *(NODE0 + i for i in range(n)), SEP, *body], order


# ----------------------------------------------------------------------------- examples and batches
def _pair_query(rng: np.random.Generator, task: str, n: int, edges: np.ndarray, max_dist: int) -> tuple[int, int]:
    """Class-first: a class uniform among those present, then a pair of it uniformly."""
    pairs = [(u, v) for u in range(n) for v in range(u + 1, n)]
    labels = np.array([graph_label(task, n, edges, p, max_dist=max_dist) for p in pairs])
    present = np.unique(labels)
    chosen = present[int(rng.integers(len(present)))]
    candidates = np.flatnonzero(labels == chosen)
    u, v = pairs[int(candidates[int(rng.integers(len(candidates)))])]
    return (u, v) if rng.random() < 0.5 else (v, u)


def graph_example(rng: np.random.Generator, task: str, n: int, ordering: str, *, degree: float | None = None,
                  max_dist: int = 4, max_edges: int | None = None,
                  order_rng: np.random.Generator | None = None) -> GraphExample:
    """One example of ``n`` nodes (module docstring); the graph and query from ``rng``,
    the ordering from ``order_rng`` (default ``rng``)."""
    check_choice("task", task, GRAPH_TASKS)
    check_choice("ordering", ordering, ORDERINGS)
    degree = DEFAULT_DEGREE[task] if degree is None else degree
    max_edges = 2 * n if max_edges is None else max_edges
    p = min(1.0, degree / max(n - 1, 1))
    want = int(rng.integers(2)) if task == "cycle" and n >= 3 else (0 if task == "cycle" else None)
    for _ in range(MAX_TRIES):
        edges = random_graph(rng, n, p)
        if len(edges) <= max_edges and (want is None or has_cycle(n, edges) == want):
            break
    else:
        raise ValueError(f"degree: no graph of {n} nodes with <= {max_edges} edges (max_edges) and the wanted label "
                         f"in {MAX_TRIES} draws at degree {degree}")
    query = _pair_query(rng, task, n, edges, max_dist) if task in PAIR_TASKS else None
    label = graph_label(task, n, edges, query, max_dist=max_dist)
    tokens, order = graph_tokens(rng if order_rng is None else order_rng, n, edges, ordering)
    new = np.empty(n, np.int64)
    new[order] = np.arange(n)
    tail = [QUERY, *([] if query is None else [NODE0 + int(new[query[0]]), NODE0 + int(new[query[1]])]), ANSWER]
    return GraphExample(np.array(tokens + tail, np.int64), label, n, edges, order, query)


def graph_tasks(seed: int, step: int, *, batch_size: int, task: str = "connectivity", ordering: str = "bfs",
                min_nodes: int = 6, max_nodes: int = 16, degree: float | None = None, max_dist: int = 4,
                node_capacity: int | None = None, max_edges: int | None = None, stream: int = 0) -> Batch:
    """A batch of graph examples (module docstring), ``n`` uniform in
    ``[min_nodes, max_nodes]`` per row, all rows padded to :func:`graph_seq_len`. The
    orderings draw from their own generator, so the graphs, queries and labels of a
    ``(seed, step, stream)`` are the same under every ordering."""
    check_choice("task", task, GRAPH_TASKS)
    check_choice("ordering", ordering, ORDERINGS)
    _check_positive(batch_size=batch_size, max_dist=max_dist)
    if min_nodes < 2:
        raise ValueError(f"min_nodes: expected >= 2, got {min_nodes}")
    if min_nodes > max_nodes:
        raise ValueError(f"min_nodes: expected <= max_nodes = {max_nodes}, got {min_nodes}")
    node_capacity = max_nodes if node_capacity is None else node_capacity
    if node_capacity < max_nodes:
        raise ValueError(f"node_capacity: expected >= max_nodes = {max_nodes}, got {node_capacity}")
    max_edges = 2 * node_capacity if max_edges is None else max_edges
    if max_edges < 0:
        raise ValueError(f"max_edges: expected >= 0, got {max_edges}")
    if degree is not None and not degree > 0:
        raise ValueError(f"degree: expected > 0, got {degree}")
    seq_len = graph_seq_len(ordering, node_capacity, max_edges)
    rng = batch_rng(seed, step, stream)
    order_rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(step), int(stream), 1]))
    tokens = np.full((batch_size, seq_len), PAD, np.int64)
    targets = np.zeros((batch_size, seq_len), np.int64)
    mask = np.zeros((batch_size, seq_len), bool)
    for row, n in enumerate(rng.integers(min_nodes, max_nodes + 1, batch_size)):
        example = graph_example(rng, task, int(n), ordering, degree=degree, max_dist=max_dist, max_edges=max_edges,
                                order_rng=order_rng)
        length = len(example.tokens)
        tokens[row, :length] = example.tokens
        targets[row, length - 1] = class0(node_capacity) + example.label
        mask[row, length - 1] = True
    return _to_batch(tokens, targets, mask)
