"""The ``torch.ops.cohere_fx.*`` custom ops that rewritten graphs call.

Each op file holds the schema, the fake (meta) implementation, the autograd formula and the torch reference
used on devices Triton cannot run on. Importing this package registers every op.
"""
import functools

from cohere_fx.ops import layer_norm  # noqa: F401
from cohere_fx.ops import cross_entropy  # noqa: F401
from cohere_fx.ops import qk_norm_rope  # noqa: F401
from cohere_fx.ops import paged_attention  # noqa: F401
from cohere_fx.ops import swiglu  # noqa: F401
from cohere_fx.ops import parallel_residual  # noqa: F401
from cohere_fx.ops import embedding  # noqa: F401
from cohere_fx.ops import decode_linear  # noqa: F401
from cohere_fx.ops import decode_residual  # noqa: F401
from cohere_fx.ops import rope_kv_write  # noqa: F401
from cohere_fx.ops import lora  # noqa: F401
from cohere_fx.ops import swiglu_lora_shrink  # noqa: F401


def custom_ops() -> list:
    """Every op registered under ``cohere_fx::`` (torch's own registry of ``torch.library.custom_op``s)."""
    from torch._library.custom_ops import OPDEFS

    return [op for name, op in OPDEFS.items() if name.startswith("cohere_fx::")]


@functools.cache
def register_inductor_fallbacks() -> None:
    """Gives each op an explicit inductor fallback (with the layout constraint inductor would pick itself) before
    the first compile.

    Why: left to itself, torch 2.11's inductor creates the fallback when it first meets an op and formats an info
    message with ``str()`` of the op's IR arguments, even with logging off. That string prints the IR of
    everything upstream, and the IR is a DAG with shared nodes, so it grows exponentially with depth: on the
    8-layer r7b training graph the head op's message took ~6 minutes of an H100 compile (2 layers: 0.2 s).
    """
    from torch._inductor.lowering import lowerings, make_fallback, tag_to_layout_constraint
    from torch._library.utils import get_layout_constraint_tag

    for op in custom_ops():
        overload = op._opoverload
        if overload not in lowerings:
            make_fallback(overload, layout_constraint=tag_to_layout_constraint(get_layout_constraint_tag(overload)),
                          warn=False)
