"""Timing, peak memory, device limits and run metadata shared by every workload.

Timed as the anchors do: CUDA events around each call, warm-up calls first, the median (``sorted[n // 2]``) of
the timed calls; ``time.perf_counter`` on the CPU. The first call is timed apart, with a host clock: for a
compiled system it holds the compile, which is reported as such and kept out of the steady-state numbers.
"""
import datetime
import gc
import os
import platform
import subprocess
import sys
import time

import torch

# Physical limits per device (a substring of torch.cuda.get_device_name), for bf16 runs: (bytes/s, FLOP/s, source).
# Measured values, not spec sheets: the percentage should say how close a run is to what the chip really does.
DEVICE_LIMITS = {
    "H100 80GB HBM3": (3.0e12, 800e12, "measured on an H100 80GB HBM3: device copy 3.0 TB/s, bf16 GEMM 800 TFLOP/s"),
    # the device tool's record of this workplace's H200s (KINDS.md, 2026-10-28 and 11-04): 1 GiB-scale device
    # copies at ~4.3 TB/s (read + write), 8192^3 bf16 GEMMs at 769-798 TFLOP/s on random data
    "NVIDIA H200": (4.3e12, 788e12, "measured on this workplace's H200s: device copy 4.3 TB/s, bf16 GEMM "
                                    "788 TFLOP/s"),
}


def _measure_limits(device: torch.device, dtype: torch.dtype) -> tuple[float, float, str]:
    """Fallback for devices not in DEVICE_LIMITS: a 1 GiB copy and an 8192^3 GEMM, best of 5 (about a second)."""
    def best_ms(fn):
        fn()
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return min(times)

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() / (best_ms(lambda: dst.copy_(src)) / 1e3)  # read + write
    del src, dst
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    flops = 2 * n ** 3 / (best_ms(lambda: a @ b) / 1e3)
    return bandwidth, flops, f"measured at run start: 1 GiB device copy, {n}^3 {dtype} GEMM"


def device_limits(device: torch.device, dtype: torch.dtype) -> dict:
    """{"bytes_per_s", "flops", "source"} for a CUDA device; {} on the CPU (no percentages there)."""
    if device.type != "cuda":
        return {}
    name = torch.cuda.get_device_name(device)
    hit = next((v for k, v in DEVICE_LIMITS.items() if k in name), None)
    bandwidth, flops, source = hit if hit and dtype == torch.bfloat16 else _measure_limits(device, dtype)
    return {"bytes_per_s": bandwidth, "flops": flops, "source": source}


def _version(module: str):
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: the record says so instead of failing the run
        return None


