"""Benchmark CLI: ``python -m cohere_fx.bench {train,prefill,decode,kernels,all,report}``.

Why one CLI instead of scripts: every number on the scoreboard (BENCHMARKS.md) must come from the same
workloads as the anchors (../shared/anchors), timed the same way, with eager HF, inductor and cohere_fx run side by
side in one process on one device, and recorded with the device, the versions and the exact command.
"""
