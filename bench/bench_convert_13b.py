"""Convert a LLaMA-2-13B-shaped checkpoint and report the converter's peak memory and wall time.

Writes a synthetic dense checkpoint with the LLaMA-2-13B config (bf16, sharded like the hub's,
random values), streaming one tensor at a time, then runs the real CLI on it:

    factorllm-ds convert --model DENSE --out MOE --num-experts 4 --top-k 2 --split contiguous

and measures the convert process: peak RSS (VmHWM), peak anonymous RSS (heap, what the
converter itself holds) and peak file-backed RSS (page cache mapped into it), polled from
/proc every 0.1 s. It checks a few expert slices against the dense tensors, prints a Markdown section
for bench/RESULTS.md, and deletes every synthetic file unless --keep.

    python bench/bench_convert_13b.py [--workdir DIR] [--num-experts 4] [--report FILE]

Needs about 2.1x 26 GB of free disk under --workdir.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from factorllm_ds.assets import llama_tokenizer_dir
from factorllm_ds.hf_io import CheckpointReader, StreamingSafetensorsWriter
from factorllm_ds.keys import dense_infos_from_config
from factorllm_ds.plan import BUILTIN_MODELS

GB = 10**9
GiB = 2**30


def write_synthetic(dense_dir: Path, config: dict, shard_bytes: int, seed: int) -> int:
    """A dense bf16 checkpoint of ``config`` with N(0, 0.02) weights, one tensor in memory at a time."""
    dense_dir.mkdir(parents=True)
    infos = list(dense_infos_from_config(config, torch.bfloat16).values())
    writer = StreamingSafetensorsWriter(dense_dir, infos, shard_bytes)
    gen = torch.Generator().manual_seed(seed)
    started = time.time()
    done = 0
    total = sum(i.nbytes for i in infos)
    for n, info in enumerate(infos):
        tensor = torch.empty(info.shape, dtype=torch.bfloat16)
        if info.name.endswith("norm.weight"):
            tensor.fill_(1.0)
        else:
            tensor.normal_(0.0, 0.02, generator=gen)
        writer.write(info.name, tensor)
        done += info.nbytes
        del tensor
        if n % 40 == 0:
            print(f"  synthetic: {done / GB:5.1f} / {total / GB:.1f} GB ({time.time() - started:.0f} s)", flush=True)
    writer.close()
    (dense_dir / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"],
                                                       "torch_dtype": "bfloat16", "bos_token_id": 1,
                                                       "eos_token_id": 2, "rms_norm_eps": 1e-5,
                                                       "hidden_act": "silu", "rope_theta": 10000.0}, indent=2))
    for f in llama_tokenizer_dir().iterdir():
        if f.is_file():
            shutil.copy2(f, dense_dir / f.name)
    return total


class ProcPeaks:
    """Polls /proc/PID/status of a running process: VmHWM (its own peak RSS since exec), RssAnon, RssFile.

    VmHWM is the number to quote: ru_maxrss of a child also counts the parent's resident pages it
    shared between fork and exec.
    """

    FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid, self.interval = pid, interval
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        key = line.split(":")[0]
                        if key in self.peak:
                            self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)
            except (OSError, ValueError):
                pass
            time.sleep(self.interval)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


def check_experts(dense_dir: Path, moe_dir: Path, config: dict, num_experts: int) -> list[str]:
    """The contiguous split: expert e of layer L is rows/columns [e*I/E, (e+1)*I/E) of the dense FFN."""
    dense, moe = CheckpointReader(dense_dir), CheckpointReader(moe_dir)
    size = config["intermediate_size"] // num_experts
    checked = []
    for layer, e in ((0, 0), (config["num_hidden_layers"] // 2, num_experts - 1), (config["num_hidden_layers"] - 1, 1)):
        for part in ("gate", "up", "down"):
            full = dense.get(f"model.layers.{layer}.mlp.{part}_proj.weight")
            want = full[:, e * size:(e + 1) * size] if part == "down" else full[e * size:(e + 1) * size]
            got = moe.get(f"model.layers.{layer}.mlp.experts.{e}.{part}_proj.weight")
            if not torch.equal(got, want):
                raise SystemExit(f"MISMATCH: layer {layer} expert {e} {part}_proj differs from the dense slice")
            checked.append(f"L{layer}.e{e}.{part}")
    return checked


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                    help="the files go to its sub-folder factorllm_bench_13b/ (deleted at the end; only that one)")
    ap.add_argument("--model", default="llama2-13b", choices=sorted(BUILTIN_MODELS))
    ap.add_argument("--num-experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--shard-size", default="10GB", help="synthetic dense shard size (the hub's 13B has 3 shards)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic and converted folders")
    ap.add_argument("--report", type=Path, help="also write the Markdown section to this file")
    args = ap.parse_args()

    from factorllm_ds.config import parse_size

    config = dict(BUILTIN_MODELS[args.model])
    dense_bytes = sum(i.nbytes for i in dense_infos_from_config(config, torch.bfloat16).values())
    args.workdir = args.workdir / "factorllm_bench_13b"  # this script's own folder: nothing else is deleted
    args.workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    need = int(2.05 * dense_bytes) + 2 * GB
    if free < need:
        print(f"not enough disk under {args.workdir}: {free / GB:.0f} GB free, {need / GB:.0f} GB needed "
              f"(the {dense_bytes / GB:.0f} GB dense checkpoint + its conversion). Pass --workdir on a larger disk.",
              file=sys.stderr)
        return 2
    dense_dir, moe_dir = args.workdir / "dense", args.workdir / "moe"
    for d in (dense_dir, moe_dir):
        if d.exists():
            shutil.rmtree(d)
    try:
        print(f"writing a synthetic {args.model} checkpoint ({dense_bytes / GB:.1f} GB bf16) to {dense_dir}",
              flush=True)
        t0 = time.time()
        write_synthetic(dense_dir, config, parse_size(args.shard_size), args.seed)
        synth_s = time.time() - t0
        shards = sorted(p.name for p in dense_dir.glob("*.safetensors"))
        print(f"  {len(shards)} shards in {synth_s:.0f} s; peak RSS of this writer so far "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB", flush=True)

        cmd = [str(Path(sys.executable).parent / "factorllm-ds"), "convert", "--model", str(dense_dir), "--out",
               str(moe_dir), "--num-experts", str(args.num_experts), "--top-k", str(args.top_k),
               "--split", "contiguous"]
        print("$ " + " ".join(cmd), flush=True)
        log = args.workdir / "convert.log"
        t0 = time.time()
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
            poll = ProcPeaks(proc.pid)
            code = proc.wait()
        wall = time.time() - t0
        peaks = poll.stop()
        maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the convert process only
        if code != 0:
            print(log.read_text()[-4000:], file=sys.stderr)
            return code
        moe_bytes = sum(p.stat().st_size for p in moe_dir.glob("*.safetensors"))
        checked = check_experts(dense_dir, moe_dir, config, args.num_experts)
        mem = psutil.virtual_memory().total
        section = "\n".join([
            f"## Large-model conversion: {args.model}-shaped checkpoint (synthetic bf16)",
            "",
            f"Date {datetime.date.today().isoformat()}; machine: {platform.node()}, {os.cpu_count()} cores, "
            f"{mem / GiB:.0f} GiB RAM, {platform.platform()}, torch {torch.__version__}.",
            "",
            "```",
            "python bench/bench_convert_13b.py   # writes the synthetic checkpoint, then runs:",
            " ".join(["factorllm-ds", *cmd[1:]]).replace(str(args.workdir), "$WORK"),
            "```",
            "",
            "| what | value |",
            "|---|---|",
            f"| dense input | {dense_bytes / GB:.1f} GB in {len(shards)} shards (bf16, {args.model} config) |",
            f"| MoE output | {moe_bytes / GB:.1f} GB, E={args.num_experts}, k={args.top_k}, contiguous split |",
            f"| convert wall time | {wall:.0f} s ({dense_bytes / GB / wall:.2f} GB/s) |",
            f"| convert peak RSS (VmHWM) | {peaks['VmHWM'] / GiB:.2f} GiB |",
            f"| peak anonymous RSS (heap) | {peaks['RssAnon'] / GiB:.2f} GiB |",
            f"| peak file-backed RSS (mapped page cache) | {peaks['RssFile'] / GiB:.2f} GiB |",
            f"| machine RAM | {mem / GiB:.0f} GiB |",
            f"| (ru_maxrss of the child, which also counts this parent's pages at fork) | {maxrss / GiB:.2f} GiB |",
            f"| expert slices checked equal to the dense slices | {len(checked)} ({', '.join(checked[:3])}, ...) |",
            f"| synthetic checkpoint written in | {synth_s:.0f} s |",
            "",
        ])
        print("\n" + section)
        if args.report:
            args.report.write_text(section + "\n")
        return 0
    finally:
        if not args.keep:  # dense, moe, and an interrupted convert's temporary folder
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
