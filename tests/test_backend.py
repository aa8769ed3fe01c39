"""The backend's contract: entry point, options, pass pipeline identity, printing."""
import subprocess
import sys

import pytest
import torch
from transformers import CohereForCausalLM

from cohere_fx.backend import Options
from cohere_fx.configs import tiny_cohere_config
from cohere_fx.passes import CohereFxPasses
from cohere_fx.patterns import PATTERNS


def test_backend_is_listed_without_importing_cohere_fx():
    code = ("import sys, torch._dynamo; names = torch._dynamo.list_backends(None); "
            "print('cohere_fx' in names, 'cohere_fx' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid options: .*inductor.*print_graphs.*passes"):
        Options.parse({"inductr": False})


def test_unknown_pattern_name_is_refused():
    with pytest.raises(ValueError, match="unknown pattern"):
        CohereFxPasses(["layer_norm", "no_such_fusion"])


def test_uuid_is_stable_and_depends_on_enabled_patterns():
    assert CohereFxPasses().uuid() == CohereFxPasses().uuid()
    assert CohereFxPasses([]).uuid() != CohereFxPasses().uuid()
    assert CohereFxPasses(list(reversed(PATTERNS))).uuid() == CohereFxPasses().uuid()


def test_print_graphs_and_passes_option(capsys):
    model = CohereForCausalLM(tiny_cohere_config(layers=1)).eval()
    ids = torch.randint(3, 128, (1, 6))
    with torch.no_grad():
        torch.compile(model, backend="cohere_fx", options={"inductor": False, "print_graphs": True})(ids)
        printed = capsys.readouterr().out
        assert "# cohere_fx: graph before passes" in printed and "cohere_fx.layer_norm(" in printed
        torch._dynamo.reset()
        torch.compile(model, backend="cohere_fx",
                      options={"inductor": False, "print_graphs": True, "passes": []})(ids)
        assert "cohere_fx.layer_norm(" not in capsys.readouterr().out


def test_every_op_has_an_inductor_fallback_before_compiling():
    """torch 2.11's inductor formats ``str()`` of an op's IR arguments when it makes an implicit fallback, which is
    exponential in the graph's depth (minutes on an 8-layer model), so the backend registers each op's fallback
    first: every op in torch's registry of custom ops under ``cohere_fx::`` has a lowering afterwards."""
    from torch._inductor.lowering import lowerings
    from torch._library.custom_ops import OPDEFS

    import cohere_fx.ops

    cohere_fx.ops.register_inductor_fallbacks()
    ours = {name: op for name, op in OPDEFS.items() if name.startswith("cohere_fx::")}
    assert len(ours) >= 15
    assert [name for name, op in ours.items() if op._opoverload not in lowerings] == []
