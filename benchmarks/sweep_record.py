"""The JSON record a GPU sweep script writes: its rows beside the device, the versions and the date, in one
``<name>-sweep-<stamp>.json`` per run (BENCHMARKS.md's header lists these records)."""
import datetime
import json
import os

import torch
import triton


def write_sweep_record(out_dir: str, name: str, rows: list) -> str:
    """Writes ``{"env": ..., "rows": rows}`` for ``benchmarks/sweep_<name>.py``; returns the file's path."""
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": f"python benchmarks/sweep_{name}.py"}
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    path = os.path.join(out_dir, f"{name}-sweep-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    return path
