"""What the pipeline did, per graph and per compile: match counts, near misses, graphs before and after."""
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class GraphReport:
    """One Dynamo graph through the pipeline."""

    before: str
    after: str
    counts: dict[str, int]
    near_misses: dict[str, list[str]]
    nodes_before: int
    nodes_after: int
    skipped: Optional[str] = None


@dataclass
class Report:
    """Every graph one compile produced (a model without graph breaks gives one per forward signature)."""

    pattern_names: list[str]
    graphs: list[GraphReport] = field(default_factory=list)

    @property
    def matches(self) -> dict[str, int]:
        """Pattern name -> replacements over all graphs; every registered name is present, zeros included."""
        return {name: sum(g.counts.get(name, 0) for g in self.graphs) for name in self.pattern_names}

    @property
    def near_misses(self) -> dict[str, list[str]]:
        return {name: [m for g in self.graphs for m in g.near_misses.get(name, [])] for name in self.pattern_names}

    def table(self) -> str:
        width = max([len(n) for n in self.pattern_names] + [7])
        lines = [f"{'pattern':<{width}}  matches", f"{'-' * width}  -------"]
        lines += [f"{name:<{width}}  {count:>7}" for name, count in self.matches.items()]
        for name, misses in self.near_misses.items():
            lines += [f"  not matched ({name}): {m}" for m in misses]
        for i, g in enumerate(self.graphs):
            lines.append(f"graph {i}: {g.nodes_before} nodes -> {g.nodes_after} nodes"
                         + (f" ({g.skipped})" if g.skipped else ""))
        return "\n".join(lines)

    def __str__(self) -> str:
        parts = [self.table()]
        for i, g in enumerate(self.graphs):
            parts.append(f"\n# rewritten graph {i}\n{g.after}")
        return "\n".join(parts)
