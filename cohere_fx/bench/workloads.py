"""Model-level workloads: a training step, a prefill forward, greedy decoding; each returns a record body.

The workloads are those of ../shared/anchors so that numbers compare with them:
- train: ``model(input_ids=x, labels=x, use_cache=False).loss.backward()``, then every ``p.grad = None``
  (bench_baseline.py, bench_lora.py); LoRA r=16 on all seven projections through peft; QLoRA on an NF4 base.
- prefill: ``model(x, use_cache=False).logits`` under no_grad (bench_baseline.py ``fwd``), optionally with
  ``logits_to_keep`` (bench_cohere2_full.py uses 1).
- decode: ``generate`` greedy with min_new_tokens = max_new_tokens, timed end to end (prefill included);
  tok/s = batch * new / time. eager: the default dynamic cache. inductor: static cache + HF's own compile
  (its default CompileConfig), the anchors' "static_hf_autocompile". cohere_fx: the same mechanism with
  backend="cohere_fx", or with ``--paged`` the cohere_fx.runtime paged cache (the hook for the paged runtime),
  or with ``--engine`` the cohere_fx.runtime continuous-batching engine, which also reports its steady-state
  decode tok/s (decode steps alone, prefill left out) beside the end-to-end tok/s. hf-cb: HF's own continuous
  batching (``model.generate_batch``, paged KV cache), the stock-HF peer of the engine.
"""
import math
import time

import torch

from cohere_fx.bench.models import LORA_TARGETS, Shape, build_model, config_for, weight_bytes
from cohere_fx.bench.systems import (BACKEND_SYSTEMS, backend_options, compile_model, describe, run_interleaved,
                                     run_systems)
from cohere_fx.bench.timing import device_limits, measure, median


def rates(flops, nbytes, ms, limits) -> dict:
    """TFLOP/s and GB/s for a timed call, and their share of the device's limits where known."""
    out = {}
    if flops:
        out["tflops"] = flops / (ms / 1e3) / 1e12
        if limits:
            out["pct_flops"] = 100 * out["tflops"] * 1e12 / limits["flops"]
    if nbytes:
        out["gbps"] = nbytes / (ms / 1e3) / 1e9
        if limits:
            out["pct_bw"] = 100 * out["gbps"] * 1e9 / limits["bytes_per_s"]
    return out


def limit_ms(flops, nbytes, limits) -> dict:
    """The case's floor as a pseudo-result: the time its FLOPs (or bytes) take at the device's limit."""
    if not limits:
        return {}
    if flops:
        return {"ms": flops / limits["flops"] * 1e3, "basis": "FLOPs at the FLOP/s limit"}
    return {"ms": nbytes / limits["bytes_per_s"] * 1e3, "basis": "bytes at the bandwidth limit"}