def _git_revision():
    """The tree that ran: COHERE_FX_GIT where set (the device machine's copy of the checkout carries a stale .git,
    so its ``git describe`` names an old commit: give it the checkout's ``git rev-parse --short HEAD``)."""
    if os.environ.get("COHERE_FX_GIT"):
        return os.environ["COHERE_FX_GIT"]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """What a reader needs to reproduce or discount a number."""
    cpu = f"cpu ({platform.processor() or platform.machine()})"
    return {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "bitsandbytes": _version("bitsandbytes") if "bitsandbytes" in sys.modules else None,
        "python": platform.python_version(),
        "git": _git_revision(),
        # the settings a run was made under (e.g. COHERE_FX_PDL=0): two records of one tree can differ by them
        "knobs": {k: v for k, v in sorted(os.environ.items()) if k.startswith("COHERE_FX_") and k != "COHERE_FX_GIT"},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def progress(label: str, done: int, total: int) -> None:
    """A plain-text progress bar on stderr (redrawn in place on a terminal, one line per call in a log)."""
    width = 20
    fill = width * done // max(total, 1)
    line = f"[{'#' * fill}{'.' * (width - fill)}] {done}/{total} {label}"
    if sys.stderr.isatty():
        sys.stderr.write("\r" + line + ("\n" if done >= total else ""))
    else:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _graphed(fn, device: torch.device):
    """``fn`` captured in a CUDA graph (replayed by the returned callable), or None if it cannot be captured."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        return None
    return graph.replay


_GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm")


def kernel_profile(fn, device: torch.device, top: int = 40) -> dict:
    """Where one call's GPU time goes: ``profile_summary`` of a profiled call."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        begin = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - begin) * 1e3
    return profile_summary(prof.events(), wall_ms, top)


def profile_summary(events, wall_ms: float, top: int = 12) -> dict:
    """The ``top`` kernels by total device time, and how much of the call's wall time the GPU was busy at all
    (kernel time / wall time). A busy share well under 100 % means the host (Python, launches, syncs) sets the
    pace, not the kernels; the kernel list says which kernels to fix otherwise. ``gemms``: device time of the
    matrix products by op and input shapes, so that two systems' GEMMs can be compared shape by shape (a kernel
    name alone mixes shapes, and cuBLAS picks one name for many)."""
    from torch.autograd import DeviceType

    kernels: dict = {}
    gemms: dict = {}
    for event in events:
        annotation = getattr(event, "is_user_annotation", False) or event.name.startswith("## ")
        if event.device_type == DeviceType.CUDA and not annotation:
            # (annotations such as inductor's "## Call CompiledFxGraph ##" span kernels: not kernels themselves)
            key, ms = event.name, event.time_range.elapsed_us() / 1e3
            table = kernels
        elif event.name in _GEMM_OPS:
            key, ms = f"{event.name} {event.input_shapes}", event.device_time_total / 1e3
            table = gemms
        else:
            continue
        total, count = table.get(key, (0.0, 0))
        table[key] = (total + ms, count + 1)
    busy_ms = sum(ms for ms, _ in kernels.values())

    def ranked(table, n=None):
        return sorted(table.items(), key=lambda kv: -kv[1][0])[:n]

    return {"wall_ms": wall_ms, "gpu_busy_ms": busy_ms, "gpu_busy_pct": 100 * busy_ms / wall_ms,
            "top": [{"kernel": name[:160], "ms": ms, "calls": count} for name, (ms, count) in ranked(kernels, top)],
            "gemms": [{"op": key, "ms": ms, "calls": count} for key, (ms, count) in ranked(gemms)]}


def compile_profile() -> dict:
    """Where the first (compiling) call went: torch's compile phases (seconds, summed over graphs) and how many
    variants Triton compiled of each cohere_fx kernel (a kernel recompiled per call site would show here)."""
    import triton
    from torch._dynamo.utils import compile_times

    names, values = compile_times(repr="csv", aggregate=True)
    phases = {n: float(v) for n, v in zip(names, values) if float(v) >= 0.5}
    kernels = [(name, fn) for module_name, module in list(sys.modules.items())
               if module_name.startswith("cohere_fx.kernels.")
               for name, fn in vars(module).items() if isinstance(fn, triton.runtime.JITFunction)]
    variants = {name: count for name, fn in kernels
                if (count := sum(len(cache[0]) for cache in getattr(fn, "device_caches", {}).values()))}
    return {"phases_s": dict(sorted(phases.items(), key=lambda kv: -kv[1])), "triton_variants": variants}


def peak_live(events: list, top: int = 12) -> dict:
    """Replays an allocator trace (``torch.cuda.memory._snapshot()["device_traces"]`` entries: action, addr, size,
    frames) and returns the bytes live at its peak above what was live before it started, grouped by where they
    were allocated: the biggest ``top`` groups, each with its bytes and count."""
    live, total, peak, at_peak = {}, 0, 0, {}
    for event in events:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
        elif event["action"] in ("free_requested", "free_completed") and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
        if total > peak:
            peak, at_peak = total, dict(live)
    groups: dict = {}
    for event in at_peak.values():
        where = _allocation_site(event.get("frames", []))
        size, count = groups.get(where, (0, 0))
        groups[where] = (size + event["size"], count + 1)
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return {"peak_gib": peak / 2 ** 30,
            "top": [{"site": where, "gib": size / 2 ** 30, "count": count} for where, (size, count) in ranked]}


def _allocation_site(frames: list) -> str:
    """The innermost frame in this project, transformers, peft or inductor's generated code (whose source line
    names the buffer and its shape), else the innermost frame."""
    import linecache

    for frame in frames:
        name = frame.get("filename", "")
        if any(key in name for key in ("cohere_fx", "transformers", "peft", "torchinductor")):
            line = linecache.getline(name, frame.get("line", 0)).strip()
            return f"{name.rsplit('/', 1)[-1]}:{frame.get('line')} {line or frame.get('name', '')}"[:160]
    frame = frames[0] if frames else {}
    return f"{frame.get('filename', '?').rsplit('/', 1)[-1]}:{frame.get('line')} {frame.get('name', '')}"


def memory_profile(fn, device: torch.device) -> dict:
    """``peak_live`` of one call of ``fn`` (the allocator records its history meanwhile), plus what was already
    allocated before the call (weights, saved state)."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, device=device)
    try:
        fn()
        torch.cuda.synchronize(device)
        snapshot = torch.cuda.memory._snapshot(device)
    finally:
        torch.cuda.memory._record_memory_history(enabled=None, device=device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"before_gib": before / 2 ** 30, **peak_live(snapshot["device_traces"][index])}


def format_memory(label: str, mem: dict) -> str:
    lines = [f"{label}: {mem['before_gib']:.2f} GiB before the call + {mem['peak_gib']:.2f} GiB at its peak"]
    lines += [f"  {m['gib']:7.3f} GiB {m['count']:5d}x  {m['site']}" for m in mem["top"]]
    return "\n".join(lines)


def format_profile(label: str, prof: dict) -> str:
    lines = [f"{label}: wall {prof['wall_ms']:.2f} ms, GPU busy {prof['gpu_busy_ms']:.2f} ms "
             f"({prof['gpu_busy_pct']:.0f} %)"]
    lines += [f"  {k['ms']:9.3f} ms {k['calls']:6d}x  {k['kernel'][:110]}" for k in prof["top"][:12]]
    lines += [f"  GEMM {g['ms']:9.3f} ms {g['calls']:6d}x  {g['op'][:110]}" for g in prof.get("gemms", [])[:12]]
    if "compile" in prof:
        lines.append(f"  compile phases (s): {prof['compile']['phases_s']}")
        lines.append(f"  triton variants: {prof['compile']['triton_variants']}")
    return "\n".join(lines)


def median(times: list) -> float:
    """The reported time of repeated calls: the middle one (the upper of the two middle ones for an even count)."""
    return sorted(times)[len(times) // 2]


def time_call(fn, device: torch.device) -> float:
    """Milliseconds of one ``fn()``: between CUDA events on CUDA, by the host's clock elsewhere."""
    if device.type != "cuda":
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end)


