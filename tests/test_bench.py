"""The benchmark CLI end to end on the CPU (--smoke), its FLOP/byte accounting, and the report it renders."""
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from cohere_fx.bench import report
from cohere_fx.bench.__main__ import main
from cohere_fx.bench.models import Shape, attention_pairs, config_for

SMOKE = ["--smoke", "--compare", "eager,cohere_fx", "--no-inductor"]
RUNS = {"train-full": ["train"], "prefill": ["prefill"], "decode": ["decode"], "kernels": ["kernels"]}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    for argv in RUNS.values():
        assert main(argv + SMOKE + ["--out", str(out)]) == 0
    records = {r["workload"]: r for r in (json.loads(p.read_text()) for p in sorted(out.glob("*.json")))}
    return out, records


def test_records(results):
    _, records = results
    assert set(records) == set(RUNS)
    backend = importlib.util.find_spec("cohere_fx.backend") is not None
    for workload, record in records.items():
        assert record["schema"] == 1 and record["smoke"] is True
        assert record["command"].startswith(f"python -m cohere_fx.bench {RUNS[workload][0]} --smoke")
        assert record["systems"] == ["eager", "cohere_fx"]
        assert record["backend_options"] == {"inductor": False}
        assert record["device"] == "cpu" and record["dtype"] == "float32"
        assert (record["iters"], record["warmup"]) == (1, 0)
        for key in ("device_name", "torch", "triton", "transformers", "date"):
            assert record["env"][key]
        assert record["model"]["preset"] == "tiny" and record["model"]["vocab"] == 256
        assert record["cases"]
        for case in record["cases"]:
            eager = case["results"]["eager"]
            assert eager[case["metric"]] > 0 and len(eager["ms_all"]) == 1 and eager["first_call_s"] > 0
            fx = case["results"]["cohere_fx"]
            assert fx.get("error") or fx[case["metric"]] > 0
            if backend:  # the backend and every op exist: nothing may fail
                assert "error" not in fx, (workload, case["name"], fx.get("error"))
                assert workload == "kernels" or fx["graphs"] >= 1  # the model went through the backend


def test_workload_numbers(results):
    _, records = results
    train = records["train-full"]
    assert train["params"] == {"mode": "full", "batch": 2, "seq": 16, "lora_r": None,
                               "flops_per_step": Shape.of(config_for("tiny")).train_flops(2, 16, full=True)}
    assert train["cases"][0]["results"]["eager"]["tflops"] > 0
    decode = records["decode"]
    assert decode["params"]["new"] == 4 and decode["cases"][0]["name"] == "B1"
    eager = decode["cases"][0]["results"]["eager"]
    assert eager["tok_s"] == pytest.approx(4 / (eager["ms"] / 1e3))
    kernels = records["kernels"]
    names = [c["name"] for c in kernels["cases"]]
    assert names == [f"{k} {d}" for k in ("layer_norm", "qk_norm_rope", "rope", "scaled_cross_entropy", "swiglu",
                                          "embedding") for d in ("fwd", "fwd+bwd")] + [
        "parallel_residual fwd", "paged_attention fwd", "decode_linear fwd", "lora fwd",
        "lora fwd+bwd"]
    for case in kernels["cases"]:
        fx = case["results"]["cohere_fx"]
        # fp32: the op computes HF's math; lora's base is bf16 even in an fp32 run (one rounding)
        assert "error" in fx or fx["rel_err"] < (2 ** -7 if case["name"].startswith("lora") else 1e-5)
    paged = next(case for case in kernels["cases"] if case["name"] == "paged_attention fwd")
    flex = paged["results"]["flex-paged"]  # torch's paged decode on the same step
    assert "error" not in flex and flex["rel_err"] < 1e-5 and flex["ms"] > 0


def test_report(results, tmp_path):
    out, records = results
    md = tmp_path / "BENCHMARKS.md"
    assert main(["report", "--results", str(out), "--output", str(md), "--include-smoke"]) == 0
    text = md.read_text()
    assert text.startswith("# Benchmarks") and "do not edit by hand" in text
    for workload in RUNS:
        assert f"## {workload}\n" in text
    assert "| system | ms | × eager |" in text and "| case | system | ms | × eager |" in text
    assert "`python -m cohere_fx.bench decode --smoke" in text
    # --smoke records are not measurements: left out unless asked for.
    assert "No records yet" in report.render_benchmarks(out, md)