def _token_ids(vocab, batch, seq, device, seed):
    """Random ids from 10 up (below are pad/bos/eos, which generate would treat specially)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (batch, seq), generator=gen).to(device)


def _model_info(args, config, model) -> dict:
    shape = Shape.of(config)
    return {"preset": None if args.model else args.preset, "path": args.model, "family": config.model_type,
            "layers": shape.layers, "hidden": shape.hidden, "heads": shape.heads, "kv_heads": shape.kv_heads,
            "head_dim": shape.head_dim, "ffn": shape.ffn, "vocab": shape.vocab,
            "sliding_window": getattr(config, "sliding_window", None) if any(shape.windows) else None,
            "use_qk_norm": bool(getattr(config, "use_qk_norm", False)), "logit_scale": config.logit_scale,
            "params": sum(p.numel() for p in model.parameters()), "matmul_params": shape.matmul_params,
            "attn_implementation": config._attn_implementation}


def train(args) -> dict:
    config = config_for(args.preset, args.layers, args.model, args.attn)
    shape = Shape.of(config)
    model = build_model(config, args.device, args.dtype, path=args.model, seed=args.seed, nf4=args.mode == "qlora")
    info = _model_info(args, config, model)
    if args.mode != "full":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_r, lora_dropout=0.0,
                                                 bias="none", target_modules=LORA_TARGETS))
        info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.train()
    x = _token_ids(shape.vocab, args.batch, args.seq, args.device, args.seed)
    flops = shape.train_flops(args.batch, args.seq, full=args.mode == "full")
    limits = device_limits(args.device, args.dtype)

    def make_step(system):
        compiled = compile_model(model, system, backend_options(args, system))

        def step():
            compiled(input_ids=x, labels=x, use_cache=False).loss.backward()
            for p in model.parameters():
                p.grad = None

        return step

    def summary(system, result):
        how = describe(system, backend_options(args, system))
        return {**result, **rates(flops, 0, result["ms"], limits), "how": how}

    def bench_one(system):
        result = measure(make_step(system), args.device, args.iters, args.warmup, f"{label} {system}",
                         profile=args.profile, memory=args.memory)
        return summary(system, result)

    label = f"train {args.mode}"
    if args.interleave:
        results = run_interleaved(args.systems, make_step, args.device, label, args.iters, args.warmup)
        results = {s: r if "error" in r else summary(s, r) for s, r in results.items()}
    else:
        results = run_systems(args.systems, bench_one, args.device, label)
    return {"workload": f"train-{args.mode}", "model": info, "limits": limits,
            "params": {"mode": args.mode, "batch": args.batch, "seq": args.seq, "lora_r": args.lora_r
                       if args.mode != "full" else None, "flops_per_step": flops},
            "cases": [{"name": f"B{args.batch}xS{args.seq}", "metric": "ms", "results": results,
                       "limit": limit_ms(flops, 0, limits)}]}


def prefill(args) -> dict:
    config = config_for(args.preset, args.layers, args.model, args.attn)
    shape = Shape.of(config)
    model = build_model(config, args.device, args.dtype, path=args.model, seed=args.seed).eval()
    x = _token_ids(shape.vocab, args.batch, args.seq, args.device, args.seed)
    kwargs = {"use_cache": False}
    if args.logits_to_keep:
        kwargs["logits_to_keep"] = args.logits_to_keep
    flops = shape.forward_flops(args.batch, args.seq, args.logits_to_keep)
    limits = device_limits(args.device, args.dtype)

    def bench_one(system):
        options = backend_options(args, system)
        compiled = compile_model(model, system, options)

        def forward():
            with torch.no_grad():
                return compiled(x, **kwargs).logits

        result = measure(forward, args.device, args.iters, args.warmup, f"prefill {system}",
                         profile=args.profile, memory=args.memory)
        return {**result, **rates(flops, 0, result["ms"], limits), "how": describe(system, options)}

    results = run_systems(args.systems, bench_one, args.device, "prefill")
    return {"workload": "prefill", "model": _model_info(args, config, model), "limits": limits,
            "params": {"batch": args.batch, "seq": args.seq, "logits_to_keep": args.logits_to_keep,
                       "flops_per_call": flops},
            "cases": [{"name": f"B{args.batch}xS{args.seq}", "metric": "ms", "results": results,
                       "limit": limit_ms(flops, 0, limits)}]}


def _generate_kwargs(system, model, options, args, batch):
    """(a function returning generate()'s extra kwargs for one call, how the system decodes)."""
    from transformers import CompileConfig

    if system == "eager":
        return lambda: {}, describe("eager", options) + ", dynamic cache"
    if system in BACKEND_SYSTEMS and args.paged:
        # HF auto-compiles only caches it knows to be static, so the forward is compiled here instead.
        from cohere_fx.runtime import PagedKVCache

        block = 16
        cache = PagedKVCache(model.config, num_blocks=batch * math.ceil((args.prompt + args.new) / block),
                             block_size=block, device=args.device, dtype=args.dtype, max_seqs=batch)
        model.forward = torch.compile(model.forward, backend="cohere_fx", options=options or None)

        def paged():
            cache.reset()
            return {"past_key_values": cache, "disable_compile": True}

        return paged, f"cohere_fx.runtime.PagedKVCache + torch.compile(model.forward, backend='cohere_fx', " \
                      f"options={options!r})"
    if system == "inductor":
        config, how = CompileConfig(), "static cache + HF auto-compile, CompileConfig() defaults (inductor)"
    else:
        # HF's default mode ("reduce-overhead": CUDA graphs) as for inductor. torch.compile refuses a mode beside
        # options, so with options the same inductor settings travel as the backend's inductor_config.
        if options:
            from torch._inductor import list_mode_options

            inductor_config = {**list_mode_options("reduce-overhead"), **options.get("inductor_config", {})}
            config = CompileConfig(backend="cohere_fx", mode=None,
                                   options={**options, "inductor_config": inductor_config})
        else:
            config = CompileConfig(backend="cohere_fx")
        how = (f"static cache + HF auto-compile, CompileConfig(backend='cohere_fx', mode={config.mode!r}, "
               f"options={config.options!r})")
    if args.device.type == "cpu":
        config._compile_all_devices = True  # HF compiles only on accelerators unless told
    return lambda: {"cache_implementation": "static", "compile_config": config}, how


def _engine_decode(model, options, args, x) -> tuple[dict, str]:
    """Times the workload through ``cohere_fx.runtime.Engine``: the B prompts are added, the first step prefills
    them all (their first tokens), every later step decodes all B at once until each has ``new`` tokens."""
    from cohere_fx.runtime import Engine, SamplingParams

    batch = x.shape[0]
    engine = Engine(model, max_batch=batch, max_seq_len=args.prompt + args.new, compile=True,
                    options=options or None, stop_token_ids=())  # no early stop: every request makes ``new`` tokens
    params = SamplingParams(max_new_tokens=args.new)
    decode_s = []

    def run():
        for prompt in x:
            engine.add_request(prompt, params)
        engine.step()
        if engine.num_waiting:
            raise RuntimeError(f"the engine admitted {batch - engine.num_waiting} of {batch} prompts in one step")
        start = time.perf_counter()  # idle once the last decode's tokens were read back: the device is done
        while not engine.idle:
            engine.step()
        decode_s.append(time.perf_counter() - start)

    result = measure(run, args.device, args.iters, args.warmup, f"decode B{batch} cohere_fx engine",
                     profile=args.profile, memory=args.memory)
    if args.new > 1:
        result["decode_tok_s"] = batch * (args.new - 1) / median(decode_s[-args.iters:])
    runner = engine.runner
    how = (f"cohere_fx.runtime.Engine(model, max_batch={batch}, max_seq_len={runner.max_seq_len}, "
           f"options={options!r}): prefill eager (SDPA), decode step compiled with backend='cohere_fx'"
           + (", CUDA graph per batch bucket" if runner.cuda_graphs else ""))
    return result, how


def _hf_continuous_batching(model, args, x) -> tuple[dict, str]:
    """Times HF's continuous batching on the same prompts: ``model.generate_batch`` (paged KV cache, attention
    switched to ``paged|sdpa`` for the call, CUDA graphs captured in its warm-up), greedy, eos disabled so every
    request makes ``new`` tokens as in the other systems. The manager persists across calls, as the engine does:
    its setup (cache allocation, warm-up captures) falls in the first, compiling call, as the engine's compile does,
    instead of costing every call seconds."""
    from transformers import GenerationConfig

    prompts = [row.tolist() for row in x]
    config = GenerationConfig(max_new_tokens=args.new, do_sample=False, eos_token_id=-1, pad_token_id=0)

    def run():
        out = model.generate_batch(prompts, generation_config=config, progress_bar=False, persistent_manager=True)
        made = sorted(len(o.generated_tokens) for o in out.values())
        if made != [args.new] * len(prompts):
            raise RuntimeError(f"generate_batch made {made} tokens per request, not {args.new}")

    try:
        result = measure(run, args.device, args.iters, args.warmup, f"decode B{x.shape[0]} hf-cb",
                         profile=args.profile, memory=args.memory)
    finally:
        model.destroy_cached_continuous_batching_manager()
    return result, ("HF continuous batching: model.generate_batch(prompts, GenerationConfig(max_new_tokens="
                    f"{args.new}, do_sample=False, eos_token_id=-1), persistent_manager=True), attention paged|"
                    f"{model.config._attn_implementation}")


def decode(args) -> dict:
    if args.paged and args.engine:
        raise SystemExit("--paged and --engine are two ways for cohere_fx to decode: pick one")
    config = config_for(args.preset, args.layers, args.model, args.attn)
    shape = Shape.of(config)
    model = build_model(config, args.device, args.dtype, path=args.model, seed=args.seed).eval()
    wbytes = weight_bytes(model)
    limits = device_limits(args.device, args.dtype)
    new, cases = args.new, []
    for batch in args.batch:
        x = _token_ids(shape.vocab, batch, args.prompt, args.device, args.seed)
        # Bytes per generated token: the weights once, plus the K/V cached so far (prefill = the first token).
        nbytes = sum(wbytes + shape.kv_bytes(batch, args.prompt + j, args.dtype.itemsize) for j in range(new))

        def bench_one(system):
            def generate():
                with torch.no_grad():
                    model.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False, **extra())

            options = backend_options(args, system) if system in BACKEND_SYSTEMS else {}
            if system in BACKEND_SYSTEMS and args.engine:
                result, how = _engine_decode(model, options, args, x)
            elif system == "hf-cb":
                result, how = _hf_continuous_batching(model, args, x)
            else:
                try:
                    extra, how = _generate_kwargs(system, model, options, args, batch)
                    result = measure(generate, args.device, args.iters, args.warmup, f"decode B{batch} {system}",
                                     profile=args.profile, memory=args.memory)
                finally:  # the compiled forward, HF's or --paged's, must not outlive this system
                    model.__dict__.pop("_compiled_call", None)
                    model.__dict__.pop("forward", None)
            result["tok_s"] = batch * new / (result["ms"] / 1e3)
            return {**result, **rates(0, nbytes, result["ms"], limits), "how": how}

        results = run_systems(args.systems, bench_one, args.device, f"decode B{batch}")
        limit = limit_ms(0, nbytes, limits)
        if limit:
            limit["tok_s"] = batch * new / (limit.pop("ms") / 1e3)
        cases.append({"name": f"B{batch}", "metric": "tok_s", "params": {"batch": batch, "bytes_per_call": nbytes},
                      "results": results, "limit": limit})
    return {"workload": "decode", "model": _model_info(args, config, model), "limits": limits,
            "params": {"batch": args.batch, "prompt": args.prompt, "new": new, "weight_bytes": wbytes,
                       "paged": args.paged, "engine": args.engine},
            "cases": cases}
