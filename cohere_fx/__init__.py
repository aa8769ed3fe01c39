"""cohere_fx: a torch.compile backend that rewrites stock Hugging Face Cohere graphs onto fused Triton kernels.

    torch.compile(model, backend="cohere_fx")            # the backend is found through its entry point
    report = cohere_fx.explain(model, input_ids)          # what was rewritten, and why not
"""
from cohere_fx.explain import explain

__version__ = "0.1.0"
__all__ = ["explain", "__version__"]
