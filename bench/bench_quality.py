"""Quality benchmark (issue 5): SmolLM2-135M, trained on KJV, evaluated on Botchan (not KJV).

For each split method and (E, k): perplexity of the dense model, the converted model with
its untrained (random-init) router, the trained model with its learned router, the trained
model with the oracle router (the PA prior's choice) and with a random router (what the
paper's public code gives: its routers never train). Ratios trained/dense and
trained/oracle, with the training tokens and wall time of each run. Results are cached
per run in --work, so an interrupted benchmark continues.

    python bench/bench_quality.py [--splits contiguous kmeans] [--configs 4,2 4,1 8,2] [--tokens 24576]

Shared experts against static pruning (issue 13): ``--jobs`` switches to that table. Each job
is run in the order given (so the list is the priority) and cached under --work/issue13:

  static:F:T     static pruning: a real dense LlamaForCausalLM keeping the fraction F of each FFN's
                 neurons (the top by contribution importance, mean |a_i| * ||W_down[:, i]||, on the
                 conversion's KJV calibration tokens, each layer on the pruned layers' hidden states),
                 untrained (T=0) or fine-tuned on T tokens with a plain one-process torch loop that
                 reproduces `train` (same windows in the same order, AdamW betas (0.9, 0.95), weight
                 decay 1e-5, warm-up max(1, steps // 10) then cosine to lr x 0.001, clipping 1.0;
                 only the MLP weights train, as in the MoE recipe);
  static:F:T:R   the same with the kept neurons' down projection refitted (ridge R) to the dense FFN
                 output on the calibration tokens, as convert --refit-down does for the MoE;
  moe:S,E,K:T    convert with a shared expert of S (fraction or count), E routed co-activation
                 experts, k=K, router fitted at conversion, down projections refitted with convert's
                 default ridge; T=0: evaluated untrained with the fitted router and with the oracle
                 router; T>0: trained (DeepSpeed EP, torchrun) on T tokens;
  moe:S,E,K:T:R  the same with --refit-down R (0: exact slices, the earlier tables);
  paper:T        the paper's recipe: contiguous E=4, k=2, N(0, 0.02) router, scale E/k, share prior.

--distill W: every fine-tune (T>0) distils from the dense model: the MoE through `train --teacher DENSE
--distill-weight W`, static pruning with the same loss, (1 - W) CE + W KL(dense || model), so the
baseline gets the same training signal; such rows are cached as <name>-KD<W>.

    python bench/bench_quality.py --lr 1e-3 --jobs static:0.5:0 moe:0.125,14,6:0 static:0.5:49152 \
        moe:0.125,14,6:49152 moe:0.25,6,2:49152
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--splits", nargs="+", default=["contiguous", "random", "kmeans", "coactivation"])
    p.add_argument("--configs", nargs="+", default=["4,2", "4,1", "8,2"], help="E,k pairs")
    p.add_argument("--tokens", type=int, default=24576, help="training tokens per run")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--ep-size", type=int, default=2)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--train-args", default="", help="extra `factorllm-ds train` flags, e.g. '--prior self'")
    p.add_argument("--convert-args", default="", help="extra convert settings as key=value, e.g. "
                   "'combine_scale=1 prior_target=subset router_init=prior'")
    p.add_argument("--distill", type=float, default=0.0,
                   help="--jobs: distill from the dense model in every fine-tune (moe: `train --teacher DENSE "
                        "--distill-weight W`; static pruning: the same loss), W = this; names get -KD<W>")
    p.add_argument("--tag", default="", help="name suffix for this variant's cache entries (one starting with '-' "
                   "needs the = form: --tag=-noST)")
    p.add_argument("--work", type=Path, default=None, help="default: <cache>/bench_quality")
    p.add_argument("--jobs", nargs="+", default=None,
                   help="issue 13 table: static:F:T, moe:S,E,K:T, paper:T jobs, run in this order (see above)")
    p.add_argument("--calib-tokens", type=int, default=16384, help="--jobs: KJV calibration tokens (convert and "
                   "static pruning)")
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--calib-served", action="store_true", help="--jobs: calibrate (convert and static pruning) on "
                   "KJV and on the held-out text after its scored windows (the served domain), an equal share each, "
                   "as `convert --calib-data KJV SERVED` does; its own cache entries (-calserved)")
    p.add_argument("--train-served", action="store_true", help="--jobs: fine-tune (moe and static pruning) on KJV "
                   "and the held-out text after its scored windows, an equal number of tokens of each, instead of KJV "
                   "alone: a model trained on the domain it serves; its own cache entries (-trainserved)")
    p.add_argument("--eval-train-domain", action="store_true", help="--jobs: also score every row on KJV's held-out "
                   "windows (train's eval split, never trained or calibrated on), and moe rows with the oracle router "
                   "on both texts, trained rows included; a second table")
    p.add_argument("--seed", type=int, default=0, help="--jobs: convert --seed of moe jobs (the split's k-means "
                   "initialisation); a non-zero seed is its own cache entry (-seed<N>)")
    p.add_argument("--router-fit", default="picks", help="--jobs: convert --router-fit of moe jobs; one other than "
                   "picks (the fit every earlier row used) is its own cache entry (-fit<name> in the name)")
    p.add_argument("--routed-split", default="coactivation", help="--jobs: how moe jobs group the routed neurons "
                   "(convert --split); a non-default split is its own cache entry (-<split> in the name)")
    p.add_argument("--table-only", action="store_true", help="--jobs: print the table of the cached jobs, run none")
    p.add_argument("--plot", type=Path, default=None, help="--jobs: PNG of the quality-compute frontier of the jobs "
                   "named: perplexity / dense against the active fraction, the MoE with its router and with the "
                   "oracle, static pruning beside it, one line per training budget; a second panel for KJV with "
                   "--eval-train-domain (needs the plot extra, matplotlib)")
    p.add_argument("--no-oracle", action="store_true",
                   help="--jobs: skip the oracle-router evaluation of untrained moe jobs (the slow part of a sweep)")
    p.add_argument("--keep", action="store_true",
                   help="keep each run's converted model and DeepSpeed checkpoints (several GB a run); by default "
                        "only the metrics, reports and the exported model stay")
    return p.parse_args()


def main() -> None:
    args = parse()
    if args.jobs:
        return issue13(args)
    from factorllm_ds import assets
    from factorllm_ds.config import ConvertConfig
    from factorllm_ds.convert import convert
    from factorllm_ds.evaluate import EvalConfig, evaluate
    from factorllm_ds.export import ExportConfig, run_export
    from factorllm_ds.layout import CHECKPOINT_DIR
    from factorllm_ds.pipeline import DemoConfig, train_stage

    work = args.work or assets.cache_dir() / "bench_quality"
    work.mkdir(parents=True, exist_ok=True)
    dense, kjv, botchan = assets.smollm2_model_dir(), assets.kjv_text(), assets.botchan_text()
    extra_convert = dict(kv.split("=", 1) for kv in args.convert_args.split()) if args.convert_args else {}
    for key in ("combine_scale",):
        if key in extra_convert:
            extra_convert[key] = float(extra_convert[key])

    def ppl(model: Path, name: str, **kw) -> float:
        report = work / "reports" / f"{name}.json"
        if not report.is_file():
            evaluate(EvalConfig(model=model, data=[botchan], seq_len=args.eval_seq_len, max_windows=args.eval_windows,
                                report=report, sample_tokens=0, **kw), progress=False)
        return json.loads(report.read_text())["perplexity"]

    rows = []
    dense_ppl = ppl(dense, "dense")
    for split in args.splits:
        for ek in args.configs:
            e, k = map(int, ek.split(","))
            name = f"{split}-E{e}k{k}{args.tag}"
            result_file = work / f"{name}.json"
            if result_file.is_file():
                rows.append(json.loads(result_file.read_text()))
                continue
            moe, run, exported = work / name / "moe", work / name / "run", work / name / "export"
            if not (moe / "factorllm_manifest.json").is_file():
                needs_calib = split == "coactivation" or extra_convert.get("router_init") == "prior"
                calib = {"calib_data": kjv} if needs_calib else {}
                convert(ConvertConfig(model=dense, out=moe, num_experts=e, top_k=k, split=split, overwrite=True,
                                      **calib, **extra_convert), progress=False)
            demo = DemoConfig(tokens=args.tokens, seq_len=args.seq_len, micro_batch_size=args.micro_batch_size,
                              global_batch_size=args.global_batch_size, lr=args.lr, nproc=args.nproc,
                              ep_size=min(args.ep_size, e), launcher="torchrun")
            started = time.time()
            train_stage(demo, moe, kjv, run, extra=args.train_args.split())
            train_seconds = time.time() - started
            if not (exported / "config.json").is_file():
                run_export(ExportConfig(run=run, out=exported, format="factorllm", overwrite=True), progress=False)
            row = {"split": split, "E": e, "k": k, "tokens": args.tokens, "train_seconds": round(train_seconds, 1),
                   "dense": dense_ppl,
                   "converted_random_init_router": ppl(moe, f"{name}-converted"),
                   "trained_random_router": ppl(exported, f"{name}-random", router="random"),
                   "trained": ppl(exported, f"{name}-trained"),
                   "trained_oracle": ppl(exported, f"{name}-oracle", router="oracle"),
                   "train_args": args.train_args, "convert_args": args.convert_args, "lr": args.lr}
            row["trained_over_dense"] = row["trained"] / dense_ppl
            row["trained_over_oracle"] = row["trained"] / row["trained_oracle"]
            result_file.write_text(json.dumps(row, indent=2) + "\n")
            if not args.keep:
                shutil.rmtree(run / CHECKPOINT_DIR, ignore_errors=True)
                shutil.rmtree(moe, ignore_errors=True)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    head = (f"{'split':13} {'E,k':5} {'tokens':>7} {'train s':>8} {'dense':>7} {'conv+rand':>10} {'paper':>9} "
            f"{'trained':>9} {'oracle':>9} {'tr/dense':>8} {'tr/orac':>8}")
    print(head)
    for r in rows:
        print(f"{r['split']:13} {r['E']},{r['k']:<3} {r['tokens']:7d} {r['train_seconds']:8.1f} {r['dense']:7.2f} "
              f"{r['converted_random_init_router']:10.1f} {r['trained_random_router']:9.1f} {r['trained']:9.2f} "
              f"{r['trained_oracle']:9.2f} {r['trained_over_dense']:8.3f} {r['trained_over_oracle']:8.3f}")
    print("conv+rand: converted, untrained (random-init) router; paper: trained experts, random router "
          "(the paper's public code never trains the router); oracle: the PA prior's experts")


# ------------------------------------------------------------------------ issue 13: shared experts vs static pruning


def _parse_job(spec: str) -> dict:
    kind, _, rest = spec.partition(":")
    try:
        if kind == "static":
            frac, tokens, *refit = rest.split(":")
            ridge = float(refit[0]) if refit else 0.0
            tag = f"static{frac}" + (f"-R{ridge:g}" if ridge else "")
            return {"kind": kind, "frac": float(frac), "tokens": int(tokens), "refit": ridge, "struct": tag,
                    "name": f"{tag}-T{tokens}"}
        if kind == "moe":
            shape, tokens, *refit = rest.split(":")
            s, e, k = shape.split(",")
            from factorllm_ds.config import REFIT_DOWN_RIDGE

            ridge = float(refit[0]) if refit else REFIT_DOWN_RIDGE
            struct = f"S{s}-E{e}k{k}" + (f"-R{ridge:g}" if ridge else "")
            return {"kind": kind, "shared": s, "E": int(e), "k": int(k), "tokens": int(tokens), "refit": ridge,
                    "struct": struct, "name": f"{struct}-T{tokens}"}
        if kind == "paper":
            return {"kind": kind, "E": 4, "k": 2, "tokens": int(rest), "struct": "paper-contiguous-E4k2",
                    "name": f"paper-contiguous-E4k2-T{rest}"}
    except ValueError:
        pass
    raise SystemExit(f"--jobs {spec}: expected static:F:T[:R], moe:S,E,K:T[:R] or paper:T")


def _calib_ids(args, dense: Path, files: list[Path]):
    """The conversion's calibration tokens, as convert takes them from ``files`` (calibration.calibration_ids)."""
    from types import SimpleNamespace

    from factorllm_ds.calibration import calibration_ids
    from factorllm_ds.hf_io import load_tokenizer, read_config

    config = read_config(dense)
    cfg = SimpleNamespace(model=dense, calib_data=files, calib_tokens=args.calib_tokens,
                          calib_seq_len=args.calib_seq_len)
    return calibration_ids(load_tokenizer(dense, model_config=config), config, cfg)


