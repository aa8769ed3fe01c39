"""``python -m cohere_fx.bench``: argument parsing and dispatch; heavy imports happen after parsing.

Examples (GPU):
    python -m cohere_fx.bench train --mode full            # r7b-8L, B2xS2048, eager vs inductor vs cohere_fx
    python -m cohere_fx.bench decode --batch 1,16 --prompt 512 --new 128
    python -m cohere_fx.bench decode --batch 1,16,64 --engine --compare eager,cohere_fx
    python -m cohere_fx.bench prefill --preset command-r7b --batch 1 --seq 4096 --logits-to-keep 1
    python -m cohere_fx.bench report                       # BENCHMARKS.md from benchmarks/results/*.json
CPU smoke (tiny model, fp32, one timed call, no warm-up):
    python -m cohere_fx.bench train --smoke --compare eager,cohere_fx --no-inductor
"""
import argparse
import gc
import shlex
import sys

# Per subcommand: the anchors' workloads and repetitions, and the --smoke replacements.
DEFAULTS = {
    "train": dict(batch=2, seq=2048, iters=20, warmup=3),  # a step is ~0.1 s: enough calls for a steady median
    "prefill": dict(batch=4, seq=2048, iters=10, warmup=3),
    "decode": dict(batch=[1], prompt=512, new=128, iters=3, warmup=1),
    "kernels": dict(batch=4, seq=2048, iters=50, warmup=5),
}
SMOKE = {
    "train": dict(batch=2, seq=16),
    "prefill": dict(batch=2, seq=16),
    "decode": dict(batch=[1], prompt=8, new=4),
    "kernels": dict(batch=1, seq=8),
}
SMOKE_RUNS = dict(iters=1, warmup=0)
ALL = (["train", "--mode", "full"], ["train", "--mode", "lora"], ["train", "--mode", "qlora"], ["prefill"],
       ["decode"], ["kernels"])


def _ints(text):
    return [int(v) for v in text.split(",") if v.strip()]


def _names(text):
    return [v.strip() for v in text.split(",") if v.strip()]


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model and run")
    g.add_argument("--preset", help="r7b-8L (default), command-r, command-r-08-2024, command-r-plus, command-r7b, "
                                    "command-a, tiny, tiny-cohere2")
    g.add_argument("--layers", type=int, help="truncate the model to this many layers")
    g.add_argument("--model", metavar="PATH", help="load a local checkpoint instead of a preset")
    g.add_argument("--device", help="default: cuda when available (cpu with --smoke)")
    g.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    g.add_argument("--attn", default="sdpa", help="attn_implementation (default sdpa, as the anchors)")
    g.add_argument("--compare", default="eager,inductor,cohere_fx", help="systems, comma-separated (decode also "
                   "takes hf-cb: HF's continuous batching, model.generate_batch)")
    g.add_argument("--iters", type=int, help="timed calls (median reported)")
    g.add_argument("--warmup", type=int, help="untimed calls after the first (compiling) one")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default="benchmarks/results", help="directory for the JSON record (and PNG)")
    g.add_argument("--profile", action="store_true", help="CUDA: profile one more call of each system; the record "
                   "and stderr get its top kernels and the share of wall time the GPU was busy")
    g.add_argument("--memory", action="store_true", help="CUDA: one more call of each system with the allocator's "
                   "history on; the record and stderr get what is live at its peak, by allocation site")
    g.add_argument("--smoke", action="store_true", help="tiny preset, fp32 on cpu, 1 timed call, no warm-up")
    b = common.add_argument_group("cohere_fx backend options")
    b.add_argument("--no-inductor", action="store_true", help="options inductor=False (aot_autograd, no codegen)")
    b.add_argument("--passes", help="options passes=[...], comma-separated pattern names")
    b.add_argument("--option", action="append", metavar="KEY=VALUE", help="any other backend option (JSON value)")
    b.add_argument("--ablate", help="patterns the cohere_fx-ablated system leaves out (comma-separated): "
                                    "--compare cohere_fx,cohere_fx-ablated times them with and without, in one run")

    p = argparse.ArgumentParser(prog="python -m cohere_fx.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", parents=[common], help="one training step: forward with labels, backward")
    t.add_argument("--mode", choices=["full", "lora", "qlora"], default="full")
    t.add_argument("--batch", type=int)
    t.add_argument("--seq", type=int)
    t.add_argument("--lora-r", type=int, default=16)
    t.add_argument("--interleave", action="store_true", help="compile every system, then alternate their steps "
                   "(A/B ratios on a machine whose speed drifts; a peak counts what the others keep)")
    f = sub.add_parser("prefill", parents=[common], help="one forward pass without cache")
    f.add_argument("--batch", type=int)
    f.add_argument("--seq", type=int)
    f.add_argument("--logits-to-keep", type=int, default=0, help="HF logits_to_keep (0: all positions)")
    d = sub.add_parser("decode", parents=[common], help="greedy generate, end to end")
    d.add_argument("--batch", type=_ints, help="batch sizes, comma-separated (default 1)")
    d.add_argument("--prompt", type=int, help="prompt tokens (default 512)")
    d.add_argument("--new", type=int, help="generated tokens (default 128)")
    d.add_argument("--paged", action="store_true", help="cohere_fx decodes with cohere_fx.runtime.PagedKVCache")
    d.add_argument("--engine", action="store_true", help="cohere_fx decodes with cohere_fx.runtime.Engine "
                   "(continuous batching, compiled decode step); also reports steady-state decode tok/s")
    k = sub.add_parser("kernels", parents=[common], help="each cohere_fx op vs the HF math, eager and compiled")
    k.add_argument("--kernels", type=_names, help="default: layer_norm,qk_norm_rope,rope,scaled_cross_entropy,swiglu,"
                                                 "embedding,parallel_residual,paged_attention")
    k.add_argument("--directions", type=_names, default=["fwd", "fwd+bwd"])
    k.add_argument("--batch", type=int)
    k.add_argument("--seq", type=int)
    sub.add_parser("all", parents=[common], help="every workload with its defaults, then report")
    r = sub.add_parser("report", help="regenerate BENCHMARKS.md from the JSON records")
    r.add_argument("--results", default="benchmarks/results")
    r.add_argument("--output", default="BENCHMARKS.md")
    r.add_argument("--include-smoke", action="store_true", help="also render --smoke records (tests)")
    return p


