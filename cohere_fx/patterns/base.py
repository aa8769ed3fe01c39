"""What a fusion is: a search function written like the HF source, the checks that guard it, a replacement.

The search function is traced with ``torch.fx.symbolic_trace`` and normalised like the model graph, so it is
spelled the way Dynamo records the HF code (tensor methods as ``call_method``, arithmetic as ``operator.*``).
Every argument of the search function is a pattern input: tensors bind to graph nodes, and arguments named in
``literals`` (an epsilon, a dtype) bind to the constant the model graph holds there, so the value is read from
the graph and never assumed. Every other constant in the search function must match exactly.
"""
import operator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Hashable, Optional, Union

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.passes.utils.matcher_utils import InternalMatch, SubgraphMatcher

from cohere_fx.passes.normalize import normalize_graph


def known_equal(a, b) -> bool:
    """Whether two sizes (or tuples of sizes) are equal for every value a dynamic shape may take. Checks must
    not compare symbolic sizes directly: that would add guards after Dynamo has finished tracing."""
    if isinstance(a, (tuple, list, torch.Size)) or isinstance(b, (tuple, list, torch.Size)):
        return len(a) == len(b) and all(known_equal(x, y) for x, y in zip(a, b))
    return statically_known_true(a == b)


def fake_value(node: Any):
    """The fake tensor (or other value) Dynamo recorded for a node, or None."""
    if not isinstance(node, torch.fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


@dataclass
class Match:
    """One occurrence of a pattern in a graph: inputs by the search function's argument names, and outputs."""

    pattern: "Pattern"
    graph: torch.fx.Graph
    bindings: dict[str, Any]
    outputs: list[torch.fx.Node]
    nodes: list[torch.fx.Node]

    def __getitem__(self, name: str) -> Any:
        return self.bindings[name]

    def call(self, op, *args) -> torch.fx.Node:
        """A node calling ``op`` at the insert point, named after the pattern (what printed graphs show)."""
        return self.graph.create_node("call_function", op, args, name=self.pattern.name)

    def split(self, fused: torch.fx.Node, parts: tuple[str, ...]) -> tuple[torch.fx.Node, ...]:
        """getitem nodes of an op with several outputs, one per matched output in order (named after the op and
        ``parts``), so each takes one matched output's place."""
        fused.meta["example_value"] = tuple(fake_value(out) for out in self.outputs)
        return tuple(self.graph.create_node("call_function", operator.getitem, (fused, i), name=f"{fused.name}_{part}")
                     for i, part in enumerate(parts))

    def val(self, name: str):
        """Fake tensor of a bound input (shape, dtype, device as Dynamo traced them)."""
        return fake_value(self.bindings[name])


@dataclass(frozen=True)
class Pattern:
    """A named fusion: ``search`` (the math as HF writes it), ``check`` and ``replace``.

    ``search`` is one function, or a tuple of variants where HF spells the same computation in more than one
    way (e.g. attention with and without ``repeat_kv``); each variant is matched in turn.
    ``check(match)`` returns None when the replacement is exact for this match, else the reason it is not (the
    report lists these as near misses). ``replace(match)`` is called with the graph's insert point set and
    returns the node (or tuple of nodes) that takes the place of the search function's output(s).
    ``member(match)`` says whether an occurrence is a candidate at all: the decode-only fusions skip every
    training graph and prefill silently instead of listing each layer there as a near miss.
    """

    name: str
    search: Union[Callable, tuple[Callable, ...]]
    replace: Callable[[Match], Any]
    check: Callable[[Match], Optional[str]]
    literals: tuple[str, ...] = field(default=())
    member: Callable[[Match], bool] = lambda match: True

    @cached_property
    def variants(self) -> list[torch.fx.Graph]:
        searches = self.search if isinstance(self.search, tuple) else (self.search,)
        graphs = []
        for fn in searches:
            graph = torch.fx.symbolic_trace(fn).graph
            normalize_graph(graph)
            graph.eliminate_dead_code()
            graphs.append(graph)
        return graphs

    def find(self, graph: torch.fx.Graph, variant: torch.fx.Graph) -> list[Match]:
        """Every non-overlapping occurrence of one variant whose tensor inputs are graph nodes and whose
        literal inputs are constants."""
        matcher = SubgraphMatcher(variant, match_output=False, match_placeholder=False,
                                  remove_overlapping_matches=True, ignore_literals=False)
        calls = {(n.op, n.target) for n in graph.nodes}
        if any((anchor.op, anchor.target) not in calls for anchor in matcher.pattern_anchors):
            # a pattern of several outputs (rope_kv_write's q and two writes) matches only where all are present;
            # SubgraphMatcher would try the anchors it can place and fail on the others' inputs
            return []
        found = []
        for internal in matcher.match(graph):
            match = self._to_match(graph, variant, internal)
            if match is not None and self.member(match):
                found.append(match)
        return found

    def _to_match(self, graph: torch.fx.Graph, variant: torch.fx.Graph, internal: InternalMatch) -> Optional[Match]:
        by_name = {pn.target: internal.nodes_map[pn] for pn in variant.nodes
                   if pn.op == "placeholder" and pn in internal.nodes_map}
        for name, bound in by_name.items():
            if (name in self.literals) == isinstance(bound, torch.fx.Node):
                return None  # a tensor input bound to a constant, or a literal bound to a computed value
        inputs = set(internal.placeholder_nodes)
        nodes = [gn for pn, gn in internal.nodes_map.items()
                 if pn.op not in ("placeholder", "output") and isinstance(gn, torch.fx.Node) and gn not in inputs]
        return Match(self, graph, by_name, list(internal.returning_nodes), nodes)


@dataclass(frozen=True)
class SiblingPattern(Pattern):
    """A horizontal fusion: its occurrences are groups of ``search`` matches that read one node, which a fixed
    search graph cannot express (the number of members varies). ``member(match)`` says whether a single match
    may join a group (as for any pattern), ``source(x)`` what it really reads (seen through casts, say),
    ``min_size`` how many make a group worth fusing and ``max_size`` how many one replacement takes (larger
    groups are cut, in graph order).
    Each group is one ``Match`` with bindings ``x`` (the first member's input) and ``weights`` (every member's
    ``weight``), and the members' outputs as outputs, so ``check``/``replace`` and the pass manager's counting
    work unchanged: the count is fused groups."""

    source: Callable[[torch.fx.Node], Hashable] = lambda x: x
    min_size: Callable[[Match], int] = lambda match: 2
    max_size: int = 1 << 30

    def find(self, graph: torch.fx.Graph, variant: torch.fx.Graph) -> list[Match]:
        order = {n: i for i, n in enumerate(graph.nodes)}
        groups: dict[Hashable, list[Match]] = {}
        for single in super().find(graph, variant):
            groups.setdefault(self.source(single["x"]), []).append(single)
        found = []
        for members in groups.values():
            members.sort(key=lambda m: order[m.outputs[0]])
            for first in range(0, len(members), self.max_size):
                part = members[first:first + self.max_size]
                if len(part) < self.min_size(part[0]):
                    continue
                outputs = [m.outputs[0] for m in part]
                bindings = {"x": part[0]["x"], "weights": tuple(m["weight"] for m in part)}
                found.append(Match(self, graph, bindings, outputs, list(outputs)))
        return found