def served_text(args, dense: Path, held_out: Path, work: Path) -> Path:
    """The held-out text after its scored windows (--eval-windows x --eval-seq-len tokens), as a file: text of
    the served domain that is not scored."""
    from transformers import AutoTokenizer

    from factorllm_ds.data import read_text

    path = work / "served-after-eval.txt"
    if not path.is_file():
        tokenizer = AutoTokenizer.from_pretrained(dense)
        ids = tokenizer(read_text(held_out, "held-out"), add_special_tokens=False)["input_ids"]
        path.write_text(tokenizer.decode(ids[args.eval_windows * args.eval_seq_len:]))
    return path


def train_served_text(args, dense: Path, kjv: Path, served: Path, work: Path) -> Path:
    """Training text of the served domain: KJV's first tokens, as many as ``served`` holds, then ``served``
    (the held-out text after its scored windows). train samples windows uniformly, so half of the training
    windows are of each."""
    from transformers import AutoTokenizer

    from factorllm_ds.data import read_text

    path = work / "train-served.txt"
    if not path.is_file():
        tokenizer = AutoTokenizer.from_pretrained(dense)
        served_text_ = read_text(served, "served")
        count = len(tokenizer(served_text_, add_special_tokens=False)["input_ids"])
        ids = tokenizer(read_text(kjv, "KJV"), add_special_tokens=False)["input_ids"][:count]
        path.write_text(tokenizer.decode(ids) + "\n\n" + served_text_)
    return path


