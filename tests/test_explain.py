"""``cohere_fx.explain``: counts per pattern, the graphs, near misses, a readable text."""
import pytest
import torch
from transformers import Cohere2ForCausalLM, CohereForCausalLM

import cohere_fx
from cohere_fx.configs import tiny_cohere2_config, tiny_cohere_config
from cohere_fx.patterns import PATTERNS


@pytest.mark.parametrize("layers", [1, 3])
def test_layer_norm_count_is_layers_plus_one(layers):
    model = CohereForCausalLM(tiny_cohere_config(layers=layers))
    with torch.no_grad():
        report = cohere_fx.explain(model, torch.randint(3, 128, (2, 6)))
    assert set(report.matches) == set(PATTERNS)
    assert report.matches["layer_norm"] == layers + 1
    assert len(report.graphs) == 1
    graph = report.graphs[0]
    assert graph.after.count("cohere_fx.layer_norm(") == layers + 1
    assert graph.nodes_after < graph.nodes_before


def test_training_graph_is_rewritten_by_the_same_pattern():
    model = Cohere2ForCausalLM(tiny_cohere2_config(layers=4))
    ids = torch.randint(3, 128, (2, 9))
    report = cohere_fx.explain(model, ids, labels=ids)
    assert report.matches["layer_norm"] == 5


def test_report_text_has_table_and_rewritten_graph():
    model = CohereForCausalLM(tiny_cohere_config(layers=1))
    report = cohere_fx.explain(model, torch.randint(3, 128, (1, 4)))
    text = str(report)
    assert text.splitlines()[0].split() == ["pattern", "matches"]
    assert "# rewritten graph 0" in text
    assert "model.layers.0.input_layernorm.weight" in text
