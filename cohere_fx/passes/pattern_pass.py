"""Applies one registered pattern to a graph: find, check, replace, drop what the replacement made dead."""
from dataclasses import dataclass, field

import torch.fx

from cohere_fx.patterns.base import Match, Pattern, fake_value


@dataclass
class PatternResult:
    """What one pattern did to one graph: replacements made, and matches left alone with the reason."""

    name: str
    count: int = 0
    near_misses: list[tuple[torch.fx.Node, str]] = field(default_factory=list)


def _describe(match: Match) -> str:
    return ", ".join(n.name for n in match.outputs)


def _replace(match: Match, replaced: dict) -> None:
    graph = match.graph
    last = max(match.nodes, key=_position(graph))
    with graph.inserting_after(last):
        new = match.pattern.replace(match)
    new_nodes = new if isinstance(new, tuple) else (new,)
    if len(new_nodes) != len(match.outputs):
        raise RuntimeError(f"pattern {match.pattern.name}: replacement gave {len(new_nodes)} outputs, "
                           f"the match has {len(match.outputs)}")
    dropped = []
    for old, replacement in zip(match.outputs, new_nodes):
        if replacement is None:
            dropped.append(old)
            continue
        if fake_value(old) is not None:
            replacement.meta.setdefault("example_value", fake_value(old))
        if old.meta.get("stack_trace"):  # a node a pass made has none; torch joins the strings it finds
            replacement.meta.setdefault("stack_trace", old.meta["stack_trace"])
        old.replace_all_uses_with(replacement)
        replaced[old] = replacement
    producers = {a for node in match.nodes for a in node.all_input_nodes} - set(match.nodes)
    # Until none is left without users: the graph is only sorted at the end of the pipeline, so an earlier
    # replacement may sit after its own getitems, and position order alone would leave it behind.
    pending = set(match.nodes)
    while dead := [node for node in pending if not node.users]:
        for node in dead:
            graph.erase_node(node)
        pending.difference_update(dead)
    for node in dropped:
        _drop_from_outputs(node)
        _erase_if_dead(graph, node)
    for node in producers:
        _erase_if_dead(graph, node)


def _drop_from_outputs(node: torch.fx.Node) -> None:
    """A pattern output the replacement does not compute (``linear_cross_entropy``'s logits) becomes None in the
    graph's outputs; the pattern's check has made sure nothing else reads it."""
    for user in list(node.users):
        if user.op != "output":
            raise RuntimeError(f"{node.name} is dropped by a replacement but {user.name} still reads it")
        user.args = torch.fx.node.map_arg(user.args, lambda n: None if n is node else n)


def _erase_if_dead(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Erase a computation the replacement left without users (e.g. a mask no attention reads any more)."""
    if node.users or node.op in ("placeholder", "output", "get_attr") or node.is_impure():
        return
    inputs = node.all_input_nodes
    graph.erase_node(node)
    for producer in inputs:
        _erase_if_dead(graph, producer)


def _position(graph: torch.fx.Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return order.__getitem__


def _current(node, replaced: dict):
    """What a node found before earlier replacements of this pass now is (matches are all found first, so one
    match's input may be an earlier match's output: layer i + 1's residual is layer i's sum)."""
    while node in replaced:
        node = replaced[node]
    return node


def apply_pattern(pattern: Pattern, graph: torch.fx.Graph) -> PatternResult:
    result = PatternResult(pattern.name)
    replaced: dict = {}
    for variant in pattern.variants:
        for match in pattern.find(graph, variant):
            match.bindings = {name: _current(bound, replaced) for name, bound in match.bindings.items()}
            reason = pattern.check(match)
            if reason is not None:
                result.near_misses.append((match.outputs[0], f"{_describe(match)}: {reason}"))
                continue
            _replace(match, replaced)
            result.count += 1
    return result