def build_static(args, dense: Path, calib_files: list[Path], frac: float, refit: float = 0.0):
    """SmolLM2 with each FFN cut to its top ``frac`` neurons by contribution importance: a real LlamaForCausalLM
    with intermediate_size round(frac * I). Each layer's importance is measured on the calibration tokens as the
    already-pruned layers below it transform them (the stream convert calibrates on). ``refit`` > 0: the kept
    neurons' down projection is then refitted to the dense FFN output on those tokens with the ridge convert's
    --refit-down uses (structure.refit_down), so the baseline gets the same reconstruction as the MoE."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from factorllm_ds import structure as st

    tokenizer = AutoTokenizer.from_pretrained(dense)
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32, attn_implementation="sdpa").eval()
    inter = model.config.intermediate_size
    keep = round(frac * inter)
    calib = _calib_ids(args, dense, calib_files)
    inner = model.model
    with torch.no_grad():
        hidden = inner.embed_tokens(calib)
        pos = torch.arange(calib.shape[1]).unsqueeze(0)
        pos_emb = inner.rotary_emb(hidden, pos)

        def run(layer, h):
            out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pos_emb)
            return out[0] if isinstance(out, tuple) else out

        for layer in inner.layers:
            mlp = layer.mlp
            seen = {}
            hook = mlp.down_proj.register_forward_pre_hook(lambda _m, a, seen=seen: seen.setdefault("act", a[0]))
            run(layer, hidden)
            hook.remove()
            act_TI = seen["act"].reshape(-1, inter)
            imp_I = st.neuron_importance(act_TI, mlp.down_proj.weight, "contribution")
            idx = torch.topk(imp_I, keep).indices.sort().values
            if refit:
                down = st.refit_down(act_TI[:, idx], torch.ones(act_TI.shape[0], keep), mlp.down_proj.weight[:, idx],
                                     act_TI @ mlp.down_proj.weight.T, refit)
                mlp.down_proj.weight.data[:, idx] = down
            mlp.gate_proj.weight = torch.nn.Parameter(mlp.gate_proj.weight[idx].clone())
            mlp.up_proj.weight = torch.nn.Parameter(mlp.up_proj.weight[idx].clone())
            mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight[:, idx].clone())
            for lin, (o, i) in ((mlp.gate_proj, (keep, None)), (mlp.up_proj, (keep, None)),
                                (mlp.down_proj, (None, keep))):
                if o:
                    lin.out_features = o
                else:
                    lin.in_features = i
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = keep
            hidden = run(layer, hidden)
    model.config.intermediate_size = keep
    return model, tokenizer


def finetune_static(args, model, tokenizer, kjv: Path, tokens: int, teacher=None) -> dict:
    """`train`'s schedule and data order on one process: AdamW, warm-up then cosine, clipping 1.0, MLP weights only;
    with a ``teacher``, `train`'s loss (1 - W) CE + W KL(teacher || model), W = --distill."""
    import math

    import numpy as np
    import torch

    from factorllm_ds.data import Sampler, prepare
    from factorllm_ds.ds_moe import distill_kl
    from factorllm_ds.train import TrainConfig, lr_lambda

    defaults = TrainConfig(model=Path("."), data=["x"], out=Path("."))
    gbs, micro = args.global_batch_size, args.micro_batch_size
    steps = max(1, tokens // (gbs * args.seq_len))  # as pipeline.train_config
    warmup = max(1, steps // 10)
    packed = prepare([str(kjv)], None, tokenizer, args.seq_len, defaults.eval_fraction)
    sampler = Sampler(len(packed.train), defaults.seed)
    for name, p in model.named_parameters():
        p.requires_grad_(".mlp." in name)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(defaults.beta1, defaults.beta2),
                            weight_decay=defaults.weight_decay)
    sched_cfg = type("C", (), {"warmup_steps": warmup, "min_lr_ratio": defaults.min_lr_ratio})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(sched_cfg, steps))
    model.train()
    accum = gbs // micro
    losses = []
    for step in range(steps):
        total = 0.0
        for m in range(accum):
            first = step * gbs + m * micro
            ids = torch.from_numpy(np.stack([packed.train[sampler.window(first + b)] for b in range(micro)]))
            out = model(input_ids=ids, labels=ids)
            loss = out.loss
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=ids).logits[:, :-1]
                loss = (1 - args.distill) * loss + args.distill * distill_kl(out.logits[:, :-1], teacher_logits)
            loss = loss / accum
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        if not math.isfinite(total):
            raise RuntimeError(f"static fine-tune: loss {total} at step {step}")
        print(f"static fine-tune step {step + 1}/{steps} loss {total:.4f} ({time.strftime('%H:%M:%S')})",
              file=sys.stderr, flush=True)
    model.eval()
    return {"steps": steps, "warmup_steps": warmup, "first_loss": losses[0], "last_loss": losses[-1]}