def test_report_newest_wins_and_errors(tmp_path):
    def record(date, ms, error=None):
        fx = {"error": error} if error else {"ms": ms}
        return {"schema": 1, "workload": "prefill", "command": "python -m cohere_fx.bench prefill", "dtype": "bfloat16",
                "env": {"device_name": "GPU", "torch": "2.11", "date": date}, "limits": {},
                "model": {"preset": "r7b-8L", "layers": 8, "params": 2.79e9}, "params": {"batch": 4, "seq": 2048},
                "cases": [{"name": "B4xS2048", "metric": "ms",
                           "results": {"eager": {"ms": 100.0}, "inductor": {"ms": 80.0}, "cohere_fx": fx}}]}

    (tmp_path / "a.json").write_text(json.dumps(record("2026-01-01T00:00:00+00:00", 0, error="boom | x\ny")))
    (tmp_path / "b.json").write_text(json.dumps(record("2026-02-01T00:00:00+00:00", 50.0)))
    text = report.render_benchmarks(tmp_path, tmp_path / "BENCHMARKS.md")
    assert text.count("### prefill") == 1
    assert "| cohere_fx | 50 | 1.60× | 2.00× |" in text
    old = report.render_record(record("2026-01-01T00:00:00+00:00", 0, error="boom | x\ny"))
    assert "error: boom \\| x y" in old

    # a run with a setting, or of a modified tree, is a section of its own beside the newest plain one
    knob = record("2026-03-01T00:00:00+00:00", 40.0)
    knob["env"]["knobs"] = {"COHERE_FX_PDL": "1"}
    tree = record("2026-04-01T00:00:00+00:00", 45.0)
    tree["env"]["git"] = "abc1234+grouped"
    (tmp_path / "c.json").write_text(json.dumps(knob))
    (tmp_path / "d.json").write_text(json.dumps(tree))
    text = report.render_benchmarks(tmp_path, tmp_path / "BENCHMARKS.md")
    assert text.count("### prefill") == 3
    assert all(f"| cohere_fx | {ms} |" in text for ms in (50, 40, 45))


def test_decode_speedup_is_tok_s_ratio():
    case = {"metric": "tok_s", "results": {"eager": {"tok_s": 50.0}, "cohere_fx": {"tok_s": 150.0}}}
    assert report._speedups(case)["cohere_fx"]["x_eager"] == pytest.approx(3.0)


