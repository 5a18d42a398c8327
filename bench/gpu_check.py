"""The measurements of the one-GPU check (issue 26); bench/gpu_check.sh runs this after the GPU tests.

    python bench/gpu_check.py --out DIR [--dry-run] [--budget SECONDS]

Each step runs the real CLI in a subprocess with its own time limit (all within --budget); a step that fails or
runs out of time is recorded as such and the next one runs. Random bf16 models of TinyLlama-1.1B's shape
(H 2048, I 5632, 32 heads, 4 KV heads, vocab 32000; bench_convert.write_synthetic_checkpoint) and the
recommended structure (--shared-neurons 0.25 --num-experts 48 --top-k 16 --split coactivation):

1. convert: 4 layers converted with --device cpu and with --device cuda, 4096 calibration tokens: seconds,
   seconds per layer and the GPU's peak allocation against factorllm_ds.convert_cost's prediction, and how far
   the two outputs are apart (partitions equal, largest relative difference of any other tensor).
2. memory: 2 bf16 training steps of the 4-layer MoE on one GPU (torchrun, world 1, ZeRO-2, seq 1024):
   torch.cuda.max_memory_allocated / max_memory_reserved against `factorllm-ds plan --json`.
3. speed: all 22 layers converted on the GPU, then `factorllm-ds bench-speed` (bf16, prefill 8 x 256,
   32 decode steps): MoE vs dense tokens/s and the Amdahl limit.

--dry-run: the same steps at toy size on the CPU; the CUDA-only parts are skipped with a message. Writes
DIR/convert.json, DIR/memory.json, DIR/speed.json and DIR/summary.md (with the GPU tests' line from
DIR/pytest.log); scratch files go to --work (default: a temporary folder, removed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from bench_convert import llama_config, write_synthetic_checkpoint  # noqa: E402

TINYLLAMA = dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000)
TOY = dict(hidden=64, intermediate=256, layers=3, heads=4, kv_heads=2, vocab=32000)
STRUCTURE = ["--shared-neurons", "0.25", "--num-experts", "48", "--top-k", "16", "--split", "coactivation"]
SIZES = {  # per mode: the layers of the convert/memory model, calibration, bench-speed flags
    "gpu": dict(shape=TINYLLAMA, convert_layers=4, calib=["--calib-tokens", "4096", "--calib-seq-len", "512"],
                speed=["--dtype", "bfloat16", "--device", "cuda", "--batch", "8", "--seq-len", "256",
                       "--decode-tokens", "32", "--reps", "5", "--warmup", "1"], train_seq_len=1024),
    "dry": dict(shape=TOY, convert_layers=3, calib=["--calib-tokens", "256", "--calib-seq-len", "64"],
                speed=["--dtype", "float32", "--device", "cpu", "--batch", "2", "--seq-len", "16",
                       "--decode-tokens", "2", "--reps", "1", "--warmup", "0", "--threads", "1"], train_seq_len=64),
}
STEP_LIMITS = {"convert": 150, "memory": 150, "speed": 240}  # seconds, each also bounded by what --budget leaves

# Runs `python -m factorllm_ds ARGS` and writes the process's peak CUDA allocation to $GPU_CHECK_PEAK, also when
# a training rank ends through os._exit (factorllm_ds.distributed.hard_exit), where no atexit handler runs.
PEAK_WRAPPER = '''
import json, os, sys
import torch
_exit = os._exit
def _record():
    stats = {}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        stats = {"max_allocated": torch.cuda.max_memory_allocated(), "max_reserved": torch.cuda.max_memory_reserved()}
    with open(os.environ["GPU_CHECK_PEAK"], "w") as f:
        json.dump(stats, f)
def _record_and_exit(code):
    _record()
    _exit(code)
os._exit = _record_and_exit
from factorllm_ds.cli import main
code = main(sys.argv[1:])
_record()
sys.exit(code)
'''


class Steps:
    """Runs commands within the budget, logging each to OUT/gpu_check.log."""

    def __init__(self, out: Path, work: Path, budget: float, dry: bool):
        self.out, self.work, self.dry = out, work, dry
        self.deadline = time.monotonic() + budget
        self.log_file = out / "gpu_check.log"

    def log(self, msg: str) -> None:
        line = f"[gpu_check.py {time.strftime('%H:%M:%S')}] {msg}"
        print(line, file=sys.stderr, flush=True)
        with open(self.log_file, "a") as f:
            f.write(line + "\n")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, argv: list, limit: float, env: dict | None = None) -> dict:
        """Run ``argv`` (its own process group, killed at the limit); seconds, exit code, the output's tail."""
        timeout = max(1.0, min(limit, self.left()))
        shown = ["<PEAK_WRAPPER>" if str(a) == PEAK_WRAPPER else str(a) for a in argv]
        self.log(f"$ {' '.join(shown)}  (limit {timeout:.0f} s)")
        start = time.perf_counter()
        proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            code = "timeout"
        seconds = time.perf_counter() - start
        text = output.decode("utf-8", "replace")
        with open(self.log_file, "a") as f:
            f.write(text[-20000:] + f"\n[exit {code} after {seconds:.1f} s]\n")
        if code != 0:
            raise StepFailed(f"{' '.join(shown)[:300]} exited {code} after {seconds:.1f} s; the end of its output:\n"
                             f"{text[-2000:]}")
        return {"seconds": round(seconds, 2), "output": text}

    def cli(self, args: list, limit: float, peak: Path | None = None, env: dict | None = None) -> dict:
        """``python -m factorllm_ds ARGS``; with ``peak``, through PEAK_WRAPPER (the CUDA peak is read back)."""
        if peak is None:
            return self.run([sys.executable, "-m", "factorllm_ds", *args], limit, env)
        result = self.run([sys.executable, "-c", PEAK_WRAPPER, *args], limit, {**(env or {}), "GPU_CHECK_PEAK": peak})
        result["peak"] = json.loads(Path(peak).read_text()) if Path(peak).is_file() else {}
        return result