def issue13(args) -> None:
    from factorllm_ds import assets
    from factorllm_ds.config import ConvertConfig
    from factorllm_ds.convert import convert
    from factorllm_ds.evaluate import EvalConfig, evaluate
    from factorllm_ds.export import ExportConfig, run_export
    from factorllm_ds.hf_model.configuration_factorllm import FactorLLMConfig
    from factorllm_ds.layout import CHECKPOINT_DIR, MANIFEST_FILE
    from factorllm_ds.modeling import load_dense
    from factorllm_ds.pipeline import DemoConfig, train_stage, training_domain_text

    work = (args.work or assets.cache_dir() / "bench_quality") / "issue13"
    (work / "reports").mkdir(parents=True, exist_ok=True)
    dense, kjv, botchan = assets.smollm2_model_dir(), assets.kjv_text(), assets.botchan_text()
    jobs = [_parse_job(j) for j in args.jobs]
    # A conversion variant (--routed-split, --seed) is its own moe struct, e.g. S0.25-E24k8-R4-seed1.
    variant = (f"-{args.routed_split}" if args.routed_split != "coactivation" else "") + (
        f"-fit{args.router_fit}" if args.router_fit != "picks" else "") + (
        f"-seed{args.seed}" if args.seed else "")
    served = served_text(args, dense, botchan, work) if args.calib_served or args.train_served else None
    calib_files = [kjv, served] if args.calib_served else [kjv]
    train_file = train_served_text(args, dense, kjv, served, work) if args.train_served else kjv
    heldout_kjv = training_domain_text(kjv, dense, args.seq_len, work / "kjv-heldout.txt") \
        if args.eval_train_domain else None
    for job in jobs:  # a training variant (--train-args, --distill) is its own cache entry, named by --tag / -KD<W>
        job_variant = (variant if job["kind"] == "moe" else "") + ("-calserved" if args.calib_served else "")
        if job["kind"] in ("moe", "static") and job_variant:
            job["struct"] += job_variant
            job["name"] = job["name"].replace("-T", job_variant + "-T", 1)
        if job["tokens"] and args.train_served:
            job["name"] += "-trainserved"
            job["train_served"] = True
        if job["tokens"] and args.distill:
            job["name"] += f"-KD{args.distill:g}"
            job["distill"] = args.distill
        if job["tokens"] and job["kind"] != "static" and args.tag:
            job["name"] += args.tag
            job["train_args"] = args.train_args
    train_args = args.train_args.split() + (
        ["--teacher", str(dense), "--distill-weight", str(args.distill)] if args.distill else [])

    def report(model: Path, name: str, text: Path | None = None, **kw) -> dict:
        path = work / "reports" / (f"{name}.json" if text is None else f"{name}@{text.stem}.json")
        if not path.is_file():
            evaluate(EvalConfig(model=model, data=[text or botchan], seq_len=args.eval_seq_len,
                                max_windows=args.eval_windows, report=path, sample_tokens=0, **kw), progress=False)
        return json.loads(path.read_text())

    def extras(row: dict, model: Path, name: str) -> None:
        """--eval-train-domain: the row's model on KJV's held-out windows; moe rows also with the oracle router on
        both texts."""
        if heldout_kjv is None or "ppl_kjv" in row or not (model / "config.json").is_file():
            return
        row["ppl_kjv"] = report(model, name, heldout_kjv)["perplexity"]
        if row["job"]["kind"] == "moe":
            row["ppl_oracle"] = report(model, name + "-oracle", router="oracle")["perplexity"]
            row["ppl_oracle_kjv"] = report(model, name + "-oracle", heldout_kjv, router="oracle")["perplexity"]

    def usage(rep: dict) -> dict | None:
        u = rep.get("expert_usage")
        if not u:
            return None
        return {"per_layer_max_share": [max(r) for r in u["shares"]],
                "per_layer_min_share": [min(r) for r in u["shares"]],
                "max_share": u["max_share"], "min_share": u["min_share"]}

    settings = {"seq_len": args.seq_len, "global_batch_size": args.global_batch_size,
                "micro_batch_size": args.micro_batch_size, "lr": args.lr, "nproc": args.nproc, "ep_size": args.ep_size,
                "calib_tokens": args.calib_tokens, "calib_seq_len": args.calib_seq_len,
                "calib_served": args.calib_served, "train_data": "kjv + served" if args.train_served else "kjv",
                "eval": f"botchan {args.eval_windows}x{args.eval_seq_len}"}
    dense_ppl = report(dense, "dense")["perplexity"]
    dense_kjv = report(dense, "dense", heldout_kjv)["perplexity"] if heldout_kjv else None
    for job in ([] if args.table_only else jobs):
        result_file = work / f"{job['name']}.json"
        if result_file.is_file():
            row = json.loads(result_file.read_text())
            if heldout_kjv and "ppl_kjv" not in row:  # a cached row: score its kept model on the second text
                untrained_moe = job["kind"] == "moe" and not job["tokens"]
                extras(row, model_folder(work, job), job["name"] + ("-fitted" if untrained_moe else ""))
                result_file.write_text(json.dumps(row, indent=1) + "\n")
            continue
        started = time.time()
        row = {"job": job, "settings": settings, "dense": dense_ppl}
        print(f"== {job['name']}", file=sys.stderr, flush=True)
        if job["kind"] == "static":
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            # the pruned, untrained model: built once per fraction, shared by its untrained and fine-tuned jobs
            pruned = model_folder(work, {**job, "tokens": 0})
            if not (pruned / "config.json").is_file():
                model, tokenizer = build_static(args, dense, calib_files, job["frac"], job["refit"])
                model.save_pretrained(pruned)
                tokenizer.save_pretrained(pruned)
                del model
            row["prune_seconds"] = round(time.time() - started, 1)
            row["active"] = json.loads((pruned / "config.json").read_text())["intermediate_size"] / json.loads(
                (dense / "config.json").read_text())["intermediate_size"]
            folder = pruned
            if job["tokens"]:
                model = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32, attn_implementation="sdpa")
                tokenizer = AutoTokenizer.from_pretrained(pruned)
                teacher = load_dense(dense) if args.distill else None
                row["finetune"] = finetune_static(args, model, tokenizer, train_file, job["tokens"], teacher)
                folder = model_folder(work, job)
                model.save_pretrained(folder)
                tokenizer.save_pretrained(folder)
                del model
            row["train_seconds"] = max(0.0, round(time.time() - started - row["prune_seconds"], 1))
            row["ppl"] = report(folder, job["name"])["perplexity"]
            extras(row, folder, job["name"])
            if not args.keep and job["tokens"]:
                shutil.rmtree(work / job["name"], ignore_errors=True)
        else:
            moe = model_folder(work, {**job, "tokens": 0})
            if not (moe / MANIFEST_FILE).is_file():
                if job["kind"] == "moe":
                    cfg = ConvertConfig(model=dense, out=moe, num_experts=job["E"], top_k=job["k"],
                                        split=args.routed_split, shared_neurons=job["shared"], calib_data=calib_files,
                                        calib_tokens=args.calib_tokens, calib_seq_len=args.calib_seq_len,
                                        refit_down=job["refit"], seed=args.seed, router_fit=args.router_fit,
                                        overwrite=True)
                else:
                    cfg = ConvertConfig(model=dense, out=moe, num_experts=4, top_k=2, split="contiguous",
                                        overwrite=True)
                convert(cfg, progress=False)
            manifest_cfg = json.loads((moe / "config.json").read_text())
            row["active"] = FactorLLMConfig.from_pretrained(moe).active_fraction
            row["moe_config"] = {k: manifest_cfg.get(k) for k in manifest_cfg if k in (
                "num_experts", "num_experts_per_tok", "expert_intermediate_size", "shared_intermediate_size", "routing",
                "combine_scale", "prior_target", "router_bias")}
            if job["tokens"] == 0:
                fitted = report(moe, job["name"] + "-fitted")
                row["ppl"] = fitted["perplexity"]
                row["usage"] = usage(fitted)
                if not args.no_oracle:
                    row["ppl_oracle"] = report(moe, job["name"] + "-oracle", router="oracle")["perplexity"]
                extras(row, moe, job["name"] + "-fitted")
                row["train_seconds"] = 0.0
            else:
                run, exported = work / job["name"] / "run", model_folder(work, job)
                demo = DemoConfig(tokens=job["tokens"], seq_len=args.seq_len, micro_batch_size=args.micro_batch_size,
                                  global_batch_size=args.global_batch_size, lr=args.lr, nproc=args.nproc,
                                  ep_size=min(args.ep_size, job["E"]), launcher="torchrun")
                train_stage(demo, moe, train_file, run, extra=train_args)
                row["train_seconds"] = round(time.time() - started, 1)
                if not (exported / "config.json").is_file():
                    run_export(ExportConfig(run=run, out=exported, format="factorllm", overwrite=True), progress=False)
                trained = report(exported, job["name"])
                extras(row, exported, job["name"])
                row["ppl"] = trained["perplexity"]
                row["usage"] = usage(trained)
                if not args.keep:
                    shutil.rmtree(run / CHECKPOINT_DIR, ignore_errors=True)
        row["over_dense"] = row["ppl"] / dense_ppl
        row["seconds"] = round(time.time() - started, 1)
        result_file.write_text(json.dumps(row, indent=1) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k not in ("usage", "settings")}), file=sys.stderr, flush=True)
    print_issue13(work, jobs, dense_ppl)
    if dense_kjv is not None:
        print_domains(work, jobs, dense_ppl, dense_kjv)
    print_recovery(work, jobs, dense_ppl, dense_kjv)
    if args.plot:
        plot_issue13(work, jobs, dense_ppl, dense_kjv, args)