def test_flop_and_byte_counts():
    shape = Shape.of(config_for("r7b-8L"))
    # The anchors' 2.79 B parameters, less the LayerNorm weights (no matmul FLOPs).
    assert 2_793_484_288 - shape.matmul_params == 8 * (4096 + 32 * 128 + 8 * 128) + 4096
    tokens = 2 * 2048
    attention = 8 * 4 * 2 * 32 * 128 * (2048 * 2049 // 2)
    assert shape.attention_flops(2, 2048) == attention
    assert shape.train_flops(2, 2048, full=True) == 6 * shape.matmul_params * tokens + 3 * attention
    assert shape.train_flops(2, 2048, full=False) == 4 * shape.matmul_params * tokens + 3 * attention
    # Cohere2: sliding layers (3 of 4) see at most the window.
    assert attention_pairs(5, 0, window=2) == 1 + 2 + 2 + 2 + 2
    assert attention_pairs(1, 10, window=4) == 4 and attention_pairs(3, 2) == 3 + 4 + 5
    r7b = Shape.of(config_for("command-r7b"))
    assert r7b.windows.count(None) == 8 and r7b.kv_bytes(1, 8192, 2) == 2 * 8 * 128 * 2 * (24 * 4096 + 8 * 8192)


def test_decode_paged_hook(tmp_path):
    assert main(["decode", *SMOKE, "--paged", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    fx = json.loads(path.read_text())["cases"][0]["results"]["cohere_fx"]
    if importlib.util.find_spec("cohere_fx.runtime") is None:
        assert "cohere_fx.runtime" in fx["error"]
    else:
        assert "error" not in fx and "PagedKVCache" in fx["how"] and fx["graphs"] >= 1


def test_decode_engine_hook(tmp_path):
    assert main(["decode", *SMOKE, "--engine", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    record = json.loads(path.read_text())
    assert record["params"]["engine"] is True
    fx = record["cases"][0]["results"]["cohere_fx"]
    assert "error" not in fx and "Engine" in fx["how"] and fx["graphs"] >= 1
    # tok/s: the whole call, prefill included; decode tok/s: the 3 decode steps alone
    assert fx["tok_s"] == pytest.approx(4 / (fx["ms"] / 1e3)) and fx["decode_tok_s"] > 0
    assert "decode tok/s" in report.render_record(record)
    with pytest.raises(SystemExit, match="pick one"):
        main(["decode", *SMOKE, "--engine", "--paged", "--out", str(tmp_path)])


def test_ablated_system_leaves_out_the_named_patterns(tmp_path):
    """cohere_fx-ablated runs in the same process as cohere_fx with --ablate's patterns left out of its passes (the
    engine decode here): what those patterns are worth, measured side by side."""
    assert main(["decode", "--smoke", "--engine", "--compare", "cohere_fx,cohere_fx-ablated", "--ablate",
                 "decode_linear,rope_kv_write", "--no-inductor", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    results = json.loads(path.read_text())["cases"][0]["results"]
    assert "error" not in results["cohere_fx"] and "error" not in results["cohere_fx-ablated"]
    assert "'passes'" not in results["cohere_fx"]["how"]
    ablated = results["cohere_fx-ablated"]["how"]
    assert "'paged_attention'" in ablated and "decode_linear" not in ablated and "rope_kv_write" not in ablated
    with pytest.raises(ValueError, match="--ablate"):
        main(["train", "--smoke", "--compare", "cohere_fx-ablated", "--ablate", "no_such_pattern", "--out",
              str(tmp_path)])


def test_decode_hf_continuous_batching(tmp_path):
    """hf-cb, HF's own continuous batching, is a decode system: it runs (every request makes --new tokens, or the
    run raises) and is refused for other workloads."""
    assert main(["decode", "--smoke", "--compare", "hf-cb", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    result = json.loads(path.read_text())["cases"][0]["results"]["hf-cb"]
    assert "error" not in result and "generate_batch" in result["how"] and result["tok_s"] > 0
    with pytest.raises(ValueError, match="generation only"):
        main(["train", "--smoke", "--compare", "hf-cb", "--out", str(tmp_path)])


def test_kernel_references_trace_whole():
    """inductor's side of `kernels` must compile the HF math as one graph, or the comparison is unfair to it."""
    from torch._dynamo.utils import counters

    from cohere_fx.bench.kernels import KERNELS, _case

    config = config_for("tiny")
    for name in KERNELS:
        inputs, _, reference, _ = _case(name, Shape.of(config), config, 1, 8, torch.device("cpu"), torch.float32)
        torch._dynamo.reset()
        counters.clear()
        torch.compile(reference, backend="eager")(*inputs)
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], name
    torch._dynamo.reset()


def test_qlora_without_bitsandbytes_is_a_clear_error(tmp_path):
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed")
    with pytest.raises(SystemExit, match="bitsandbytes"):
        main(["train", "--mode", "qlora", *SMOKE, "--out", str(tmp_path)])


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "cohere_fx.bench", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "train" in out.stdout and "kernels" in out.stdout


@pytest.mark.gpu
def test_gpu_smoke_all_systems(tmp_path):
    assert main(["prefill", "--smoke", "--device", "cuda", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    record = json.loads(path.read_text())
    assert record["dtype"] == "bfloat16" and record["limits"]["bytes_per_s"] > 0
    for system, result in record["cases"][0]["results"].items():
        assert "error" not in result, (system, result["error"])
        assert result["peak_gib"] > 0 and result["pct_flops"] > 0


def test_peak_live_replays_the_allocator_trace():
    """--memory's accounting: the live set at the highest point of the trace, grouped by allocation site; frees
    of blocks allocated before the trace began are ignored."""
    from cohere_fx.bench.timing import peak_live

    def alloc(addr, size, site):
        return {"action": "alloc", "addr": addr, "size": size, "frames": [{"filename": site, "line": 1}]}

    def free(addr):
        return {"action": "free_requested", "addr": addr, "size": 0}

    gib = 2 ** 30
    events = [free(99), alloc(1, gib, "a.py"), alloc(2, 2 * gib, "b.py"), alloc(3, gib, "a.py"), free(2),
              alloc(4, 3 * gib, "c.py"), free(1), free(3), free(4)]
    result = peak_live(events)
    assert result["peak_gib"] == 5  # a.py 1 + 1 and c.py 3 (b.py was freed before c.py came)
    assert [(m["site"].split(":")[0], m["gib"], m["count"]) for m in result["top"]] == [("c.py", 3, 1), ("a.py", 2, 2)]


def test_profile_summary_groups_gemms_by_shape_and_formats():
    """--profile's accounting on a CPU profile: matrix products grouped by op and input shapes (no CUDA kernels
    on the CPU, so the kernel list is empty), and the printed table holds the GEMM lines."""
    from torch.profiler import ProfilerActivity, profile

    from cohere_fx.bench.timing import format_profile, profile_summary

    a, b = torch.randn(64, 32), torch.randn(32, 16)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3):
            torch.mm(a, b)
        torch.mm(b.t(), b)
    summary = profile_summary(prof.events(), wall_ms=2.0)
    assert summary["top"] == [] and summary["gpu_busy_ms"] == 0
    calls = {g["op"]: g["calls"] for g in summary["gemms"]}
    assert calls == {"aten::mm [[64, 32], [32, 16]]": 3, "aten::mm [[16, 32], [32, 16]]": 1}
    text = format_profile("probe", summary)
    assert text.startswith("probe: wall 2.00 ms") and text.count("GEMM") == 2


def test_interleaved_train_alternates_compiled_systems(tmp_path):
    """--interleave: every system compiled once and then called in alternation. Both backend systems keep their
    one graph (no recompiles from alternating two compiled wrappers of one model), each has --iters timings."""
    assert main(["train", "--smoke", "--interleave", "--compare", "eager,cohere_fx,cohere_fx-ablated", "--ablate",
                 "layer_norm", "--no-inductor", "--iters", "3", "--warmup", "1", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    results = json.loads(path.read_text())["cases"][0]["results"]
    for system in ("eager", "cohere_fx", "cohere_fx-ablated"):
        assert "error" not in results[system] and len(results[system]["ms_all"]) == 3, results[system]
        assert "interleaved" in results[system]["timing"]
    assert results["cohere_fx"]["graphs"] == results["cohere_fx-ablated"]["graphs"] == 1
    assert "layer_norm" not in results["cohere_fx-ablated"]["how"]
    with pytest.raises(SystemExit, match="--interleave"):
        main(["train", "--smoke", "--interleave", "--profile", "--out", str(tmp_path)])
