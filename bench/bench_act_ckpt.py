"""Activation checkpointing benchmark (issue 12): peak memory and step time with and without it.

On one converted SmolLM2-135M (E=4, k=2 by default), 2 processes, EP=2, ZeRO-2 fp32 on CPU (gloo),
for each --seq-lens value: `train` without and with --activation-checkpointing. For each run it
records every rank's peak RSS (VmHWM, written by a wrapper just before the rank's deliberate exit,
as tests/test_plan.py does) and the median step time (steps 2..N, from metrics.csv), and puts the
planner's prediction (`factorllm-ds plan --device cpu --dtype fp32`, the same settings) beside it.

    python bench/bench_act_ckpt.py [--model MOE_DIR] [--seq-lens 512 1024] [--steps 4] [--shared-neurons 0.25]

Without --model it converts SmolLM2-135M (`python -m factorllm_ds.assets smollm2`) into the cache first.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MiB = 2**20

# The rank's own peak RSS since exec, written just before the os._exit that ends every train rank.
RSS_WRAPPER = '''
import os, sys
from pathlib import Path
_exit = os._exit
def _record_and_exit(code):
    hwm = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    Path(os.environ["PEAK_RSS_DIR"], "rank" + os.environ.get("RANK", "0") + ".kib").write_text(hwm)
    _exit(code)
os._exit = _record_and_exit
from factorllm_ds.cli import main
os._exit(main(sys.argv[1:]))
'''


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="converted FactorLLM folder (default: SmolLM2, E=4 k=2)")
    p.add_argument("--shared-neurons", default=None, help="with the default model: convert with this shared expert "
                   "(as convert --shared-neurons; calibrated on KJV)")
    p.add_argument("--data", type=Path, default=None, help="training text (default: KJV)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prior", default="frozen", choices=("frozen", "self", "none"))
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_model(shared: str | None) -> Path:
    from factorllm_ds import assets
    from factorllm_ds.config import ConvertConfig
    from factorllm_ds.convert import convert
    from factorllm_ds.layout import MANIFEST_FILE

    model = assets.cache_dir() / ("bench_act_ckpt_moe" + (f"_shared{shared}" if shared else ""))
    if not (model / MANIFEST_FILE).is_file():
        extra = dict(shared_neurons=shared, calib_data=assets.kjv_text(), calib_tokens=2048) if shared else {}
        convert(ConvertConfig(model=assets.smollm2_model_dir(), out=model, num_experts=4, top_k=2, overwrite=True,
                              **extra), progress=False)
    return model


def run_train(model: Path, data: Path, seq_len: int, ckpt: bool, args, work: Path) -> dict:
    """One 2-rank EP=2 run: peak RSS of each rank (bytes) and the median step time (s)."""
    name = f"T{seq_len}-{'ckpt' if ckpt else 'plain'}"
    out, peaks = work / name, work / f"peaks-{name}"
    shutil.rmtree(out, ignore_errors=True)
    peaks.mkdir(parents=True, exist_ok=True)
    wrapper = work / "rss_wrapper.py"
    wrapper.write_text(RSS_WRAPPER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(wrapper), "train", "--model", str(model), "--data", str(data), "--out", str(out),
           "--seq-len", str(seq_len), "--steps", str(args.steps), "--micro-batch-size", "1", "--global-batch-size", "2",
           "--ep-size", "2", "--prior", args.prior,
           "--ds-config", str(Path(__file__).parents[1] / "ds_configs/zero2.json"),
           "--warmup-steps", "0", "--eval-fraction", "0", "--no-progress",
           *(["--activation-checkpointing"] if ckpt else [])]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PEAK_RSS_DIR=str(peaks))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"train failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    tokens_per_step = 2 * seq_len
    return {"peaks": [int((peaks / f"rank{r}.kib").read_text()) * 1024 for r in range(2)],
            "step_s": statistics.median(tokens_per_step / float(r["tokens_per_s"]) for r in rows[1:]),
            "loss": [float(r["loss"]) for r in rows]}


def predicted(model: Path, seq_len: int, ckpt: bool, prior: str) -> int:
    from factorllm_ds.plan import PlanConfig, make_plan

    plan = make_plan(PlanConfig(model=str(model), gpus=2, gpu_memory="64GB", ep_size=2, zero=2, seq_len=seq_len,
                                prior=prior, device="cpu", dtype="fp32", activation_checkpointing=ckpt))
    (estimate,) = plan.estimates
    return estimate.total


def main() -> None:
    args = parse()
    from factorllm_ds import assets

    data = args.data or assets.kjv_text()
    model = args.model or default_model(args.shared_neurons)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_act_ckpt_") as tmp:
        for seq_len in args.seq_lens:
            for ckpt in (False, True):
                r = run_train(model, data, seq_len, ckpt, args, Path(tmp))
                r["predicted"] = predicted(model, seq_len, ckpt, args.prior)
                results[seq_len, ckpt] = r
    print(f"model {model}, 2 processes, EP=2, ZeRO-2 fp32, micro-batch 1 x 2 ranks, prior {args.prior}, "
          f"{args.steps} steps (median step time of steps 2..{args.steps})")
    print(f"{'seq_len':>7} {'ckpt':>5} {'peak MiB rank0':>15} {'rank1':>7} {'predicted MiB':>14} {'pred/meas':>10} "
          f"{'step s':>8} {'final loss':>11}")
    for (seq_len, ckpt), r in results.items():
        measured = max(r["peaks"])
        print(f"{seq_len:>7} {'yes' if ckpt else 'no':>5} {r['peaks'][0] / MiB:>15.0f} {r['peaks'][1] / MiB:>7.0f} "
              f"{r['predicted'] / MiB:>14.0f} {r['predicted'] / measured:>10.3f} {r['step_s']:>8.2f} "
              f"{r['loss'][-1]:>11.6f}")
    for seq_len in args.seq_lens:
        plain, ckpt = results[seq_len, False], results[seq_len, True]
        memory = max(ckpt["peaks"]) / max(plain["peaks"])
        print(f"seq_len {seq_len}: checkpointed / plain: peak memory measured {memory:.3f}, "
              f"predicted {ckpt['predicted'] / plain['predicted']:.3f}; "
              f"step time {ckpt['step_s'] / plain['step_s']:.3f}; losses equal: {ckpt['loss'] == plain['loss']}")


if __name__ == "__main__":
    main()