def plot_issue13(work: Path, jobs: list[dict], dense_ppl: float, dense_kjv: float | None, args) -> None:
    """--plot: the frontier of the jobs of this command (not every cached row): one line per model kind and training
    budget, one panel per text."""
    from plots import plot_fractions  # bench/plots.py, beside this script

    names = {j["name"] for j in jobs}
    rows = [r for r in _sorted_rows(work, jobs) if r["job"]["name"] in names and r["job"]["kind"] != "paper"]
    panels = []
    for key, dense_, text in (("ppl", dense_ppl, "Botchan, held out"),
                              ("ppl_kjv", dense_kjv, "KJV, train's held-out windows")):
        if dense_ is None:  # no --eval-train-domain: no KJV panel
            continue
        series: dict[str, list[tuple[float, float]]] = {}
        for r in (r for r in rows if key in r):
            j = r["job"]
            budget = "untrained" if not j["tokens"] else f"{j['tokens']:,} tokens"
            if j["kind"] == "moe":
                series.setdefault(f"MoE, {args.router_fit} router, {budget}", []).append((r["active"], r[key] / dense_))
                oracle = r.get(key.replace("ppl", "ppl_oracle", 1))
                if oracle:
                    series.setdefault(f"MoE, oracle router, {budget}", []).append((r["active"], oracle / dense_))
            else:
                label = "static pruning" + (" + refit" if j.get("refit") else "")
                series.setdefault(f"{label}, {budget}", []).append((r["active"], r[key] / dense_))
        if series:
            panels.append((f"perplexity / dense ({text})", series))
    if not panels:
        sys.exit(f"--plot {args.plot}: none of the jobs named has a result yet; run them first")
    loss = f"distilled (w = {args.distill:g})" if args.distill else "CE"
    plot_fractions(panels, f"SmolLM2-135M: quality against compute, untrained and trained ({loss}, lr {args.lr:g})",
                   args.plot)
    print(f"\nplot: {args.plot}")


