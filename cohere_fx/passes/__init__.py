"""The pass pipeline the backend runs on every Dynamo graph (see manager.py)."""
from cohere_fx.passes.manager import CohereFxPasses
from cohere_fx.passes.report import GraphReport, Report

__all__ = ["CohereFxPasses", "GraphReport", "Report"]
