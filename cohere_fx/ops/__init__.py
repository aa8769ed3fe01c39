"""The ``torch.ops.cohere_fx.*`` custom ops that rewritten graphs call.

Each op file holds the schema, the fake (meta) implementation, the autograd formula and the torch reference
used on devices Triton cannot run on. Importing this package registers every op.
"""
from cohere_fx.ops import layer_norm  # noqa: F401
from cohere_fx.ops import cross_entropy  # noqa: F401
from cohere_fx.ops import qk_norm_rope  # noqa: F401
from cohere_fx.ops import paged_attention  # noqa: F401
from cohere_fx.ops import swiglu  # noqa: F401
from cohere_fx.ops import parallel_residual  # noqa: F401
