"""Benchmark: conversion time vs a plain file copy, and peak memory vs the largest layer.

    python bench/bench_convert.py [--workdir DIR] [--keep | --reuse]

1. Writes a synthetic LLaMA-shaped bf16 checkpoint (default: hidden 2048, FFN 5632,
   22 layers, vocab 32000, untied: 2.2 GB; TinyLlama-1.1B's shape) as 500 MB safetensors
   shards, streamed tensor by tensor (never more than one tensor in this process's RAM).
2. Page cache: ``sync``, then one warm-up read of every source file, so the copy and the
   conversion both read from a warm cache (24 GiB RAM holds the 2.2 GB many times over);
   the source files are read once more between the copy and the conversion.
3. Times a plain copy (``shutil.copy`` of every shard + the index + config) into the work dir.
4. Runs ``python -m factorllm_ds convert --split contiguous --num-experts 4 --top-k 2`` in a
   subprocess (the process that runs it is the conversion: no shell, no launcher), timing it
   and measuring its peak RSS: VmHWM from /proc, written by the child at exit, with psutil
   polling as a cross-check.
5. Runs ``python -c "import torch, factorllm_ds, factorllm_ds.cli, factorllm_ds.convert"`` in a
   subprocess for the runtime's own RSS and start-up time, so "plus the Python runtime" is visible.
6. Checks a few output tensors bit for bit against the source (a fast wrong answer is no result).

Neither timed step calls fsync; after each one the script runs ``sync`` (timed apart and
reported) so that write-back from one step does not land in the next one's timing.
Prints every figure, then the two ratios of the issue. The synthetic files are deleted at
the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from factorllm_ds.hf_io import DTYPE_NAMES, INDEX_FILE, TensorInfo
from factorllm_ds.keys import dense_infos_from_config, layer_of


def llama_config(args) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden,
        "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab,
        "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16",
        "attention_bias": False, "mlp_bias": False,
    }


def group_shards(infos: list[TensorInfo], max_bytes: int) -> list[list[TensorInfo]]:
    groups, size = [[]], 0
    for info in infos:
        if groups[-1] and size + info.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(info)
        size += info.nbytes
    return groups


def write_synthetic_checkpoint(folder: Path, config: dict, shard_bytes: int, seed: int = 0) -> list[Path]:
    """Sharded safetensors, header first, then each tensor's bytes as soon as it is generated."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    infos = list(dense_infos_from_config(config, torch.bfloat16).values())
    groups = group_shards(infos, shard_bytes)
    gen = torch.Generator().manual_seed(seed)
    weight_map, paths = {}, []
    for n, group in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for info in group:
            header[info.name] = {"dtype": DTYPE_NAMES[info.dtype], "shape": list(info.shape),
                                 "data_offsets": [offset, offset + info.nbytes]}
            offset += info.nbytes
            weight_map[info.name] = name
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(folder / name, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)) + blob)
            for info in group:
                if info.name.endswith("norm.weight"):
                    tensor = torch.ones(info.shape, dtype=info.dtype)
                else:
                    tensor = (torch.randn(info.shape, generator=gen) * 0.02).to(info.dtype)
                fh.write(tensor.view(torch.uint8).numpy().tobytes())
                del tensor
        paths.append(folder / name)
    total = sum(i.nbytes for i in infos)
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return paths


def check_output(dense: Path, moe: Path, layer: int, experts: int) -> None:
    """A fast result must also be right: the last layer's experts and lm_head, bit for bit."""
    from factorllm_ds import keys
    from factorllm_ds.hf_io import CheckpointReader

    src, out = CheckpointReader(dense), CheckpointReader(moe)
    gate, down = src.get(keys.dense_mlp_key("gate", layer)), src.get(keys.dense_mlp_key("down", layer))
    size = gate.shape[0] // experts
    for e in range(experts):
        assert torch.equal(out.get(keys.expert_key("gate", layer, e)), gate[e * size:(e + 1) * size])
        assert torch.equal(out.get(keys.expert_key("down", layer, e)), down[:, e * size:(e + 1) * size])
    assert torch.equal(out.get("lm_head.weight"), src.get("lm_head.weight"))


def largest_layer_bytes(config: dict) -> tuple[int, int, int]:
    """(largest decoder layer, embedding, lm_head) in bytes."""
    infos = dense_infos_from_config(config, torch.bfloat16)
    per_layer: dict[int, int] = {}
    for info in infos.values():
        layer = layer_of(info.name)
        if layer is not None:
            per_layer[layer] = per_layer.get(layer, 0) + info.nbytes
    return (max(per_layer.values()), infos["model.embed_tokens.weight"].nbytes,
            infos["lm_head.weight"].nbytes if "lm_head.weight" in infos else 0)


