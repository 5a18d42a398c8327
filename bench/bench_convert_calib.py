"""Peak memory and time of a conversion with calibration (shared expert, co-activation split, fitted
router, down refit) at a large model's layer shape.

Writes a synthetic checkpoint with the given shape (default: LLaMA-2-13B's layers, 2 of them, bf16,
random values) and a real tokenizer (SmolLM2's, copied in; vocab = the tokenizer's), then runs the real CLI

    factorllm-ds convert --model DENSE --out MOE --shared-neurons S --num-experts E --top-k K \\
        --calib-data KJV --calib-tokens T

in a subprocess and measures its peak RSS (VmHWM, written by the process at exit). Prints the peak
against the largest dense decoder layer (bf16) and against the terms the calibration adds per layer
(docs/cluster.md "Converting 13B-70B checkpoints"), plus the conversion's seconds per layer. The
synthetic files (a fresh sub-folder of --workdir) are deleted at the end unless --keep.

    python bench/bench_convert_calib.py [--hidden 5120 --intermediate 13824 --heads 40 --kv-heads 40]
        [--layers 2] [--num-experts 24 --top-k 8 --shared 0.25] [--calib-tokens 4096] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import (  # noqa: E402
    RUNTIME_IMPORTS,
    add_shape_args,
    largest_layer_bytes,
    llama_config,
    machine_line,
    run_measured,
    write_synthetic_checkpoint,
)

from factorllm_ds import assets  # noqa: E402
from factorllm_ds.config import parse_size  # noqa: E402
from factorllm_ds.structure import parse_shared  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def calibration_terms(args) -> dict[str, int]:
    """The largest tensors one layer's calibration holds (fp32 bytes), by name."""
    t, h, i = args.calib_tokens, args.hidden, args.intermediate
    routed = i - parse_shared(args.shared, i)
    return {"hidden states, MLP input and output [T, H] x 3": 3 * t * h * 4,
            "layer weights in fp32": (4 * h * h + 3 * h * i) * 4,
            "activations [T, I] (captured, gated copy)": 2 * t * i * 4,
            "refit normal equations + Cholesky [I, I] x 2": 2 * i * i * 4,
            "all routed experts' outputs [E, T, H] (if held at once)": args.num_experts * t * h * 4,
            "co-activation of routed neurons [I_r, I_r]": routed * routed * 4,
            "embedding (fp32 while the calibration starts)": args.vocab * h * 4}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                   help="where a fresh sub-folder for the synthetic files is made (nothing else there is touched)")
    add_shape_args(p, hidden=5120, intermediate=13824, layers=2, heads=40, kv_heads=40)  # LLaMA-2-13B's layers
    p.add_argument("--num-experts", type=int, default=24)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--shared", default="0.25")
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()

    tok_dir = assets.smollm2_model_dir()
    args.vocab = vocab = json.loads((tok_dir / "config.json").read_text())["vocab_size"]
    config = llama_config(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="factorllm_calib_bench-", dir=args.workdir))
    dense, moe = work / "dense", work / "moe"
    try:
        started = time.perf_counter()
        write_synthetic_checkpoint(dense, config, parse_size("2GB"))
        for name in TOKENIZER_FILES:
            if (tok_dir / name).is_file():
                shutil.copy(tok_dir / name, dense / name)
        print(f"synthetic checkpoint ({args.layers} layers, H {args.hidden}, I {args.intermediate}, vocab {vocab}) "
              f"written in {time.perf_counter() - started:.1f} s")
        cmd = ["-m", "factorllm_ds", "convert", "--model", str(dense), "--out", str(moe),
               "--shared-neurons", args.shared, "--num-experts", str(args.num_experts), "--top-k", str(args.top_k),
               "--calib-data", str(assets.kjv_text()), "--calib-tokens", str(args.calib_tokens)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        load = os.getloadavg()
        run = run_measured(cmd, env, work / "hwm")
        if run["returncode"] != 0:
            print(run["stderr"][-3000:], file=sys.stderr)
            raise SystemExit(f"conversion failed with exit code {run['returncode']}")
        runtime = run_measured(["-c", RUNTIME_IMPORTS], env, work / "hwm-runtime")
        layer, embed, head = largest_layer_bytes(config)
        peak, base = run["vmhwm_bytes"], runtime["vmhwm_bytes"]
        manifest = json.loads((moe / "factorllm_manifest.json").read_text())
        print(f"command: factorllm-ds convert --shared-neurons {args.shared} --num-experts {args.num_experts} "
              f"--top-k {args.top_k} --calib-data kjv.txt --calib-tokens {args.calib_tokens} "
              f"(coactivation split, fitted router, down refit: convert's defaults with --calib-data)")
        print(f"factorllm_ds used: {run['package']}")
        print(f"wall {run['wall_s']:.1f} s, {run['wall_s'] / args.layers:.1f} s per layer; conversion proper "
              f"{manifest['seconds']} s; load average at start {load[0]:.2f}, at end {os.getloadavg()[0]:.2f}")
        print(f"peak RSS (VmHWM) {peak} bytes = {peak / 2**30:.2f} GiB; runtime alone {base / 2**30:.2f} GiB")
        print(f"largest dense decoder layer (bf16) {layer} bytes; embedding {embed}; lm_head {head}")
        print("largest calibration terms per layer (fp32):")
        for name, size in calibration_terms(args).items():
            print(f"  {size / 2**30:8.3f} GiB  {name}")
        print(f"ratio peak RSS / largest layer:                 {peak / layer:.3f}")
        print(f"ratio (peak RSS - runtime) / largest layer:     {(peak - base) / layer:.3f}")
        print(machine_line())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
