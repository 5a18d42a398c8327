"""factorllm-ds: subcommand -> function. All logic lives in the modules the table names."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from factorllm_ds.config import add_dataclass_args, from_namespace
from factorllm_ds.errors import UserError


def _convert(cfg) -> int:
    from factorllm_ds.convert import convert

    print(f"wrote {convert(cfg)}")
    return 0


def _verify(cfg) -> int:
    from factorllm_ds.verify import verify

    result = verify(cfg)
    print(json.dumps(result, indent=2))
    verdict = "OK" if result["ok"] else "FAILED"
    print(f"verify: {verdict} (relative max |Δ logits| {result['relative']:.3g} "
          f"{'<=' if result['ok'] else '>'} {result['limit']:.3g})", file=sys.stdout if result["ok"] else sys.stderr)
    return 0 if result["ok"] else 1


def _export(cfg) -> int:
    from factorllm_ds.export import run_export
    from factorllm_ds.layout import read_manifest

    out = run_export(cfg)
    print(f"wrote {out} ({cfg.format}: {(read_manifest(out) or {}).get('architecture', '?')})")
    return 0


def _demo(cfg) -> int:
    from factorllm_ds.pipeline import demo

    demo(cfg)
    return 0


# The command table, in pipeline order: name -> (config dataclass, runner taking that config, one-line help).
# Modules are imported only for the command that runs (train pulls in DeepSpeed).
COMMANDS = {
    "convert": ("factorllm_ds.config:ConvertConfig", _convert, "dense HF checkpoint -> FactorLLM MoE checkpoint"),
    "prune": ("factorllm_ds.prune:PruneConfig", "factorllm_ds.prune:run_command",
              "dense HF checkpoint -> the same with each FFN cut to its top neurons (static pruning, the "
              "equal-compute baseline)"),
    "verify": ("factorllm_ds.verify:VerifyConfig", _verify, "check the MoE with all experts equals the dense model"),
    "plan": ("factorllm_ds.plan:PlanConfig", "factorllm_ds.plan:run_command",
             "per-GPU memory of a training run; recommends ep_size / ZeRO stage / offload"),
    "train": ("factorllm_ds.train:TrainConfig", "factorllm_ds.train:run_command",
              "fine-tune routers + experts with DeepSpeed expert parallelism"),
    "export": ("factorllm_ds.export:ExportConfig", _export,
               "FactorLLM run or folder -> HF folder (factorllm | mixtral | dense)"),
    "eval": ("factorllm_ds.evaluate:EvalConfig", "factorllm_ds.evaluate:run_command",
             "perplexity, expert usage and a sample of a dense or FactorLLM model"),
    "bench-speed": ("factorllm_ds.speed:SpeedConfig", "factorllm_ds.speed:run_command",
                    "prefill / decode tokens/s of a FactorLLM model vs its dense source, with the Amdahl limit"),
    "demo": ("factorllm_ds.pipeline:DemoConfig", _demo,
             "the whole job on SmolLM2 + KJV on CPU: convert, train (EP=2), export, evaluate"),
}


def _load(target):
    if not isinstance(target, str):
        return target
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that subcommand's flags are built (no other module is imported)."""
    parser = argparse.ArgumentParser(prog="factorllm-ds", description="FactorLLM on DeepSpeed expert parallelism")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (config_path, _, help_text) in COMMANDS.items():
        if only not in (None, name):
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        cls = _load(config_path)
        add_dataclass_args(sub.add_parser(name, help=help_text, description=(cls.__doc__ or help_text).strip()), cls)
    return parser


def strip_local_rank(argv: list[str]) -> list[str]:
    """Drop the ``--local_rank=N`` the deepspeed launcher puts before the subcommand.

    The same value is in the LOCAL_RANK environment variable, which is what we use.
    """
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.startswith(("--local_rank=", "--local-rank=")):
            continue
        if a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            skip = True  # and the value after it
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = strip_local_rank(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    ns = build_parser(only=command).parse_args(argv)
    config_path, runner, _ = COMMANDS[ns.command]
    try:
        return _load(runner)(from_namespace(_load(config_path), ns)) or 0
    except UserError as err:
        print(f"factorllm-ds {ns.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"factorllm-ds {ns.command}: interrupted; no output was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
