"""ssmjax.data.graphs: labels against brute force, orderings as relabellings, layout."""

import numpy as np
import pytest

from ssmjax.data import graphs as g
from ssmjax.data.graphs import ANSWER, BOS, CLOSE, NODE0, OPEN, PAD, QUERY, SEP


def decode(tokens):
    """(node labels, edge set, query) from one row: the node-token group right after BOS
    / OPEN is a node list, every later group (ended by SEP) an edge."""
    tokens = [int(t) for t in tokens if t != PAD]
    assert tokens[0] == BOS and tokens[-1] == ANSWER
    q = tokens.index(QUERY)
    body, query = tokens[1:q], [t - NODE0 for t in tokens[q + 1:-1]]
    nodes, edges, group, after_open = [], [], [], True
    for t in body:
        if t >= NODE0:
            group.append(t - NODE0)
        elif t == SEP:
            if after_open:
                nodes += group
            else:
                assert len(group) == 2
                edges.append(tuple(group))
            group, after_open = [], False
        else:
            assert t in (OPEN, CLOSE) and not group
            after_open = t == OPEN
    return nodes, edges, (tuple(query) if query else None)


def brute_force(task, nodes, edges, query, max_dist):
    """Labels from the adjacency matrix: Floyd-Warshall distances, cycle by the forest
    count (a graph is acyclic iff edges = nodes - components)."""
    n = len(nodes)
    d = np.full((n, n), np.inf)
    np.fill_diagonal(d, 0)
    for u, v in edges:
        d[u, v] = d[v, u] = 1
    for k in range(n):
        d = np.minimum(d, d[:, [k]] + d[[k], :])
    if task == "node_count":
        return n
    if task == "edge_count":
        return len(edges)
    if task == "cycle":
        comps = len({tuple(np.isfinite(row)) for row in d})
        return int(len(edges) > n - comps)
    dist = d[query[0], query[1]]
    if task == "connectivity":
        return int(np.isfinite(dist))
    return max_dist + 1 if not np.isfinite(dist) else int(min(dist, max_dist))


@pytest.mark.parametrize("task", g.GRAPH_TASKS)
def test_labels_match_brute_force(task):
    seen = set()
    for step, ordering in enumerate(g.ORDERINGS):
        batch = g.graph_tasks(7, step, batch_size=60, task=task, ordering=ordering, min_nodes=2, max_nodes=9,
                              max_dist=3)
        for row in range(len(batch.inputs)):
            nodes, edges, query = decode(batch.inputs[row])
            assert sorted(nodes) == list(range(len(nodes))) and len(set(edges)) == len(edges)
            assert all(u < v < len(nodes) for u, v in edges)
            assert (query is not None) == (task in g.PAIR_TASKS) and (query is None or query[0] != query[1])
            label = batch.targets[row][batch.mask[row]][0] - g.class0(9)
            assert label == brute_force(task, nodes, edges, query, 3)
            seen.add(int(label))
    assert {0, 1} <= seen if task in ("connectivity", "cycle") else len(seen) >= 4


@pytest.mark.parametrize("ordering", g.ORDERINGS)
def test_each_ordering_is_a_relabelling(ordering):
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(2, 13))
        example = g.graph_example(rng, "connectivity", n, ordering)
        nodes, edges, query = decode(example.tokens)
        new = np.empty(n, np.int64)
        new[example.order] = np.arange(n)
        assert sorted(example.order.tolist()) == list(range(n)) and sorted(nodes) == list(range(n))
        assert sorted(edges) == sorted(tuple(sorted((int(new[u]), int(new[v])))) for u, v in example.edges)
        assert query == (new[example.query[0]], new[example.query[1]])
        degrees = np.bincount(np.ravel(example.edges), minlength=n)
        if ordering == "degree":
            assert (np.diff(degrees[example.order]) <= 0).all()
        if ordering in ("bfs", "dfs", "hierarchical"):
            # flat orderings write their edges sorted; every node not starting a component has an earlier neighbour
            earlier = {v: [u for u, w in edges if w == v] for v in range(n)}
            comp = g.components(n, new[example.edges])
            if ordering != "hierarchical":
                assert edges == sorted(edges)
                starts = [v for v in range(n) if not earlier[v]]
                assert len(starts) == len(set(comp.tolist()))  # components are contiguous, one root each
            if ordering == "bfs":  # the first (earliest) neighbours are non-decreasing within a component
                firsts = [min(earlier[v]) for v in range(n) if earlier[v]]
                assert firsts == sorted(firsts)


