"""The ``cohere_fx`` torch.compile backend: options -> pass pipeline -> inductor (default) or aot_autograd.

Registered through the ``torch_dynamo_backends`` entry point, so ``torch.compile(model, backend="cohere_fx")``
needs no import of cohere_fx. The rewrite happens on the Dynamo graph, before autograd: replacements are
custom ops with registered autograd, so the same patterns serve inference and training.
"""
import contextlib
import threading
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.fx

from cohere_fx.passes import TIED_EMBEDDING_GRAD, CohereFxPasses, GraphReport


@dataclass(frozen=True)
class Options:
    """``options=`` of ``torch.compile(..., backend="cohere_fx")``.

    inductor: hand the rewritten graph to inductor (True) or run it through aot_autograd without codegen (False:
        for debugging and fast CPU tests).
    print_graphs: print each Dynamo graph before and after the passes.
    passes: pattern names to apply (None: all registered), and ``tied_embedding_grad``, the post-grad pass that
        inductor runs on the backward graph.
    inductor_config: extra inductor config patches (a dict), applied to this compile only.
    return_logits: False lets ``linear_cross_entropy`` fuse the head GEMM into the loss when labels are given:
        the logits are never built and the output's ``logits`` is None (training memory). True keeps HF's outputs.
    """

    inductor: bool = True
    print_graphs: bool = False
    passes: Optional[tuple[str, ...]] = None
    inductor_config: Optional[dict] = None
    return_logits: bool = True

    @classmethod
    def parse(cls, options: Optional[dict]) -> "Options":
        options = dict(options or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"cohere_fx: unknown option(s) {unknown}; valid options: {valid}")
        if options.get("passes") is not None:
            options["passes"] = tuple(options["passes"])
        return cls(**options)

    def pattern_names(self) -> Optional[tuple[str, ...]]:
        """The patterns to run: ``passes`` (or all), without ``linear_cross_entropy`` while logits are returned."""
        from cohere_fx.patterns import PATTERNS

        names = self.passes if self.passes is not None else tuple(PATTERNS)
        return tuple(n for n in names if self.return_logits is False or n != "linear_cross_entropy")


_collectors = threading.local()


@contextlib.contextmanager
def collect_reports():
    """Collects the GraphReport of every graph compiled by this backend inside the block (used by explain)."""
    stack = _collectors.__dict__.setdefault("stack", [])
    reports: list[GraphReport] = []
    stack.append(reports)
    try:
        yield reports
    finally:
        stack.pop()


def _publish(report: GraphReport) -> None:
    for reports in getattr(_collectors, "stack", []):
        reports.append(report)


def _aot_eager(gm: torch.fx.GraphModule, example_inputs):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def run_as_is(graph, _inputs):
        return make_boxed_func(graph.forward)

    return aot_autograd(fw_compiler=run_as_is, bw_compiler=run_as_is)(gm, example_inputs)


def _inductor(gm: torch.fx.GraphModule, example_inputs, mode: Optional[str], config: Optional[dict],
              post_grad: bool):
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    from cohere_fx.ops import register_inductor_fallbacks
    from cohere_fx.passes.tied_embedding_grad import TiedEmbeddingGradPass

    register_inductor_fallbacks()

    patches = dict(list_mode_options(mode) if mode else {})
    patches.update(config or {})
    if post_grad:  # before any post-grad pass of the user's own, which then sees the rewritten graph
        patches["post_grad_custom_post_pass"] = TiedEmbeddingGradPass(patches.get("post_grad_custom_post_pass"))
    return compile_fx(gm, example_inputs, config_patches=patches or None)


def cohere_fx(gm: torch.fx.GraphModule, example_inputs, *, options: Optional[dict] = None,
              mode: Optional[str] = None):
    opts = Options.parse(options)
    import cohere_fx.ops  # noqa: F401  (registers torch.ops.cohere_fx.*)

    report = CohereFxPasses(opts.pattern_names()).run(gm)
    _publish(report)
    if opts.print_graphs:
        print(f"# cohere_fx: graph before passes\n{report.before}\n# cohere_fx: graph after passes\n{report.after}")
    if opts.inductor:
        post_grad = opts.passes is None or TIED_EMBEDDING_GRAD in opts.passes
        return _inductor(gm, example_inputs, mode, opts.inductor_config, post_grad)
    return _aot_eager(gm, example_inputs)
