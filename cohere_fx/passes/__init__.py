"""The pass pipeline the backend runs on every Dynamo graph (see manager.py)."""
from cohere_fx.passes.manager import CohereFxPasses, pass_names
from cohere_fx.passes.report import GraphReport, Report
from cohere_fx.passes.tied_embedding_grad import NAME as TIED_EMBEDDING_GRAD

__all__ = ["CohereFxPasses", "GraphReport", "Report", "TIED_EMBEDDING_GRAD", "pass_names"]
