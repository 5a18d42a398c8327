"""Serving benchmark: the MoE against its dense model in the engines users serve with, one run, as ratios.

    python bench/bench_serve.py --moe MOE_DIR --dense DENSE_DIR [--engines llama.cpp,native,factorllm]
        [--gguf-type f16] [--threads 2] [--prompt 256] [--decode 64] [--reps 5] [--check-tokens 1024]

Engines, each timing the MoE and its dense model alike (same engine, same threads, interleaved repetitions,
medians):

- ``llama.cpp``: ``export --format gguf`` of the MoE (llama.cpp's ``qwen2moe``) against the dense model
  converted by the same llama.cpp converter, run through llama-cpp-python. A third model, the dense one
  with its FFN cut to 16 neurons, measures the FFN's share f of the dense time, and with it the Amdahl
  limit 1 / ((1 - f) + f a) of the active fraction a.
- ``native``: ``export --format qwen2-moe`` loaded by plain transformers (Qwen2MoeForCausalLM, no remote
  code) against the dense model in transformers.
- ``factorllm``: the FactorLLM folder itself (our model code) against the dense model in transformers.

prefill: one pass over ``--prompt`` tokens (one sequence). decode: ``--decode`` single-token steps after an
untimed prefill, the tokens fixed in advance.

``--check-tokens N`` (llama.cpp, needs an f32 GGUF: it is made for the check) also compares the GGUF's
next-token logits with the FactorLLM model's in transformers on N tokens of held-out text (Botchan unless
``--text``): top-1 agreement and max |delta logit|.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from factorllm_ds.export import export
from factorllm_ds.export_formats import ExportOptions
from factorllm_ds.hf_io import CheckpointReader, read_config
from factorllm_ds.shape import MoEShape
from factorllm_ds.sources import FolderSource

NO_FFN_NEURONS = 16  # the "FFN removed" dense model keeps this many neurons (llama.cpp needs n_ff > 0)


def gguf_of_dense(dense: Path, out: Path, gguf_type: str) -> Path:
    from factorllm_ds.assets import llama_cpp_converter

    cmd = [sys.executable, "-m", "factorllm_ds.gguf_convert", str(llama_cpp_converter()), str(dense),
           "--outtype", gguf_type, "--outfile", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"converting {dense} to GGUF failed:\n{proc.stderr[-2000:]}")
    return out


def dense_without_ffn(dense: Path, out: Path) -> Path:
    """``dense`` with every FFN cut to its first NO_FFN_NEURONS neurons (same attention, embeddings, head)."""
    from safetensors.torch import save_file

    reader = CheckpointReader(dense)
    tensors = {}
    for name in reader.names():
        t = reader.get(name)
        if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
            t = t[:NO_FFN_NEURONS].clone()
        elif name.endswith("mlp.down_proj.weight"):
            t = t[:, :NO_FFN_NEURONS].clone()
        tensors[name] = t.contiguous()
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dense / "config.json").read_text())
    config["intermediate_size"] = NO_FFN_NEURONS
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for side in dense.iterdir():
        if side.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy2(side, out / side.name)
    return out


def median_times(variants: dict, reps: int) -> dict[str, float]:
    for fn in variants.values():  # warm-up
        fn()
    times = {name: [] for name in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            times[name].append(fn())
    return {name: statistics.median(ts) for name, ts in times.items()}


# ------------------------------------------------------------------------------------------------ llama.cpp


def llama_cpp_timers(gguf: Path, prompt: list[int], steps: list[int], threads: int):
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=len(prompt) + len(steps) + 8, n_batch=len(prompt),
                n_ubatch=len(prompt), n_threads=threads, n_threads_batch=threads, verbose=False)

    def prefill() -> float:
        llm.reset()
        llm._ctx.memory_clear(True) if hasattr(llm._ctx, "memory_clear") else None
        start = time.perf_counter()
        llm.eval(prompt)
        return time.perf_counter() - start

    def decode() -> float:
        prefill()
        start = time.perf_counter()
        for tok in steps:
            llm.eval([tok])
        return time.perf_counter() - start

    return llm, prefill, decode


def bench_llama_cpp(args, moe: Path, dense: Path, work: Path, active: float, prompt, steps) -> dict:
    ggufs = {
        "moe": export(FolderSource(moe), work / "moe-gguf", "gguf", progress=False,
                      options=ExportOptions(gguf_type=args.gguf_type)) / "model.gguf",
        "dense": gguf_of_dense(dense, work / "dense.gguf", args.gguf_type),
        "dense_no_ffn": gguf_of_dense(dense_without_ffn(dense, work / "no-ffn"), work / "no-ffn.gguf",
                                      args.gguf_type),
    }
    timers = {name: llama_cpp_timers(path, prompt, steps, args.threads) for name, path in ggufs.items()}
    result = {}
    for phase, index, tokens in (("prefill", 1, len(prompt)), ("decode", 2, len(steps))):
        med = median_times({name: t[index] for name, t in timers.items()}, args.reps)
        result[phase] = phase_result(med, tokens, active)
    for llm, *_ in timers.values():
        llm.close()
    result["gguf_bytes"] = {name: path.stat().st_size for name, path in ggufs.items()}
    return result


def phase_result(med: dict[str, float], tokens: int, active: float) -> dict:
    out = {f"{name}_tokens_per_s": tokens / t for name, t in med.items()}
    out["speedup"] = med["dense"] / med["moe"]
    if "dense_no_ffn" in med:
        share = min(max(1 - med["dense_no_ffn"] / med["dense"], 0.0), 1.0)
        limit = 1 / ((1 - share) + share * active)
        out |= {"ffn_share": share, "amdahl_limit": limit, "speedup_over_limit": out["speedup"] / limit}
    return out


def check_llama_cpp(args, moe: Path, work: Path, text: Path) -> dict:
    """Top-1 agreement and max |delta logit| of the f32 GGUF against the FactorLLM model on held-out text."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from factorllm_ds.modeling import load_moe

    gguf = export(FolderSource(moe), work / "moe-gguf-f32", "gguf", progress=False,
                  options=ExportOptions(gguf_type="f32")) / "model.gguf"
    ids = AutoTokenizer.from_pretrained(moe)(text.read_text(encoding="utf-8")[:200_000])["input_ids"]
    ids = ids[:args.check_tokens]
    llm = Llama(model_path=str(gguf), n_ctx=len(ids) + 8, n_batch=512, logits_all=True, verbose=False,
                n_threads=args.threads, type_k=0, type_v=0)  # f32 KV cache
    llm.eval(ids)
    got = torch.tensor(np.array(llm.scores[:len(ids)]), dtype=torch.float32)
    llm.close()
    model = load_moe(moe, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].float()
    return {"tokens": len(ids), "top1_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
            "max_abs_delta_logit": (got - want).abs().max().item(),
            "max_abs_logit": want.abs().max().item()}


