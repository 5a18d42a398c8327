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

``--check-tokens N`` runs N tokens of held-out text (Botchan unless ``--text``) through the FactorLLM model (fp32
and bf16 compute), its native export in transformers and its GGUF in llama.cpp (f32 and ``--gguf-type``):
perplexity of each, top-1 agreements, max |delta logit| of llama.cpp against transformers on the same weights.
The FactorLLM model's own bf16 / fp32 agreement is the noise floor: hard top-k routing turns any rounding
change into other expert choices downstream.
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
from factorllm_ds.export_formats import WEIGHT_TOLERANCE, ExportOptions
from factorllm_ds.hf_io import CheckpointReader, read_config
from factorllm_ds.shape import MoEShape
from factorllm_ds.sources import FolderSource
from factorllm_ds.speed import _time_variants, amdahl_limit

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
    """One untimed run of each, then ``reps`` interleaved timed ones (bench-speed's schedule); the medians."""
    return {name: statistics.median(ts) for name, ts in _time_variants(variants, reps, warmup=1).items()}


# ------------------------------------------------------------------------------------------------ llama.cpp


def llama_cpp_timers(gguf: Path, prompt: list[int], steps: list[int], threads: int):
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=len(prompt) + len(steps) + 8, n_batch=len(prompt),
                n_ubatch=len(prompt), n_threads=threads, n_threads_batch=threads, verbose=False)

    def prefill() -> float:
        llm.reset()  # position 0: eval drops the KV cache from there on
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
                      options=ExportOptions(gguf_type=args.gguf_type, weight_tolerance=args.weight_tolerance))
        / "model.gguf",
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
        limit = amdahl_limit(share, active)
        out |= {"ffn_share": share, "amdahl_limit": limit, "speedup_over_limit": out["speedup"] / limit}
    return out


def gguf_logits(gguf: Path, ids: list[int], threads: int) -> torch.Tensor:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=len(ids) + 8, n_batch=512, logits_all=True, verbose=False,
                n_threads=threads, type_k=0, type_v=0)  # f32 KV cache
    try:
        llm.eval(ids)
        return torch.tensor(np.array(llm.scores[:len(ids)]), dtype=torch.float32)
    finally:
        llm.close()


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    return torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:])).exp().item()


def check_quality(args, moe: Path, work: Path, text: Path) -> dict:
    """The same held-out tokens through the FactorLLM model (fp32 and bf16 compute), its native export in
    transformers and its GGUF in llama.cpp (f32, and --gguf-type): perplexity of each and top-1 agreements."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from factorllm_ds.modeling import load_moe

    ids = AutoTokenizer.from_pretrained(moe)(text.read_text(encoding="utf-8")[:200_000])["input_ids"]
    ids = ids[:args.check_tokens]
    x = torch.tensor([ids])
    logits = {}
    with torch.no_grad():
        logits["factorllm fp32"] = load_moe(moe, dtype=torch.float32).eval()(x).logits[0].float()
        logits["factorllm bf16"] = load_moe(moe, dtype=torch.bfloat16).eval()(x).logits[0].float()
        native = export(FolderSource(moe), work / "native-check", "qwen2-moe", progress=False,
                        options=ExportOptions(weight_tolerance=args.weight_tolerance))
        logits["native fp32"] = AutoModelForCausalLM.from_pretrained(native, dtype=torch.float32).eval()(x).logits[0]
    for gguf_type in dict.fromkeys(("f32", args.gguf_type)):
        gguf = export(FolderSource(moe), work / f"check-{gguf_type}", "gguf", progress=False,
                      options=ExportOptions(gguf_type=gguf_type, weight_tolerance=args.weight_tolerance))
        logits[f"llama.cpp {gguf_type}"] = gguf_logits(gguf / "model.gguf", ids, args.threads)
    ref, top1 = logits["factorllm fp32"], {}
    pairs = [("llama.cpp f32", "native fp32"), ("native fp32", "factorllm fp32"), ("llama.cpp f32", "factorllm fp32"),
             ("factorllm bf16", "factorllm fp32")]
    for a, b in pairs:
        top1[f"{a} / {b}"] = (logits[a].argmax(-1) == logits[b].argmax(-1)).float().mean().item()
    return {"tokens": len(ids), "text": str(text), "weight_tolerance": args.weight_tolerance,
            "perplexity": {name: perplexity(lg, ids) for name, lg in logits.items()},
            "top1_agreement": top1,
            "max_abs_delta_logit_llama_cpp_f32_vs_native": (logits["llama.cpp f32"] - logits["native fp32"]).abs()
            .max().item(),
            "max_abs_logit": ref.abs().max().item()}


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
    parser.add_argument("--check-tokens", type=int, default=0, help="held-out tokens of the quality check (0: none)")
    parser.add_argument("--weight-tolerance", type=float, default=WEIGHT_TOLERANCE, help="export --weight-tolerance")
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

                report["quality"] = check_quality(args, args.moe, work, args.text or botchan_text())
        if "native" in engines:
            from transformers import AutoModelForCausalLM

            native = export(FolderSource(args.moe), work / "native", "qwen2-moe", progress=False,
                            options=ExportOptions(weight_tolerance=args.weight_tolerance))
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
    if "quality" in report:
        c = report["quality"]
        print(f"held-out text, {c['tokens']} tokens ({Path(c['text']).name}), --weight-tolerance "
              f"{c['weight_tolerance']:g}: perplexity")
        for name, value in c["perplexity"].items():
            print(f"  {name:16} {value:9.3f}")
        print("top-1 next-token agreement")
        for name, value in c["top1_agreement"].items():
            print(f"  {name:34} {value:.4f}")
        print(f"max |delta logit| llama.cpp f32 vs native fp32: {c['max_abs_delta_logit_llama_cpp_f32_vs_native']:.4g}"
              f" (max |logit| {c['max_abs_logit']:.3g})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