def test_hierarchical_clusters_are_nested_halves_and_edges_sit_in_the_smallest_cluster():
    rng = np.random.default_rng(3)
    for _ in range(30):
        n = int(rng.integers(3, 15))
        edges = g.random_graph(rng, n, 0.3)
        tokens, _ = g.graph_tokens(rng, n, edges, "hierarchical")
        nodes, decoded, _ = decode(tokens + [QUERY, ANSWER])
        assert nodes == list(range(n)) and len(decoded) == len(edges)  # labels in leaf order
        # a stack of open clusters: [nodes of the cluster, child node sets, edges written in it]
        stack, depth_max, group = [], 0, []
        for t in tokens[1:]:
            if t == OPEN:
                stack.append([set(), [], []])
                depth_max = max(depth_max, len(stack))
            elif t >= NODE0:
                group.append(t - NODE0)
            elif t == SEP:
                if not stack[-1][1] and not stack[-1][0]:  # a leaf's node list
                    stack[-1][0] = set(group)
                else:
                    stack[-1][2].append(tuple(group))
                group = []
            else:  # CLOSE: a leaf, or the union of two children of sizes differing by <= 1
                cluster, children, written = stack.pop()
                if children:
                    assert len(children) == 2 and not cluster and abs(len(children[0]) - len(children[1])) <= 1
                    cluster = children[0] | children[1]
                    for u, v in written:  # an edge between the two children
                        assert (u in children[0]) != (v in children[0]) and {u, v} <= cluster
                else:
                    assert 1 <= len(cluster) <= g.LEAF_SIZE and all({u, v} <= cluster for u, v in written)
                if stack:
                    stack[-1][1].append(cluster)
                else:
                    assert cluster == set(range(n))
        assert depth_max == int(np.ceil(np.log2(n / g.LEAF_SIZE))) + 1


def test_layout_padding_mask_and_determinism():
    kwargs = dict(batch_size=8, task="shortest_path", ordering="hierarchical", min_nodes=3, max_nodes=6,
                  node_capacity=8, max_edges=10, max_dist=3)
    batch = g.graph_tasks(1, 2, **kwargs)
    assert batch.inputs.shape == batch.targets.shape == batch.mask.shape == (8, g.graph_seq_len("hierarchical", 8, 10))
    assert batch.inputs.dtype == np.int32 and batch.mask.sum(1).tolist() == [1] * 8
    for row in range(8):
        length = int((batch.inputs[row] != PAD).sum())
        assert (batch.inputs[row, length:] == PAD).all() and batch.inputs[row, length - 1] == ANSWER
        assert batch.mask[row, length - 1] and (batch.targets[row][~batch.mask[row]] == 0).all()
    assert batch.inputs.max() < g.class0(8) <= batch.targets.max() < g.vocab_size("shortest_path", 8, 10, 3)
    again = g.graph_tasks(1, 2, **kwargs)
    assert all((a == b).all() for a, b in zip(batch, again))
    assert not (g.graph_tasks(1, 3, **kwargs).inputs == batch.inputs).all()
    # the graphs and labels of a (seed, step) do not depend on the ordering
    flat = g.graph_tasks(1, 2, **{**kwargs, "ordering": "random"})
    assert (flat.targets[flat.mask] == batch.targets[batch.mask]).all()


def test_bad_arguments_raise_naming_them():
    for kwargs, name in [(dict(task="planarity"), "task"), (dict(ordering="spectral"), "ordering"),
                         (dict(min_nodes=1), "min_nodes"), (dict(min_nodes=9, max_nodes=8), "min_nodes"),
                         (dict(node_capacity=4), "node_capacity"), (dict(max_edges=-1), "max_edges"),
                         (dict(degree=-1.0), "degree"), (dict(batch_size=0), "batch_size"),
                         (dict(max_dist=0), "max_dist"), (dict(degree=20.0, max_edges=2), "degree")]:
        with pytest.raises(ValueError, match=name):
            g.graph_tasks(0, 0, **{"batch_size": 2, "max_nodes": 8, **kwargs})