def model_folder(work: Path, job: dict) -> Path:
    """Where a job's model is kept: the converted MoE (untrained), its export (trained), the pruned model (static,
    untrained) or the fine-tuned one (static, trained; only with --keep)."""
    if job["kind"] == "moe":
        return work / job["name"] / "export" if job["tokens"] else work / job["struct"] / "moe"
    return work / job["name"] / "model" if job["tokens"] else work / f"{job['struct']}-pruned"


def _ratio(num: float, den: float | None) -> str:
    return "–" if den is None else f"{num / den:.3f}"


def _static_key(r: dict) -> tuple:
    """What a static-pruning row must share with a row to be its equal-compute baseline: active share, tokens,
    refit, distillation, calibration text and training text."""
    j = r["job"]
    return (round(r["active"], 4), j["tokens"], j.get("distill", 0), bool(r["settings"].get("calib_served")),
            bool(j.get("train_served")))


def _label(j: dict) -> str:
    label = {"static": "static pruning", "paper": "paper recipe (contiguous E=4 k=2, scale 2, share)"}.get(
        j["kind"], j.get("struct", ""))
    if j.get("refit"):  # the moe struct names its refit ridge (-R4) already
        label += f" + down refit (ridge {j['refit']:g})" if j["kind"] == "static" else ""
    if j["kind"] == "moe":
        label += ", fitted router" + (", untrained" if j["tokens"] == 0 else ", trained")
    if j.get("train_args"):
        label += f" (`{j['train_args']}`)"
    elif j["kind"] == "static":
        label += ", untrained" if j["tokens"] == 0 else ", fine-tuned (MLP)"
    if j.get("distill"):
        label += f", distilled from the dense model (w = {j['distill']:g})"
    if j.get("train_served"):
        label += ", trained on KJV + the served text"
    return label


