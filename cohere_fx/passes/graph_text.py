"""Graphs as short, stable text: what ``print_graphs``, ``explain`` and the golden-graph tests show.

Dynamo's own printout names parameters ``L_self_modules_model_modules_layers_modules_0_..._weight_`` and
carries file paths; here parameters read ``model.layers.0.input_layernorm.weight``, every node shows its dtype
and shape, arithmetic is infix, and nothing depends on where packages are installed.
"""
import operator
import re

import torch
import torch.fx
from torch.fx.node import _get_qualified_name

from cohere_fx.patterns.base import fake_value

_INFIX = {operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/", operator.matmul: "@",
          operator.le: "<=", operator.lt: "<", operator.ge: ">=", operator.gt: ">", operator.eq: "==",
          operator.and_: "&", operator.or_: "|", operator.floordiv: "//", operator.mod: "%", operator.pow: "**"}
_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
           torch.int64: "i64", torch.int32: "i32", torch.bool: "b8", torch.uint8: "u8", torch.int8: "i8"}


def source_name(placeholder: str) -> str:
    """``L_self_modules_model_modules_norm_parameters_weight_`` -> ``model.norm.weight``."""
    name = re.sub(r"^[Ll]_", "", placeholder).rstrip("_")
    name = re.sub(r"^self_", "", name)
    name = re.sub(r"^(modules|parameters|buffers)_", "", name)
    name = re.sub(r"_(modules|parameters|buffers)_", ".", name)
    return re.sub(r"^kwargs_", "", name)


def _type(node: torch.fx.Node) -> str:
    val = fake_value(node)
    if isinstance(val, torch.Tensor):
        return f"{_DTYPES.get(val.dtype, str(val.dtype))}{list(val.shape)}"
    if isinstance(val, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in val):
        return "(" + ", ".join(f"{_DTYPES.get(v.dtype, v.dtype)}{list(v.shape)}" for v in val) + ")"
    return ""


def _target(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        packet = target.overloadpacket
        name = f"{packet._qualified_op_name.replace('::', '.')}"
        return name if target._overloadname == "default" else f"{name}.{target._overloadname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.replace("::", ".")
    name = _get_qualified_name(target)
    for prefix, short in (("torch._C._nn.", "torch.nn.functional."), ("torch._C._VariableFunctions.", "torch.")):
        if name.startswith(prefix):
            return short + name[len(prefix):]
    return name.removeprefix("_operator.").removeprefix("builtins.")


class _Namer:
    def __init__(self, graph: torch.fx.Graph):
        self.names = {n: (source_name(n.name) if n.op == "placeholder" else n.name) for n in graph.nodes}

    def arg(self, a) -> str:
        if isinstance(a, torch.fx.Node):
            return self.names[a]
        if isinstance(a, (list, tuple)):
            inner = ", ".join(self.arg(x) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
        if isinstance(a, slice):
            parts = ["" if v is None else self.arg(v) for v in (a.start, a.stop, a.step)]
            return ":".join(parts[:2]) + (f":{parts[2]}" if a.step is not None else "")
        if a is Ellipsis:
            return "..."
        if isinstance(a, torch.dtype):
            return str(a)
        if isinstance(a, torch.device):
            return f"device('{a}')"
        return repr(a)

    def call(self, node: torch.fx.Node) -> str:
        args = [self.arg(a) for a in node.args] + [f"{k}={self.arg(v)}" for k, v in node.kwargs.items()]
        if node.op == "call_method":
            return f"{args[0]}.{node.target}({', '.join(args[1:])})"
        if node.op == "call_module":
            return f"{node.target}({', '.join(args)})"
        if node.op == "get_attr":
            return f"self.{node.target}"
        if node.target in _INFIX and len(node.args) == 2 and not node.kwargs:
            return f"{args[0]} {_INFIX[node.target]} {args[1]}"
        if node.target is operator.neg:
            return f"-{args[0]}"
        if node.target is operator.getitem:
            index = node.args[1]
            inner = ", ".join(self.arg(i) for i in index) if isinstance(index, tuple) else self.arg(index)
            return f"{args[0]}[{inner}]"
        return f"{_target(node)}({', '.join(args)})"


def graph_text(gm: torch.fx.GraphModule) -> str:
    namer = _Namer(gm.graph)
    lines = ["graph("] + [f"        {namer.names[n]}: {_type(n)}," for n in gm.graph.nodes if n.op == "placeholder"]
    lines.append("):")
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            lines.append(f"    return {namer.arg(node.args[0])}")
            continue
        kind = _type(node)
        recomputed = "  # recomputed in backward" if "recompute" in node.meta else ""
        lines.append(f"    {namer.names[node]}{': ' + kind if kind else ''} = {namer.call(node)}{recomputed}")
    return "\n".join(lines) + "\n"