class StepFailed(RuntimeError):
    pass


def dense_model(folder: Path, shape: dict, layers: int) -> Path:
    """A random bf16 LLaMA checkpoint of ``shape`` with ``layers`` layers and the real 32k tokenizer."""
    from factorllm_ds import assets

    if not (folder / "config.json").is_file():
        write_synthetic_checkpoint(folder, llama_config(SimpleNamespace(**{**shape, "layers": layers})), 500 * 10**6)
        for f in assets.llama_tokenizer_dir().iterdir():
            if f.is_file():
                shutil.copy2(f, folder / f.name)
    return folder


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update({f"{path.name}:{k}": v for k, v in load_file(path).items()})
    return found


def compare_outputs(cpu: Path, cuda: Path) -> dict:
    """How far the CUDA conversion is from the CPU one: partitions equal, largest relative difference."""
    import torch

    want, got = _tensors(cpu), _tensors(cuda)
    same_partitions, worst, worst_name = [], 0.0, None
    for name, tensor in want.items():
        if "partition" in name:
            same_partitions.append(bool(torch.equal(tensor, got[name])))
            continue
        scale = tensor.float().abs().max().clamp_min(1e-30)
        diff = ((got[name].float() - tensor.float()).abs().max() / scale).item()
        if diff > worst:
            worst, worst_name = diff, name
    return {"layers_with_equal_partition": sum(same_partitions), "layers": len(same_partitions),
            "max_relative_difference": worst, "max_relative_difference_tensor": worst_name}


def manifest_seconds(folder: Path) -> float | None:
    path = folder / "factorllm_manifest.json"
    return json.loads(path.read_text()).get("seconds") if path.is_file() else None


