"""Fine-tune a tiny Cohere with PEFT LoRA through the stock HF Trainer, eagerly and through cohere_fx.

    python examples/finetune_lora.py              # CPU or GPU, no download (random weights, tiny config)
    python examples/finetune_lora.py --steps 20 --inductor

The model is compiled in place with ``model.compile(backend="cohere_fx", options=...)`` before it is handed to
the Trainer: the Trainer keeps the same PeftModel object (saving, PEFT detection and signature inspection work
as usual) and every training forward goes through the backend. ``TrainingArguments(torch_compile_backend=
"cohere_fx")`` does not get that far: the Trainer hands the name to accelerate's ``TorchDynamoPlugin``, which
(accelerate 1.15) accepts only the names of its ``DynamoBackend`` enum and raises ``ValueError: 'COHERE_FX' is
not a valid DynamoBackend``; it would pass no backend options either (only ``backend`` and ``mode``).
"""
import argparse
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import CohereForCausalLM, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from cohere_fx.configs import tiny_cohere_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LossLog(TrainerCallback):
    """The training loss of every logged step, as the Trainer reports it."""

    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def counting_sequences(count, length, vocab_size, seed):
    """Token runs that count up from a random start: a next-token task a few LoRA steps visibly learn."""
    starts = torch.randint(0, vocab_size - 3, (count, 1), generator=torch.Generator().manual_seed(seed))
    ids = (starts + torch.arange(length)) % (vocab_size - 3) + 3
    return [{"input_ids": row, "labels": row} for row in ids]


def finetune(options=None, steps=4, layers=2, seed=0, init_lora_weights=True):
    """Train LoRA (r=4, all seven projections) for ``steps`` steps; ``options`` None trains eagerly, a dict
    compiles with ``backend="cohere_fx"`` and those options. Returns the logged losses, one per step."""
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = CohereForCausalLM(tiny_cohere_config(layers=layers)).to(device)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                      init_lora_weights=init_lora_weights)
    model = get_peft_model(model, lora)
    if options is not None:
        model.compile(backend="cohere_fx", options=options)
    log = LossLog()
    data = counting_sequences(4 * steps, 16, model.config.vocab_size, seed)
    with tempfile.TemporaryDirectory() as scratch:  # nothing is saved; the Trainer still wants a directory
        args = TrainingArguments(output_dir=scratch, max_steps=steps, learning_rate=2e-2,
                                 per_device_train_batch_size=4, logging_steps=1, save_strategy="no", report_to=[],
                                 use_cpu=device == "cpu", dataloader_num_workers=0, seed=seed, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[log])
        trainer.remove_callback(PrinterCallback)  # the table below shows the losses
        trainer.train()
    return log.losses


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--inductor", action="store_true", help="hand the rewritten graph to inductor (slow to "
                        "compile on CPU); default: run it through aot_autograd without codegen")
    args = parser.parse_args()

    eager = finetune(None, args.steps)
    compiled = finetune({"inductor": args.inductor}, args.steps)
    print(f"{'step':>4}  {'eager loss':>12}  {'cohere_fx loss':>14}")
    for step, (e, c) in enumerate(zip(eager, compiled), 1):
        print(f"{step:>4}  {e:>12.6f}  {c:>14.6f}")
    worst = max(abs(c - e) / abs(e) for e, c in zip(eager, compiled))
    print(f"largest relative difference: {worst:.2e}")
    assert worst < 1e-4, "the compiled run diverged from eager"


if __name__ == "__main__":
    main()
