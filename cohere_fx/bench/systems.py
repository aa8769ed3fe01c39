"""The systems compared (eager HF, inductor, cohere_fx) and the two loops that run them.

``run_systems`` runs each one in isolation: it starts from torch._dynamo.reset() and ends with its objects freed,
so no system inherits another's compiled code or cached memory. ``run_interleaved`` compiles them all and then
alternates their calls, for A/B ratios on a machine whose speed drifts. In both, a failure is recorded as that
system's error and the other systems still run. Only the cohere_fx systems touch the backend (through the
torch_dynamo_backends entry point).
"""
import json
import sys
import traceback

import torch

from cohere_fx.bench.timing import free_memory, median, progress, time_call

SYSTEMS = ("eager", "inductor", "cohere_fx", "cohere_fx-ablated", "hf-cb")
# HF's own continuous batching (``model.generate_batch``: paged KV cache, ``paged|sdpa`` attention, its CUDA
# graphs): the stock-HF peer of cohere_fx.runtime.Engine, so a generation workload only.
DECODE_ONLY = ("hf-cb",)
# Compiled with backend="cohere_fx". cohere_fx-ablated is cohere_fx without the patterns named by --ablate: what
# those patterns are worth, measured in the same process as cohere_fx itself.
BACKEND_SYSTEMS = ("cohere_fx", "cohere_fx-ablated")
COMPILED = ("inductor", *BACKEND_SYSTEMS)  # the systems whose Dynamo graphs and graph breaks are counted


def parse_systems(text: str, workload: str) -> list:
    systems = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise ValueError(f"--compare: unknown system(s) {unknown}; choose from {','.join(SYSTEMS)}")
    misplaced = [s for s in systems if s in DECODE_ONLY and workload != "decode"]
    if misplaced:
        raise ValueError(f"--compare: {misplaced} run(s) generation only (the decode workload), not {workload}")
    return systems


def backend_options(args, system: str = "cohere_fx") -> dict:
    """options= for backend="cohere_fx": --no-inductor, --passes, and any --option KEY=VALUE (VALUE is JSON
    when it parses as JSON, else a string). Only what was asked for is passed; the backend owns the defaults.
    For cohere_fx-ablated, ``passes`` lacks the --ablate patterns."""
    options = {}
    if args.no_inductor:
        options["inductor"] = False
    if args.passes:
        options["passes"] = [p.strip() for p in args.passes.split(",") if p.strip()]
    for item in args.option or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--option wants KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    if system == "cohere_fx-ablated":
        from cohere_fx.passes import pass_names

        ablate = [p.strip() for p in (getattr(args, "ablate", None) or "").split(",") if p.strip()]
        unknown = sorted(set(ablate) - set(pass_names()))
        if not ablate or unknown:
            raise ValueError(f"cohere_fx-ablated needs --ablate with registered pattern names, got {ablate}")
        options["passes"] = [p for p in options.get("passes", pass_names()) if p not in ablate]
    return options


def compile_model(model, system: str, options: dict):
    if system == "eager":
        return model
    if system == "inductor":
        return torch.compile(model)
    assert system in BACKEND_SYSTEMS, system
    return torch.compile(model, backend="cohere_fx", options=options or None)


def describe(system: str, options: dict) -> str:
    """How the system was built, as the record states it."""
    if system in BACKEND_SYSTEMS:
        return f"torch.compile(model, backend='cohere_fx', options={options!r})"
    return {"eager": "HF eager (no compile)", "inductor": "torch.compile(model)"}[system]


def _failed(e: Exception) -> dict:
    traceback.print_exc(file=sys.stderr)
    return {"error": f"{type(e).__name__}: {e}"[:2000]}


def _report(label: str, system: str, result: dict) -> None:
    print(f"[{label}] {system}: " + (f"error: {result['error'][:200]}" if "error" in result else
                                     f"{result['ms']:.3f} ms"), file=sys.stderr, flush=True)


def run_systems(systems, bench_one, device: torch.device, label: str, compiled=COMPILED) -> dict:
    """{system: bench_one(system)} or {system: {"error": ...}} when it raised. The ``compiled`` systems also get
    the number of graphs Dynamo compiled and of graph breaks (a decode that never reached the backend shows 0)."""
    from torch._dynamo.utils import counters

    results = {}
    for system in systems:
        torch._dynamo.reset()
        counters.clear()
        try:
            results[system] = bench_one(system)
            if system in compiled:
                results[system]["graphs"] = counters["stats"]["unique_graphs"]
                results[system]["graph_breaks"] = sum(counters["graph_break"].values())
        except Exception as e:  # noqa: BLE001 - any failure of one system is that system's result
            results[system] = _failed(e)
        torch._dynamo.reset()
        free_memory(device)
        _report(label, system, results[system])
    return results


def run_interleaved(systems, make_step, device: torch.device, label: str, iters: int, warmup: int) -> dict:
    """{system: result} as ``measure`` gives it, with the systems' calls alternated: ``make_step(system)`` builds
    each system's call (compiled, not yet run); each is called once (its compile), then ``warmup`` rounds and
    ``iters`` timed rounds call every system once, in an order reversed every round.

    Why: on the device machines a step's time drifts by several percent within seconds (an H100 QLoRA step under
    CUDA graphs went from 91.7 to 96.5 ms over its 20 timed calls), so systems timed one after another are timed
    on different machines. Alternated, each round times every system within a few hundred milliseconds; the
    ratio of their medians is the A/B. The price: all systems live at once, and a system's peak_gib counts what
    the others keep between their calls (shared parameters, compiled constants, CUDA graph pools)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    steps, results = {}, {}
    for system in systems:
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        try:
            step = make_step(system)
            first_call_s = time_call(step, device) / 1e3
            steps[system] = step
            results[system] = {"first_call_s": first_call_s, "ms_all": [], "peak_gib": 0.0,
                               "timing": "eager launches, interleaved with " + ", ".join(s for s in systems
                                                                                        if s != system)}
            if system in COMPILED:
                results[system]["graphs"] = counters["stats"]["unique_graphs"] - graphs
                results[system]["graph_breaks"] = sum(counters["graph_break"].values()) - breaks
        except Exception as e:  # noqa: BLE001 - any failure of one system is that system's result
            results[system] = _failed(e)
        progress(f"{label}: {system} compiled", len(results), len(systems))
    for i in range(warmup + iters):
        for system in list(steps)[::-1 if i % 2 else 1]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            graphs = counters["stats"]["unique_graphs"]
            try:
                ms = time_call(steps[system], device)
            except Exception as e:  # noqa: BLE001
                results[system] = _failed(e)
                del steps[system]
                continue
            if system in COMPILED:  # a recompile here (another system's guards failing this one's) shows up
                results[system]["graphs"] += counters["stats"]["unique_graphs"] - graphs
            if i >= warmup:
                results[system]["ms_all"].append(ms)
            if device.type == "cuda":
                results[system]["peak_gib"] = max(results[system]["peak_gib"],
                                                  torch.cuda.max_memory_allocated(device) / 2 ** 30)
        progress(f"{label}: round {i + 1}" + (" (warm-up)" if i < warmup else ""), i + 1, warmup + iters)
    for system in systems:
        result = results[system]
        if "error" not in result:
            result["ms"] = median(result["ms_all"])
            if device.type != "cuda":
                del result["peak_gib"]
        _report(label, system, result)
    steps.clear()
    torch._dynamo.reset()
    free_memory(device)
    return results