def step_convert(steps: Steps, size: dict, text: Path) -> dict:
    from factorllm_ds.convert_cost import convert_cost
    from factorllm_ds.structure import parse_shared

    layers = size["convert_layers"]
    dense = dense_model(steps.work / "dense-small", size["shape"], layers)
    config = json.loads((dense / "config.json").read_text())
    tokens = int(size["calib"][1])
    shared = parse_shared("0.25", config["intermediate_size"])
    predicted = convert_cost(config, tokens, shared, num_experts=48)
    result = {"model": {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                "num_attention_heads", "num_key_value_heads", "vocab_size")},
              "structure": " ".join(STRUCTURE), "calib_tokens": tokens, "cpu_count": os.cpu_count(),
              "predicted": {"gpu_bytes": predicted.gpu_bytes, "gpu_seconds_per_layer": predicted.gpu_layer_s,
                            "cpu_seconds_per_layer_2_cores": predicted.cpu_layer_s}}
    common = ["convert", "--model", dense, "--calib-data", text, *STRUCTURE, *size["calib"]]
    devices = ["cpu"] if steps.dry else ["cpu", "cuda"]
    for device in devices:
        out = steps.work / f"moe-small-{device}"
        run = steps.cli([*common, "--out", out, "--device", device], STEP_LIMITS["convert"] / len(devices),
                        peak=steps.work / f"peak-convert-{device}.json")
        seconds = manifest_seconds(out)
        result[device] = {"wall_seconds": run["seconds"], "convert_seconds": seconds,
                          "seconds_per_layer": None if seconds is None else round(seconds / layers, 3)}
        if device == "cuda":
            result[device]["peak"] = run["peak"]
            peak = run["peak"].get("max_allocated")
            result[device]["peak_over_predicted"] = None if not peak else round(peak / predicted.gpu_bytes, 3)
    if steps.dry:
        result["cuda"] = "skipped: CUDA-only (dry run on the CPU)"
        steps.log("convert --device cuda: skipped (CUDA-only; dry run)")
    else:
        result["cuda_vs_cpu"] = compare_outputs(steps.work / "moe-small-cpu", steps.work / "moe-small-cuda")
        cpu_s, cuda_s = result["cpu"]["convert_seconds"], result["cuda"]["convert_seconds"]
        result["speedup_cuda_over_cpu"] = round(cpu_s / cuda_s, 2) if cpu_s and cuda_s else None
    return result


def step_memory(steps: Steps, size: dict, text: Path) -> dict:
    """plan's prediction for one training step of the small MoE against what CUDA allocated."""
    moe = steps.work / ("moe-small-cpu" if steps.dry else "moe-small-cuda")
    seq = size["train_seq_len"]
    plan_args = ["plan", "--model", moe, "--gpus", "1", "--ep-size", "1", "--zero", "2", "--no-offload",
                 "--no-activation-checkpointing", "--seq-len", str(seq), "--micro-batch-size", "1", "--prior",
                 "frozen", "--dtype", "bf16", "--json"]
    plan = json.loads(_json_tail(steps.cli(plan_args, 60)["output"]))
    estimate = plan["estimates"][0]
    runtime = estimate["parts"]["runtime"]
    result = {"plan": plan_args[1:], "predicted_total_bytes": estimate["total"], "predicted_parts": estimate["parts"],
              "predicted_without_runtime_bytes": estimate["total"] - runtime,
              "note": "runtime (CUDA context, NCCL, allocator slack: an allowance) is not in max_memory_allocated"}
    if steps.dry:
        steps.log("training step on CUDA against plan: skipped (CUDA-only; dry run)")
        result["measured"] = "skipped: CUDA-only (dry run on the CPU)"
        return result
    out, peak = steps.work / "train", steps.work / "peak-train.json"
    wrapper = steps.work / "peak_wrapper.py"
    wrapper.write_text(PEAK_WRAPPER)
    port = 29500 + os.getpid() % 2000
    torchrun = Path(sys.executable).parent / "torchrun"
    argv = [torchrun if torchrun.exists() else "torchrun", "--nnodes", "1", "--nproc_per_node", "1", "--master_addr",
            "127.0.0.1", "--master_port", str(port), wrapper, "train", "--model", moe, "--data", text, "--out", out,
            "--ds-config", REPO / "ds_configs" / "zero2_bf16.json", "--seq-len", str(seq), "--micro-batch-size", "1",
            "--global-batch-size", "1", "--steps", "2", "--warmup-steps", "0", "--eval-batches", "1",
            "--no-progress"]
    run = steps.run(argv, STEP_LIMITS["memory"], {"GPU_CHECK_PEAK": str(peak), "DS_ACCELERATOR": "cuda"})
    measured = json.loads(peak.read_text()) if peak.is_file() else {}
    result.update(train_seconds=run["seconds"], measured=measured)
    if measured.get("max_allocated"):
        result["max_allocated_over_predicted_without_runtime"] = round(
            measured["max_allocated"] / result["predicted_without_runtime_bytes"], 3)
        result["max_reserved_over_predicted_total"] = round(measured["max_reserved"] / estimate["total"], 3)
    return result