def _sorted_rows(work: Path, jobs: list[dict]) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted(work.glob("*.json"))]
    order = {j["name"]: i for i, j in enumerate(jobs)}
    rows.sort(key=lambda r: (-round(r["active"], 4), order.get(r["job"]["name"], 10**6), r["job"]["tokens"]))
    return rows


def print_issue13(work: Path, jobs: list[dict], dense_ppl: float) -> None:
    """Markdown table of every cached job; ppl / static pruning against the static rows (plain and with the
    down-projection refit) of the same active share, training tokens, loss, calibration and training text."""
    rows = _sorted_rows(work, jobs)
    static: dict[tuple, float] = {}
    for r in rows:
        if r["job"]["kind"] == "static":
            static[_static_key(r) + (bool(r["job"].get("refit")),)] = r["ppl"]
    print("\n| active | model | tokens | ppl | ppl / dense | ppl / static pruning | ppl / static pruning + refit |\n"
          "|---|---|---|---|---|---|---|")
    print(f"| 1 | dense | 0 | {dense_ppl:.2f} | 1 | – | – |")

    def line(r: dict, label: str, ppl: float) -> None:
        refs = [static.get(_static_key(r) + (refit,)) for refit in (False, True)]
        print(f"| {r['active']:.3f} | {label} | {r['job']['tokens']} | {ppl:.2f} | {ppl / dense_ppl:.3f} | "
              f"{_ratio(ppl, refs[0])} | {_ratio(ppl, refs[1])} |")

    for r in rows:
        j = r["job"]
        line(r, _label(j), r["ppl"])
        if "ppl_oracle" in r:
            line(r, f"{j['struct']}, oracle router, " + ("untrained" if j["tokens"] == 0 else "trained"),
                 r["ppl_oracle"])


