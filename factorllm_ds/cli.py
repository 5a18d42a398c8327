"""factorllm-ds: subcommand -> function. All logic lives in the modules it imports."""

from __future__ import annotations

import argparse
import json
import os
import sys

from factorllm_ds.config import add_dataclass_args, from_namespace
from factorllm_ds.errors import UserError


def _convert(ns):
    from factorllm_ds.config import ConvertConfig
    from factorllm_ds.convert import convert

    out = convert(from_namespace(ConvertConfig, ns))
    print(f"wrote {out}")
    return 0


def _verify(ns):
    from factorllm_ds.verify import VerifyConfig, verify

    result = verify(from_namespace(VerifyConfig, ns))
    print(json.dumps(result, indent=2))
    if not result["ok"]:
        print(f"verify: FAILED: relative max |Δ logits| {result['relative']:.3g} > {result['limit']:.3g}",
              file=sys.stderr)
        return 1
    print(f"verify: OK (relative max |Δ logits| {result['relative']:.3g} <= {result['limit']:.3g})")
    return 0


# name -> (config dataclass import path, runner, one-line help)
COMMANDS = {
    "convert": ("factorllm_ds.config:ConvertConfig", _convert, "dense HF checkpoint -> FactorLLM MoE checkpoint"),
    "verify": ("factorllm_ds.verify:VerifyConfig", _verify, "check the MoE with all experts equals the dense model"),
}


def _load(path: str):
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def register_command(name: str, config_path: str, runner, help_text: str) -> None:
    COMMANDS[name] = (config_path, runner, help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="factorllm-ds", description="FactorLLM on DeepSpeed expert parallelism")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (config_path, _, help_text) in COMMANDS.items():
        cls = _load(config_path)
        p = sub.add_parser(name, help=help_text, description=(cls.__doc__ or help_text).strip())
        add_dataclass_args(p, cls)
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
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            continue
        if a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            skip = True
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    _register_optional_commands()
    ns = build_parser().parse_args(strip_local_rank(sys.argv[1:] if argv is None else argv))
    try:
        return COMMANDS[ns.command][1](ns) or 0
    except UserError as err:
        print(f"factorllm-ds {ns.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"factorllm-ds {ns.command}: interrupted; no output was left behind", file=sys.stderr)
        return 130


def _register_optional_commands() -> None:
    """Commands from later stages register here when their modules exist."""
    for module in ("factorllm_ds.train", "factorllm_ds.export", "factorllm_ds.evaluate", "factorllm_ds.plan",
                   "factorllm_ds.pipeline"):
        try:
            mod = __import__(module, fromlist=["CLI_COMMANDS"])
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            continue
        for name, spec in getattr(mod, "CLI_COMMANDS", {}).items():
            register_command(name, *spec)


if __name__ == "__main__":
    sys.exit(main())