def warm_read(paths: list[Path]) -> float:
    start = time.perf_counter()
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(64 << 20):
                pass
    return time.perf_counter() - start


def timed_sync() -> float:
    start = time.perf_counter()
    os.sync()
    return time.perf_counter() - start


# Runs `python -m factorllm_ds ...` (or any code) and records the process's own peak RSS.
# VmHWM is the high-water mark of the process's current address space, so it is not polluted
# by the parent: Linux's ru_maxrss (getrusage / wait4) carries the RSS of the process that
# forked the child across exec, here this benchmark's own, which would overstate the peak.
HWM_WRAPPER = """
import json, os, runpy, sys
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            package = getattr(sys.modules.get("factorllm_ds"), "__file__", None)
            json.dump({"vmhwm": int(line.split()[1]) * 1024, "package": package},
                      open(os.environ["BENCH_HWM_FILE"], "w"))
try:
    if sys.argv[1] == "-m":
        sys.argv = sys.argv[2:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        exec(sys.argv[2])
finally:
    hwm()
"""


WORK_SUBDIR = "factorllm_bench_convert"  # this script's own folder under --workdir
# What the convert command has imported before it reads the first tensor.
RUNTIME_IMPORTS = "import torch, factorllm_ds, factorllm_ds.cli, factorllm_ds.convert"


