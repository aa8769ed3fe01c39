"""``cohere_fx.explain``: compile a model with the backend, run it once, say what was rewritten and why not."""
import torch

from cohere_fx.backend import collect_reports
from cohere_fx.passes import Report
from cohere_fx.patterns import PATTERNS


def explain(model, *args, options=None, **kwargs) -> Report:
    """Compile ``model`` with ``backend="cohere_fx"``, call it once on ``args``/``kwargs``, return the Report.

    ``options`` are the backend's (default: ``{"inductor": False}``, since only the rewrite is of interest).
    The call runs as given (under ``torch.no_grad()`` if the caller wraps it), so inference and training graphs
    can both be explained. The model itself is not modified.
    """
    from cohere_fx.backend import cohere_fx

    options = {"inductor": False, **(options or {})}
    torch._dynamo.reset()  # explain the graphs this call produces, not ones cached by an earlier compile

    def backend(gm, example_inputs):
        return cohere_fx(gm, example_inputs, options=options)

    compiled = torch.compile(model, backend=backend)
    with collect_reports() as graphs:
        compiled(*args, **kwargs)
    torch._dynamo.reset()
    return Report(list(PATTERNS), list(graphs))