def print_recovery(work: Path, jobs: list[dict], dense_ppl: float, dense_kjv: float | None) -> None:
    """How much of its excess loss training recovered, MoE beside static pruning + refit (same fraction, tokens,
    loss, calibration): excess = ln(ppl / dense), share = 1 - trained excess / untrained excess. If both recover the
    same share f, MoE / static falls to (untrained MoE / static) ** (1 - f): a lead in perplexity narrows with
    training even when the MoE learns exactly as well as the static model; the last column is that ratio."""
    rows = _sorted_rows(work, jobs)
    by_key = {(r["job"]["struct"], r["job"]["tokens"], bool(r["settings"].get("calib_served"))): r for r in rows
              if "struct" in r["job"]}
    static = {_static_key(r): r for r in rows if r["job"]["kind"] == "static" and r["job"].get("refit")}
    lines = []
    for key, dense_, text in (("ppl", dense_ppl, "Botchan"), ("ppl_kjv", dense_kjv, "KJV held out")):
        if dense_ is None:
            continue
        for moe_t in (r for r in rows if r["job"]["kind"] == "moe" and r["job"]["tokens"]):
            served = bool(moe_t["settings"].get("calib_served"))
            moe_u = by_key.get((moe_t["job"]["struct"], 0, served))
            stat_t = static.get(_static_key(moe_t))
            stat_u = None if stat_t is None else by_key.get((stat_t["job"]["struct"], 0, served))
            pair = (moe_u, moe_t, stat_u, stat_t)
            if any(r is None or key not in r for r in pair):
                continue
            mu, mt, su, st_ = (math.log(r[key] / dense_) for r in pair)
            f_moe, f_static = 1 - mt / mu, 1 - st_ / su
            lines.append(f"| {moe_t['active']:.3f} | {_label(moe_t['job'])} | {moe_t['job']['tokens']} | {text} | "
                         f"{mu:.3f} → {mt:.3f} | {f_moe:.1%} | {su:.3f} → {st_:.3f} | {f_static:.1%} | "
                         f"{math.exp(mu - su):.3f} → {math.exp(mt - st_):.3f} | "
                         f"{math.exp((mu - su) * (1 - f_static)):.3f} |")
    if lines:
        print("\nExcess loss recovered by training: excess = ln(ppl / dense), share = 1 - trained / untrained excess\n"
              "| active | model | tokens | text | MoE excess, untrained → trained | MoE share | "
              "static + refit excess | static share | MoE / static | MoE / static had the MoE recovered static's "
              "share |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(lines))


def print_domains(work: Path, jobs: list[dict], dense_ppl: float, dense_kjv: float) -> None:
    """--eval-train-domain: every row scored on both texts, with its oracle and its equal-compute baseline (static
    pruning + refit with the same tokens, loss, calibration and training text) on each."""
    rows = [r for r in _sorted_rows(work, jobs) if "ppl_kjv" in r]
    static = {_static_key(r): r for r in rows if r["job"]["kind"] == "static" and r["job"].get("refit")}
    print(f"\nBotchan: the held-out text (dense {dense_ppl:.2f}); KJV: train's held-out windows of the training "
          f"domain (dense {dense_kjv:.2f}).\n")
    print("| active | model | tokens | Botchan | / dense | / oracle | / static + refit | KJV held out | / dense | "
          "/ oracle | / static + refit |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = static.get(_static_key(r))
        cells = []
        for ppl, oracle, dense_, ref_ppl in ((r["ppl"], r.get("ppl_oracle"), dense_ppl, ref and ref["ppl"]),
                                             (r["ppl_kjv"], r.get("ppl_oracle_kjv"), dense_kjv,
                                              ref and ref["ppl_kjv"])):
            cells += [f"{ppl:.2f}", f"{ppl / dense_:.3f}", _ratio(ppl, oracle), _ratio(ppl, ref_ppl)]
        print(f"| {r['active']:.3f} | {_label(r['job'])} | {r['job']['tokens']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