def _json_tail(output: str) -> str:
    """The JSON object a command printed last (warnings may come before it)."""
    return output[output.index("{"):output.rindex("}") + 1]


def step_speed(steps: Steps, size: dict, text: Path) -> dict:
    shape = size["shape"]
    device = "cpu" if steps.dry else "cuda"
    if shape["layers"] == size["convert_layers"] and (steps.work / f"moe-small-{device}").is_dir():
        dense, moe, conv = steps.work / "dense-small", steps.work / f"moe-small-{device}", {"seconds": None}
    else:  # the whole model, converted on the device
        dense = dense_model(steps.work / "dense-full", shape, shape["layers"])
        moe = steps.work / "moe-full"
        conv = steps.cli(["convert", "--model", dense, "--out", moe, "--calib-data", text, *STRUCTURE,
                          *size["calib"], "--device", device], STEP_LIMITS["speed"] / 2)
    report = steps.work / "speed_report.json"
    steps.cli(["bench-speed", "--model", moe, "--dense", dense, *size["speed"], "--report", report],
              STEP_LIMITS["speed"])
    result = json.loads(report.read_text())
    result["convert_on"] = device
    result["convert_seconds"] = manifest_seconds(moe)
    result["convert_wall_seconds"] = conv["seconds"]
    return result


def summary(out: Path, results: dict, dry: bool) -> str:
    lines = [f"# GPU check ({'dry run on the CPU' if dry else 'one GPU'})", ""]
    env = out / "env.json"
    if env.is_file():
        lines += [f"environment: {env.read_text().strip()}", ""]
    pytest_log = out / "pytest.log"
    if pytest_log.is_file():
        tail = [line for line in pytest_log.read_text().splitlines() if line.strip()]
        lines += [f"pytest -m gpu: {tail[-1] if tail else '(no output)'}", ""]
    for name, result in results.items():
        lines.append(f"## {name}")
        lines.append("```")
        lines.append(json.dumps(result, indent=1, default=str)[:6000])
        lines.append("```")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds for all steps together")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_work."))
    work.mkdir(parents=True, exist_ok=True)
    steps = Steps(args.out, work, args.budget, args.dry_run)
    size = SIZES["dry" if args.dry_run else "gpu"]
    from factorllm_ds import assets

    text = assets.botchan_text()
    results, failed = {}, []
    try:
        for name, step in (("convert", step_convert), ("memory", step_memory), ("speed", step_speed)):
            if steps.left() < 10:
                results[name] = "skipped: out of time"
                failed.append(name)
                continue
            try:
                results[name] = step(steps, size, text)
            except Exception as err:  # recorded, and the next step runs
                steps.log(f"{name}: FAILED: {err}")
                results[name] = f"FAILED: {err}"
                failed.append(name)
            (args.out / f"{name}.json").write_text(json.dumps(results[name], indent=2, default=str) + "\n")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    (args.out / "summary.md").write_text(summary(args.out, results, args.dry_run))
    steps.log(f"done: {', '.join(failed) + ' failed' if failed else 'every step ran'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