def run_measured(args: list[str], env: dict, hwm_file: Path) -> dict:
    """Run ``python -m MODULE ARGS`` or ``python -c CODE``: wall time, exit code, peak RSS.

    Peak RSS three ways: VmHWM written by the child itself at exit (the figure used), psutil
    polling every 5 ms (a cross-check), and wait4's ru_maxrss (shown only to document its bias).
    """
    peak_polled = [0]
    env = {**env, "BENCH_HWM_FILE": str(hwm_file), "FACTORLLM_DS_HARD_EXIT": "0"}
    cmd = [sys.executable, "-c", HWM_WRAPPER, *args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done = threading.Event()

    def poll() -> None:
        try:
            ps = psutil.Process(proc.pid)
            while not done.is_set():
                rss = ps.memory_info().rss
                peak_polled[0] = max(peak_polled[0], rss)
                time.sleep(0.005)
        except psutil.Error:
            pass

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    # Drain the pipes on threads so the child never blocks on a full pipe.
    out_chunks: dict[str, bytes] = {}
    readers = [threading.Thread(target=lambda k=k, s=s: out_chunks.__setitem__(k, s.read()), daemon=True)
               for k, s in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    for r in readers:
        r.join()
    poller.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": wall, "returncode": proc.returncode, "wait4_maxrss_bytes": usage.ru_maxrss * 1024,
            "vmhwm_bytes": json.loads(hwm_file.read_text())["vmhwm"] if hwm_file.is_file() else -1,
            "package": json.loads(hwm_file.read_text())["package"] if hwm_file.is_file() else None,
            "polled_peak_rss_bytes": peak_polled[0], "stdout": out_chunks.get("stdout", b"").decode(),
            "stderr": out_chunks.get("stderr", b"").decode()}


def machine_line() -> str:
    return (f"machine: {platform.platform()}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.1f} GiB "
            f"RAM, python {platform.python_version()}, torch {torch.__version__}")


def add_shape_args(parser: argparse.ArgumentParser, **defaults: int) -> None:
    """--hidden, --intermediate, --layers, --heads, --kv-heads: the synthetic checkpoint's shape (llama_config)."""
    for name in ("hidden", "intermediate", "layers", "heads", "kv_heads"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=defaults[name])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                        help=f"the files go to its sub-folder {WORK_SUBDIR}/ (deleted at start unless --reuse and at "
                        "the end unless --keep; nothing else under --workdir is touched)")
    add_shape_args(parser, hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-size", default="500MB", help="dense input shard size")
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic files")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the synthetic checkpoint a --keep run left in --workdir (for profiling)")
    args = parser.parse_args()

    from factorllm_ds.config import parse_size

    work = args.workdir / WORK_SUBDIR  # this script's own folder: --reuse finds it again; nothing else is deleted
    dense, copy_dir, moe = work / "dense", work / "copy", work / "moe"
    config = llama_config(args)
    reuse = args.reuse and (dense / "config.json").is_file() and json.loads(
        (dense / "config.json").read_text()) == config
    for stale in ([copy_dir, moe] if reuse else [work]):
        shutil.rmtree(stale, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    print(f"load average at start: {os.getloadavg()}")
    try:
        t0 = time.perf_counter()
        if not reuse:
            write_synthetic_checkpoint(dense, config, parse_size(args.shard_size))
        files = sorted(p for p in dense.iterdir() if p.is_file())
        total = sum(p.stat().st_size for p in files)
        shards = [p for p in files if p.suffix == ".safetensors"]
        print(f"synthetic checkpoint: {len(shards)} shards, {total} bytes, {args.layers} layers "
              f"({'reused' if reuse else f'written in {time.perf_counter() - t0:.2f} s'})")
        print(f"sync after writing: {timed_sync():.2f} s")
        print(f"warm-up read of the source files: {warm_read(files):.2f} s")

        start = time.perf_counter()
        copy_dir.mkdir()
        for p in files:
            shutil.copy(p, copy_dir / p.name)
        copy_s = time.perf_counter() - start
        copy_sync_s = timed_sync()
        print(f"plain copy: {copy_s:.3f} s (then sync {copy_sync_s:.3f} s)")
        shutil.rmtree(copy_dir)
        timed_sync()
        warm_read(files)  # the copy read them too; make sure the conversion starts equally warm

        args_convert = ["-m", "factorllm_ds", "convert", "--model", str(dense), "--out", str(moe),
                        "--split", "contiguous", "--num-experts", str(args.num_experts), "--top-k", "2"]
        conv = run_measured(args_convert, env, work / "hwm-convert")
        conv_sync_s = timed_sync()
        if conv["returncode"] != 0:
            print(conv["stderr"][-3000:], file=sys.stderr)
            raise SystemExit(f"conversion failed with exit code {conv['returncode']}")
        check_output(dense, moe, config["num_hidden_layers"] - 1, args.num_experts)
        out_bytes = sum(p.stat().st_size for p in moe.iterdir() if p.is_file())
        manifest = json.loads((moe / "factorllm_manifest.json").read_text())
        print(f"convert (python -m factorllm_ds convert, contiguous, E={args.num_experts}): {conv['wall_s']:.3f} s "
              "wall "
              f"(then sync {conv_sync_s:.3f} s); conversion proper per its manifest {manifest['seconds']} s; "
              f"wrote {out_bytes} bytes")
        print(f"factorllm_ds used by the conversion: {conv['package']}")
        print(f"convert peak RSS: VmHWM {conv['vmhwm_bytes']} bytes; psutil polling {conv['polled_peak_rss_bytes']} "
              f"bytes; (wait4 ru_maxrss {conv['wait4_maxrss_bytes']} bytes: Linux counts the forking parent's RSS in "
              "it)")

        runtime = run_measured(["-c", RUNTIME_IMPORTS], env, work / "hwm-runtime")
        print(f"runtime baseline (python -c '{RUNTIME_IMPORTS}'): VmHWM {runtime['vmhwm_bytes']} bytes, "
              f"{runtime['wall_s']:.3f} s wall")
        shutil.rmtree(moe)

        layer, embed, head = largest_layer_bytes(config)
        biggest = max(layer, embed, head)
        print(f"largest decoder layer: {layer} bytes; embedding {embed} bytes; lm_head {head} bytes")

        peak, base = conv["vmhwm_bytes"], runtime["vmhwm_bytes"]
        print()
        print(f"ratio convert / copy wall time:                       {conv['wall_s'] / copy_s:.3f}  (goal <= 1.5)")
        print(f"  both including their sync:                          "
              f"{(conv['wall_s'] + conv_sync_s) / (copy_s + copy_sync_s):.3f}")
        print(f"  conversion proper (manifest seconds) / copy:        {manifest['seconds'] / copy_s:.3f}")
        print(f"ratio peak RSS / largest layer:                       {peak / layer:.3f}  "
              "(goal <= 3, plus the runtime)")
        print(f"ratio (peak RSS - runtime RSS) / largest layer:       {(peak - base) / layer:.3f}")
        print(f"ratio (peak RSS - runtime RSS) / largest of (layer, embedding, lm_head) = {biggest} bytes: "
              f"{(peak - base) / biggest:.3f}")
        print(f"load average at end: {os.getloadavg()}")
        print(machine_line())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