def _resolve(args):
    """Fills the defaults that depend on the subcommand, --smoke and the machine."""
    import torch

    from cohere_fx.bench.models import PRESETS
    from cohere_fx.bench.systems import parse_systems

    for key, value in {**DEFAULTS[args.cmd], **({**SMOKE[args.cmd], **SMOKE_RUNS} if args.smoke else {})}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.preset = args.preset or ("tiny" if args.smoke else "r7b-8L")
    if not args.model and args.preset not in PRESETS:
        raise SystemExit(f"unknown --preset {args.preset!r}; choose from {', '.join(PRESETS)}")
    args.device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    if args.device.type == "cuda" and args.device.index is None:
        args.device = torch.device("cuda", torch.cuda.current_device())
    args.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if args.device.type == "cuda" else "fp32")]
    args.systems = parse_systems(args.compare, args.cmd)
    if "cohere_fx-ablated" in args.systems:
        from cohere_fx.bench.systems import backend_options

        backend_options(args, "cohere_fx-ablated")  # refuses a missing or unknown --ablate before any work
    if getattr(args, "interleave", False) and (args.profile or args.memory):
        raise SystemExit("--interleave times the systems' steps only: --profile and --memory need a run of their own")
    if args.cmd == "kernels":
        from cohere_fx.bench.kernels import KERNELS

        args.kernels = args.kernels or list(KERNELS)
        bad = [n for n in args.kernels if n not in KERNELS] + [d for d in args.directions
                                                                if d not in ("fwd", "fwd+bwd")]
        if bad:
            raise SystemExit(f"unknown kernel(s)/direction(s) {bad}; kernels: {','.join(KERNELS)}; "
                             "directions: fwd,fwd+bwd")


def _run_one(args, argv) -> int:
    from cohere_fx.bench import report
    from cohere_fx.bench.systems import backend_options
    from cohere_fx.bench.timing import environment

    _resolve(args)
    if args.cmd == "kernels":
        from cohere_fx.bench.kernels import kernels as workload
    else:
        from cohere_fx.bench import workloads

        workload = getattr(workloads, args.cmd)
    # What lives now (modules, earlier runs' survivors) is set aside, so the collection after each system scans
    # only this run's objects: ~0.5 s less per system.
    gc.collect()
    gc.freeze()
    try:
        body = workload(args)
    finally:
        gc.unfreeze()
    record = {"schema": 1, "command": "python -m cohere_fx.bench " + shlex.join(argv), "smoke": args.smoke,
              "device": str(args.device), "dtype": str(args.dtype).removeprefix("torch."), "systems": args.systems,
              "backend_options": backend_options(args), "iters": args.iters, "warmup": args.warmup,
              "env": environment(args.device), **body}
    path = report.save(record, args.out)
    print(report.render_record(record))
    print(f"record: {path}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.cmd == "report":
        from cohere_fx.bench.report import write_benchmarks

        print(write_benchmarks(args.results, args.output, args.include_smoke))
        return 0
    if args.cmd != "all":
        return _run_one(args, argv)
    rest = argv[argv.index("all") + 1:]
    failed = []
    for sub in ALL:
        try:
            main(sub + rest)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - one workload failing must not stop the others
            print(f"[all] {' '.join(sub)} failed: {e}", file=sys.stderr)
            failed.append(" ".join(sub))
    if not args.smoke:
        from cohere_fx.bench.report import write_benchmarks

        write_benchmarks(args.out, "BENCHMARKS.md")
    if failed:
        print(f"[all] failed: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
