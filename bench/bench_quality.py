"""Quality benchmark (issue 5): SmolLM2-135M, trained on KJV, evaluated on Botchan (not KJV).

For each split method and (E, k): perplexity of the dense model, the converted model with
its untrained (random-init) router, the trained model with its learned router, the trained
model with the oracle router (the PA prior's choice) and with a random router (what the
paper's public code gives: its routers never train). Ratios trained/dense and
trained/oracle, with the training tokens and wall time of each run. Results are cached
per run in --work, so an interrupted benchmark continues.

    python bench/bench_quality.py [--splits contiguous kmeans] [--configs 4,2 4,1 8,2] [--tokens 24576]
"""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--tag", default="", help="name suffix for this variant's cache entries")
    p.add_argument("--work", type=Path, default=None, help="default: <cache>/bench_quality")
    p.add_argument("--keep", action="store_true",
                   help="keep each run's converted model and DeepSpeed checkpoints (several GB a run); by default "
                        "only the metrics, reports and the exported model stay")
    return p.parse_args()


def main() -> None:
    args = parse()
    from factorllm_ds import assets
    from factorllm_ds.config import ConvertConfig
    from factorllm_ds.convert import convert
    from factorllm_ds.evaluate import EvalConfig, evaluate
    from factorllm_ds.export import ExportConfig, run_export
    from factorllm_ds.pipeline import DemoConfig, train_stage
    from factorllm_ds.layout import CHECKPOINT_DIR

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


if __name__ == "__main__":
    main()
