"""Training throughput benchmark (issue 3), on CPU (gloo) or GPUs.

In one run, on the same converted model, data and global batch:
  1. tokens/s with 1 process (EP=1) vs 2 processes (EP=2): the ratio EP2 / EP1;
  2. the cost of the PA prior: step time with --prior frozen and --prior self vs --prior none
     (all at 2 processes, EP=2).
Throughput is the median of the per-step tokens/s that train logs, first step excluded.

    python bench/bench_train.py [--model MOE_DIR] [--steps 6] [--seq-len 256] [--global-batch-size 8]

Without --model it converts SmolLM2-135M (E=4, k=2) into the cache first.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="converted FactorLLM folder (default: SmolLM2, E=4 k=2)")
    p.add_argument("--data", type=Path, default=None, help="training text (default: KJV)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=2)
    return p.parse_args()


def run_train(model: Path, data: Path, nproc: int, ep: int, prior: str, args, work: Path) -> float:
    out = work / f"n{nproc}-ep{ep}-{prior}"
    shutil.rmtree(out, ignore_errors=True)
    micro = args.micro_batch_size
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29900 + os.getpid() % 50), "-m", "factorllm_ds", "train", "--model", str(model), "--data", str(data),
           "--out", str(out), "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--micro-batch-size",
           str(micro), "--global-batch-size", str(args.global_batch_size), "--ep-size", str(ep), "--prior", prior,
           "--warmup-steps", "0", "--eval-fraction", "0", "--no-progress"]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"train failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    speeds = [float(r["tokens_per_s"]) for r in rows[1:]]
    return statistics.median(speeds)


def main() -> None:
    args = parse()
    from factorllm_ds import assets
    from factorllm_ds.config import ConvertConfig
    from factorllm_ds.convert import convert
    from factorllm_ds.layout import MANIFEST_FILE

    data = args.data or assets.kjv_text()
    model = args.model
    if model is None:
        model = assets.cache_dir() / "bench_train_moe"
        if not (model / MANIFEST_FILE).is_file():
            convert(ConvertConfig(model=assets.smollm2_model_dir(), out=model, num_experts=4, top_k=2,
                                  overwrite=True), progress=False)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        ep1 = run_train(model, data, 1, 1, "frozen", args, work)
        results = {prior: run_train(model, data, 2, 2, prior, args, work) for prior in ("none", "self", "frozen")}
    ep2 = results["frozen"]
    print(f"model {model}, seq_len {args.seq_len}, global batch {args.global_batch_size} sequences, "
          f"{args.steps} steps (median tokens/s of steps 2..{args.steps})")
    print(f"tokens/s, 1 process EP=1 (prior frozen):      {ep1:10.1f}")
    print(f"tokens/s, 2 processes EP=2 (prior frozen):    {ep2:10.1f}")
    print(f"  ratio EP2 / EP1:                           {ep2 / ep1:10.3f}")
    for prior in ("none", "self", "frozen"):
        print(f"tokens/s, 2 processes EP=2, prior {prior:7}    {results[prior]:10.1f}")
    print(f"  step time with prior frozen / without:     {results['none'] / results['frozen']:10.3f}")
    print(f"  step time with prior self / without:       {results['none'] / results['self']:10.3f}")


if __name__ == "__main__":
    main()
