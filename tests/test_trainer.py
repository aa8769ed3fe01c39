"""The stock HF Trainer fine-tunes a cohere_fx-compiled PEFT LoRA Cohere with eager's losses: the run of
examples/finetune_lora.py (the model compiled in place; why not ``TrainingArguments(torch_compile_backend=...)``
is in the example's docstring)."""
import importlib.util
from pathlib import Path

from cohere_fx.backend import collect_reports
from cohere_fx.passes import Report
from cohere_fx.patterns import PATTERNS

STEPS = 4


def _example():
    path = Path(__file__).resolve().parent.parent / "examples" / "finetune_lora.py"
    spec = importlib.util.spec_from_file_location("finetune_lora", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trainer_losses_match_eager(monkeypatch):
    """On CPU the ops run their torch references, as they do for a user running the example there: the
    kernels have their own tests, and Triton's interpreter would take seconds a step. On a GPU they launch."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    example = _example()
    eager = example.finetune(None, steps=STEPS, init_lora_weights=False)
    with collect_reports() as graphs:
        compiled = example.finetune({"inductor": False}, steps=STEPS, init_lora_weights=False)
    assert len(eager) == len(compiled) == STEPS and len(set(eager)) == STEPS  # one loss per step, and it moves
    assert all(abs(c - e) <= 1e-5 * e for e, c in zip(eager, compiled)), (eager, compiled)
    matches = Report(list(PATTERNS), graphs).matches
    assert matches["layer_norm"] == 3 and matches["scaled_cross_entropy"] == 1
    assert matches["lora_shared_input"] == 2