# ---------------------------------------------------------------------------------------------- transformers


def transformers_timers(model, prompt: list[int], steps: list[int]):
    from factorllm_ds.speed import run_decode, run_prefill

    ids = torch.tensor([prompt])
    step_ids = torch.tensor([steps])
    return (lambda: run_prefill(model, ids)), (lambda: run_decode(model, ids, step_ids))


def bench_transformers(args, moe_model, dense: Path, prompt, steps) -> dict:
    from transformers import AutoModelForCausalLM

    dense_model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    timers = {"dense": transformers_timers(dense_model, prompt, steps),
              "moe": transformers_timers(moe_model, prompt, steps)}
    result = {}
    for phase, index, tokens in (("prefill", 0, len(prompt)), ("decode", 1, len(steps))):
        med = median_times({name: t[index] for name, t in timers.items()}, args.reps)
        result[phase] = phase_result(med, tokens, 1.0)
    return result


# -------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moe", type=Path, required=True, help="FactorLLM folder (from convert or export)")
    parser.add_argument("--dense", type=Path, required=True, help="the dense folder it was converted from")
    parser.add_argument("--engines", default="llama.cpp,native,factorllm")
    parser.add_argument("--gguf-type", default="f16", choices=("f32", "f16", "bf16", "q8_0"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--check-tokens", type=int, default=0)
    parser.add_argument("--text", type=Path, default=None, help="held-out text of the check (default: Botchan)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    engines = [e for e in args.engines.split(",") if e]
    shape = MoEShape.of_config(read_config(args.moe, "--moe"))
    active = shape.active_fraction
    vocab = read_config(args.dense, "--dense").get("vocab_size")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, vocab, (args.prompt,), generator=g).tolist()
    steps = torch.randint(100, vocab, (args.decode,), generator=g).tolist()
    report = {"moe": str(args.moe), "dense": str(args.dense), "active_fraction": active, "threads": args.threads,
              "prompt": args.prompt, "decode": args.decode, "reps": args.reps, "gguf_type": args.gguf_type,
              "torch": torch.__version__, "engines": {}}
    with tempfile.TemporaryDirectory(prefix="bench_serve.") as tmp:
        work = Path(tmp)
        if "llama.cpp" in engines:
            report["engines"]["llama.cpp"] = bench_llama_cpp(args, args.moe, args.dense, work, active, prompt, steps)
            if args.check_tokens:
                from factorllm_ds.assets import botchan_text

                report["gguf_check"] = check_llama_cpp(args, args.moe, work, args.text or botchan_text())
        if "native" in engines:
            from transformers import AutoModelForCausalLM

            native = export(FolderSource(args.moe), work / "native", "qwen2-moe", progress=False)
            model = AutoModelForCausalLM.from_pretrained(native, dtype=torch.float32).eval()
            report["engines"]["native"] = bench_transformers(args, model, args.dense, prompt, steps)
            del model
        if "factorllm" in engines:
            from factorllm_ds.modeling import load_moe

            model = load_moe(args.moe, dtype=torch.float32).eval()
            report["engines"]["factorllm"] = bench_transformers(args, model, args.dense, prompt, steps)
    print(f"MoE {args.moe} vs dense {args.dense}: active fraction {active:.3f}, {args.threads} threads, "
          f"prompt {args.prompt}, decode {args.decode}, median of {args.reps}")
    print(f"{'engine':10} {'phase':8} {'dense tok/s':>12} {'MoE tok/s':>10} {'MoE/dense':>10} {'FFN share':>10} "
          f"{'limit':>7} {'of limit':>9}")
    for engine, phases in report["engines"].items():
        for phase in ("prefill", "decode"):
            r = phases[phase]
            extra = (f"{r['ffn_share']:10.3f} {r['amdahl_limit']:7.3f} {r['speedup_over_limit']:9.3f}"
                     if "amdahl_limit" in r else f"{'':10} {'':7} {'':9}")
            print(f"{engine:10} {phase:8} {r['dense_tokens_per_s']:12.1f} {r['moe_tokens_per_s']:10.1f} "
                  f"{r['speedup']:10.3f} {extra}")
    if "gguf_check" in report:
        c = report["gguf_check"]
        print(f"GGUF f32 in llama.cpp vs the FactorLLM model in transformers, {c['tokens']} tokens: top-1 agreement "
              f"{c['top1_agreement']:.4f}, max |delta logit| {c['max_abs_delta_logit']:.4g} "
              f"(max |logit| {c['max_abs_logit']:.3g})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