def measure(fn, device: torch.device, iters: int, warmup: int, label: str, cuda_graph: bool = False,
            profile: bool = False, memory: bool = False) -> dict:
    """Times ``fn()``: the first call apart (compile), then ``warmup`` calls, then the median of ``iters`` calls.

    ``cuda_graph``: time replays of ``fn`` captured in a CUDA graph, so that what is measured is the GPU work and
    not Python's launch overhead (used for kernels of tens of microseconds; every system is timed the same way).
    Returns ms (median), ms_all, first_call_s, timing ("cuda graph" or "eager launches") and, on CUDA, peak_gib:
    torch.cuda.max_memory_allocated over the warm-up and timed calls (the compile's allocations not counted);
    with ``profile`` on CUDA, also ``profile``: ``kernel_profile`` of one more call (printed to stderr too); with
    ``memory``, ``memory``: ``memory_profile`` of one more call (what is live at its peak, by allocation site).
    """
    cuda = device.type == "cuda"
    total = 1 + warmup + iters
    progress(f"{label}: first call", 0, total)
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    first_call_s = time.perf_counter() - start
    progress(f"{label}: first call {first_call_s:.1f} s", 1, total)
    for i in range(warmup):
        fn()
        progress(f"{label}: warm-up", 2 + i, total)
    timing = "eager launches"
    if cuda and cuda_graph:
        replay = _graphed(fn, device)
        if replay is not None:
            fn, timing = replay, "cuda graph"
    times = []
    for i in range(iters):
        times.append(time_call(fn, device))
        progress(f"{label}: {times[-1]:.2f} ms", 1 + warmup + 1 + i, total)
    out = {"ms": median(times), "ms_all": times, "first_call_s": first_call_s, "timing": timing}
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        if profile:
            out["profile"] = {**kernel_profile(fn, device), "compile": compile_profile()}
            print(format_profile(label, out["profile"]), file=sys.stderr, flush=True)
        if memory:
            out["memory"] = memory_profile(fn, device)
            print(format_memory(label, out["memory"]), file=sys.stderr, flush=True)
    return out


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
