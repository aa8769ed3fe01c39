"""The ordered pipeline: normalise spellings, apply each enabled pattern, mark what the backward should recompute
(recompute.py), restore topological order (moving as few nodes as possible, so side-effecting nodes keep their
place), verify.

``CohereFxPasses`` is an inductor ``CustomGraphPass``: its ``uuid()`` hashes the source of every pass and
pattern plus the enabled names, so it can be installed in an inductor hook without switching inductor's FX
graph cache off. The backend runs it on the Dynamo graph before autograd, so one pattern serves inference and
training graphs alike.
"""
import hashlib
from pathlib import Path

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.pattern_matcher import stable_topological_sort

from cohere_fx.passes.graph_text import graph_text
from cohere_fx.passes.normalize import normalize_graph
from cohere_fx.passes.pattern_pass import apply_pattern
from cohere_fx.passes.recompute import mark_lora_recompute
from cohere_fx.passes.report import GraphReport
from cohere_fx.passes.tied_embedding_grad import NAME as TIED_EMBEDDING_GRAD
from cohere_fx.patterns import PATTERNS

_PACKAGE = Path(__file__).resolve().parent.parent


_COHERE_MODULES = ("transformers.models.cohere.", "transformers.models.cohere2.")
_COHERE_SOURCES = (str(Path("models", "cohere", "modeling_cohere.py")), str(Path("models", "cohere2", "modeling_cohere2.py")))


def is_cohere_graph(gm: torch.fx.GraphModule) -> bool:
    """Whether Dynamo traced HF Cohere/Cohere2 code into this graph: a Cohere module on a node's module stack,
    or (for a graph holding only the head and loss, after a graph break) Cohere source in a node's stack trace.
    Other models' graphs (a Llama, a user's module that merely looks similar) are never rewritten."""
    for node in gm.graph.nodes:
        for _, module_type in (node.meta.get("nn_module_stack") or {}).values():
            name = module_type if isinstance(module_type, str) else f"{module_type.__module__}.{module_type.__name__}"
            if name.startswith(_COHERE_MODULES):
                return True
        if any(path in (node.meta.get("stack_trace") or "") for path in _COHERE_SOURCES):
            return True
    return False


def _node_count(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "output"))


def _link_subgraph_inputs(gm: torch.fx.GraphModule) -> None:
    """Record on each input of a higher-order op's subgraph (``meta["cohere_fx_outer"]``) the outer node passed to
    it, where one call passes it: with HF gradient checkpointing the attention mask enters every layer's
    subgraph as an input, and its proof (patterns/attention_mask.py) must see the constant computation outside."""
    calls: dict = {}
    for owner in [gm] + [m for m in gm.modules() if m is not gm and isinstance(m, torch.fx.GraphModule)]:
        for node in owner.graph.nodes:
            body = node.args[0] if node.op == "call_function" and node.args else None
            if isinstance(body, torch.fx.Node) and body.op == "get_attr":
                sub = getattr(owner, body.target, None)
                if isinstance(sub, torch.fx.GraphModule):
                    calls.setdefault(sub, []).append(node.args[1:])
    for sub, operand_lists in calls.items():
        inputs = [n for n in sub.graph.nodes if n.op == "placeholder"]
        if len(operand_lists) != 1 or len(operand_lists[0]) != len(inputs):
            continue
        for placeholder, operand in zip(inputs, operand_lists[0]):
            if isinstance(operand, torch.fx.Node):
                placeholder.meta["cohere_fx_outer"] = operand


def pass_names() -> list[str]:
    """Every name ``options={"passes": [...]}`` takes: the Dynamo-graph patterns in pipeline order, then the
    post-grad pass (tied_embedding_grad.py), which the backend installs in inductor."""
    return [*PATTERNS, TIED_EMBEDDING_GRAD]


class CohereFxPasses(CustomGraphPass):
    def __init__(self, enabled=None):
        names = list(PATTERNS) if enabled is None else list(enabled)
        unknown = sorted(set(names) - set(pass_names()))
        if unknown:
            raise ValueError(f"unknown pattern(s) {unknown}; registered: {pass_names()}")
        self.enabled = [n for n in PATTERNS if n in names]  # registry order, whatever order was asked

    def run(self, gm: torch.fx.GraphModule) -> GraphReport:
        before, nodes_before = graph_text(gm), _node_count(gm)
        if not is_cohere_graph(gm):
            return GraphReport(before, before, {name: 0 for name in self.enabled}, {}, nodes_before, nodes_before,
                               skipped="no Cohere module in this graph: passed through unchanged")
        counts = {name: 0 for name in self.enabled}
        near_misses = {name: [] for name in self.enabled}
        _link_subgraph_inputs(gm)
        # The graph itself, then the subgraphs of higher-order ops: with HF gradient checkpointing each decoder
        # layer is a torch.utils.checkpoint subgraph.
        for module in [gm] + [m for m in gm.modules() if m is not gm and isinstance(m, torch.fx.GraphModule)]:
            self._rewrite(module, counts, near_misses)
        return GraphReport(before, graph_text(gm), counts, near_misses, nodes_before, _node_count(gm))

    def _rewrite(self, gm: torch.fx.GraphModule, counts: dict, near_misses: dict) -> None:
        restore_spellings = normalize_graph(gm.graph)
        results = [apply_pattern(PATTERNS[name], gm.graph) for name in self.enabled]
        # a candidate one pattern refused may have been taken by a later one: only report what is still there
        alive = set(gm.graph.nodes)
        for r in results:
            counts[r.name] += r.count
            near_misses[r.name] += [why for node, why in r.near_misses if node in alive]
        if any(r.count for r in results):
            mark_lora_recompute(gm.graph)
            stable_topological_sort(gm.graph)
            gm.graph.lint()
            gm.recompile()
        else:
            restore_spellings()

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.run(graph.owning_module)

    def uuid(self) -> bytes:
        hasher = hashlib.sha256(",".join(self.enabled).encode())
        for path in sorted((_PACKAGE / "passes").glob("*.py")) + sorted((_PACKAGE / "patterns").glob("*.py")):
            hasher.update(path.read_bytes())
        return hasher.digest()
