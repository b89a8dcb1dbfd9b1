"""``make gpu-check`` / ``python -m cascadelab.jobs.gpu_check``: the GPU checks in one run, one table.

On a machine with a CUDA device: the CUDA-parametrised tests, ``bench operators`` and ``bench objectives``
on the GPU, and ``bench train`` with ``use_gpu`` on, each as a subprocess with its own time limit (the
whole run is sized for under 10 minutes on one GPU). Without a CUDA device it says so and exits 0.
Exit status 1 when a check fails; the table says which.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Check:
    name: str
    argv: list[str]
    timeout_s: int
    result_json: str | None = None  # the bench's JSON under --out, read for the table's figures


def checks(out: Path) -> list[Check]:
    py = sys.executable
    bench = [py, "-m", "cascadelab.jobs.bench", "--out", str(out), "--no-mlflow"]
    return [
        Check("cuda tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
                             "tests/operators", "tests/cascade"], 180),
        Check("bench operators", [*bench, "operators", "--set", "device=cuda", "--set", "batch_sizes=[1,1024]",
                                  "--set", "max_seconds_per_case=1.0"], 180, "operators.json"),
        Check("bench objectives", [*bench, "objectives", "--set", "device=cuda", "--set", "batch=1024"], 120,
              "objectives.json"),
        Check("bench train", [*bench, "train", "--set", "use_gpu=true", "--set", "two_workers=false"], 180,
              "train.json"),
    ]


def summarize(check: Check, out: Path, stdout: str) -> str:
    """One line of figures for the table: the pytest summary, or the bench's headline numbers."""
    if check.result_json is None:
        found = re.findall(r"\d+ (?:passed|failed|skipped|error|errors|deselected)", stdout)
        return ", ".join(found) or "no pytest summary"
    path = out / check.result_json
    if not path.is_file():
        return f"{path.name} not written"
    data = json.loads(path.read_text())
    if check.result_json == "operators.json":
        head = data.get("headline", {})
        keys = [f"{case}_official_over_dftopk" for case in ("b1024_n1000", "b1024_n10000", "b1_n1000")]
        return ", ".join(f"{k.removesuffix('_official_over_dftopk')} official/dftopk {head[k]:.2f}"
                         for k in keys if k in head)
    if check.result_json == "train.json":
        parts = [f"{name} {data[name]['samples_per_s']:.0f} samples/s" for name in ("bare", "ray_1_worker")
                 if isinstance(data.get(name), dict) and "samples_per_s" in data[name]]
        return ", ".join(parts) or "no samples/s"
    return f"{len(data.get('results', data))} results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_results/gpu", help="where the benches write their JSON and plots")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible to torch (torch.cuda.is_available() is False); nothing to check")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"gpu-check on {torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})",
          flush=True)
    rows, failed = [], False
    for check in checks(out):
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(check.argv, capture_output=True, text=True, timeout=check.timeout_s)
            status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            stdout = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            status, stdout = f"FAILED (over {check.timeout_s} s)", (exc.stdout or b"").decode(errors="replace")
        (out / f"{check.name.replace(' ', '_')}.log").write_text(stdout)
        failed |= status != "ok"
        rows.append((check.name, status, f"{time.perf_counter() - t0:.0f}", summarize(check, out, stdout)))
        print(f"  {check.name}: {status}", flush=True)
    widths = [max(len(r[i]) for r in [("check", "status", "s", "figures"), *rows]) for i in range(4)]
    for row in [("check", "status", "s", "figures"), *rows]:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
