"""MoE vs dense inference speed for several structures, against the Amdahl limit of each.

    python bench/bench_speed.py                       # synthetic mid-size LLaMA, built in a temp dir
    python bench/bench_speed.py --dense DENSE_DIR     # a real dense model (converted here, once per structure)
    python bench/bench_speed.py --device cuda --dtype bfloat16 --batch 8 --seq-len 256
    python bench/bench_speed.py --smollm2 --structures 0,4,2 0,16,8 0,64,32 0.125,14,6 0.125,28,12 0.125,56,24

A structure is S,E,K: a shared expert of S (a fraction of the FFN, 0 for none), E routed experts,
k of them per token. A shared expert needs calibration text: --calib-data, or KJV with --smollm2
(the demo's model and text, docs/method.md). Each structure runs `factorllm-ds bench-speed`
(factorllm_ds.speed) in this process: prefill and decode tokens/s of the MoE and of the dense model
on the same inputs, the dense model's FFN share f by ablation, the limit 1 / ((1 - f) + f a) for
the active fraction a, and the ratios measured speedup / limit and MoE / dense tokens per second.
Nothing is written outside the temp dir unless --report is given.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STRUCTURES = ("0,4,1", "0,4,2", "0,8,2")  # S,E,K


def build_synthetic(out: Path, hidden: int, intermediate: int, layers: int, vocab: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden // 64)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("meta"):  # skip the slow default init: random values are all speed needs
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        if p.dim() == 1:
            torch.nn.init.ones_(p)  # RMSNorm weights
        else:
            torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", type=Path, help="dense HF model folder (default: a synthetic LLaMA)")
    parser.add_argument("--smollm2", action="store_true", help="the demo's SmolLM2 and KJV (cached assets)")
    parser.add_argument("--structures", nargs="+", default=list(STRUCTURES), help="S,E,K: shared fraction, E, k")
    parser.add_argument("--calib-data", type=Path, help="calibration text for structures with a shared expert")
    parser.add_argument("--calib-tokens", type=int, default=2048,
                        help="calibration tokens (speed does not depend on the router's quality)")
    parser.add_argument("--hidden", type=int, default=1024, help="synthetic model: hidden size")
    parser.add_argument("--intermediate", type=int, default=4096, help="synthetic model: FFN size")
    parser.add_argument("--layers", type=int, default=8, help="synthetic model: decoder layers")
    parser.add_argument("--vocab", type=int, default=32000, help="synthetic model: vocabulary")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--report", type=Path, help="write all results as JSON here")
    args = parser.parse_args(argv)

    from factorllm_ds.config import ConvertConfig
    from factorllm_ds.convert import convert
    from factorllm_ds.speed import SpeedConfig, bench_speed

    if args.smollm2:
        from factorllm_ds import assets

        args.dense = args.dense or assets.smollm2_model_dir()
        args.calib_data = args.calib_data or assets.kjv_text()
    structures = []
    for spec in args.structures:
        try:
            shared, e, k = spec.split(",")
            structures.append((float(shared), int(e), int(k)))
        except ValueError:
            parser.error(f"--structures {spec}: expected S,E,K, e.g. 0.125,14,6")
    if any(shared for shared, _, _ in structures) and args.calib_data is None:
        parser.error("--structures with a shared expert need --calib-data (or --smollm2)")

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_speed_") as tmp:
        tmp = Path(tmp)
        dense = args.dense
        if dense is None:
            started = time.time()
            dense = build_synthetic(tmp / "dense", args.hidden, args.intermediate, args.layers, args.vocab)
            print(f"synthetic LLaMA: hidden {args.hidden}, FFN {args.intermediate}, {args.layers} layers, "
                  f"vocab {args.vocab} ({time.time() - started:.0f} s to build)", file=sys.stderr)
        for shared, num_experts, k in structures:
            moe = tmp / f"moe-S{shared}-E{num_experts}"
            if not moe.is_dir():  # one MoE copy on disk at a time; structures differing only in k share it
                for old in tmp.glob("moe-*"):
                    shutil.rmtree(old)
                calib = dict(shared_neurons=str(shared), split="coactivation", calib_data=args.calib_data,
                             calib_tokens=args.calib_tokens) if shared else {}
                convert(ConvertConfig(model=dense, out=moe, num_experts=num_experts, top_k=k, **calib),
                        progress=False)
            print(f"timing S={shared} k/E = {k}/{num_experts} ...", file=sys.stderr, flush=True)
            results.append(bench_speed(SpeedConfig(
                model=moe, dense=dense, top_k=k, batch=args.batch, seq_len=args.seq_len,
                decode_tokens=args.decode_tokens, reps=args.reps, warmup=args.warmup, dtype=args.dtype,
                device=args.device, threads=args.threads)))

    first = results[0]
    print(f"\ndense model: {dense if args.dense else 'synthetic LLaMA'}; batch {args.batch} x {args.seq_len} prefill "
          f"tokens, {args.decode_tokens} decode steps; {args.dtype} on {first['device']}"
          + (f", {first['threads']} threads" if first["threads"] else "") + f"; median of {args.reps}")
    print(f"{'shared':>6} {'k/E':>6} {'active':>6} {'phase':8} {'dense tok/s':>12} {'moe tok/s':>11} {'FFN f':>6} "
          f"{'speedup':>8} {'limit':>6} {'ratio':>6}")
    for r in results:
        for phase in ("prefill", "decode"):
            if phase not in r:
                continue
            p = r[phase]
            print(f"{r['shared_intermediate_size']:6d} {str(r['top_k']) + '/' + str(r['num_experts']):>6} "
                  f"{r['active_fraction']:6.3f} {phase:8} {p['dense_tokens_per_s']:12.1f} "
                  f"{p['moe_tokens_per_s']:11.1f} {p['ffn_share']:6.3f} {p['speedup']:8.3f} "
                  f"{p['amdahl_limit']:6.3f} {p['speedup_over_limit']:6.3f}")
    if args.report is not None:
        args.report.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
