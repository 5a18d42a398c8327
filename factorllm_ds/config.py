"""Typed configs for each command; the CLI flags and their help come from these fields.

Validation happens once, up front, before any disk or process-group work: every problem
is collected and reported together, each naming its flag. Every command's config has one
contract for it: ``cfg.validate(<what the flags are judged against>)`` returns the resolved
copy the command runs with (defaults filled in, the MoE shape built) or raises one UserError.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from factorllm_ds.errors import UserError
from factorllm_ds.finite import parse_finite_float
from factorllm_ds.hf_model.configuration_factorllm import ROUTING_MODES, FactorLLMConfig, default_combine_scale
from factorllm_ds.hf_model.modeling_factorllm import PRIOR_TARGETS
from factorllm_ds.keys import SUPPORTED_FAMILIES
from factorllm_ds.shape import MoEShape, shape_problems
from factorllm_ds.split import SPLIT_METHODS
from factorllm_ds.structure import IMPORTANCE_KINDS, ROUTER_FITS, parse_shared

PRIOR_TEACHERS = ("frozen", "self", "none")  # the first is the default (the paper's)
MAX_SHARD_SIZE = "2GB"  # default largest output shard of convert and export
BALANCE_KINDS = ("paper", "switch", "bias")
ROUTER_GRADS = ("none", "straight-through")  # the first is the default (docs/method.md §5)
ROUTER_INITS = ("normal", "prior")
DISTILL_WEIGHT = 1.0  # --distill-weight default with a --teacher (docs/method.md §5)
REFIT_DOWN_RIDGE = 4.0  # --refit-down default with a fitted router (docs/method.md §4)
CONVERT_DEVICE = "cpu"  # convert --device default: the output's bytes do not depend on the machine (docs/cluster.md)
TRAIN_SEQ_LEN = 1024  # train --seq-len default, which plan assumes too
CALIB_TOKENS, CALIB_SEQ_LEN = 4096, 512  # calibration defaults of convert and prune
# The MoE shape's defaults are the shipped model config's (which may import nothing from here).
MODEL_DEFAULTS = {name: p.default for name, p in inspect.signature(FactorLLMConfig.__init__).parameters.items()}


def arg(help: str, choices: tuple | None = None, flag: str | None = None, **kw) -> Any:
    """A dataclass field that becomes a CLI flag; ``help`` is its documentation."""
    defaults = {name: kw.pop(name) for name in ("default", "default_factory") if name in kw}
    return field(**defaults, metadata={"help": help, "choices": choices, "flag": flag, **kw})


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of ``cls``; required when the field has no default."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        kind = hints[f.name]
        if get_origin(kind) is not None and type(None) in get_args(kind):  # Optional[X]
            kind = next(a for a in get_args(kind) if a is not type(None))
        required = f.metadata.get("required") or (
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        default_note = "" if required or default is None or default is False else f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"] + default_note, "default": default}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(kind) is list:
            kwargs.update(nargs="+", type=get_args(kind)[0], required=required)
        else:
            # float flags refuse nan/inf at parse time: they would pass every `x > 0` check after it
            kwargs.update(type=parse_finite_float if kind is float else kind, required=required,
                          choices=f.metadata.get("choices") or None)
        parser.add_argument(flag_of(f), **kwargs)


def from_namespace(cls: type, ns: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(ns).items() if k in names})


# The ranges numeric flags are checked against: name -> (the error's wording, the test).
BOUNDS = {"finite > 0": ("must be a finite number > 0", lambda v: math.isfinite(v) and v > 0),
          "finite >= 0": ("must be a finite number >= 0", lambda v: math.isfinite(v) and v >= 0),
          "in [0, 1)": ("must be in [0, 1)", lambda v: 0 <= v < 1),
          ">= 1": ("must be >= 1", lambda v: v >= 1),
          ">= 0": ("must be >= 0", lambda v: v >= 0)}


def bound_problems(config, bounds: dict[str, str]) -> list[str]:
    """'--flag value: must be ...' for each field named in ``bounds`` (field name -> a :data:`BOUNDS` key)
    that is set (not None) and out of its range."""
    problems = []
    for name, bound in bounds.items():
        value = getattr(config, name)
        requirement, valid = BOUNDS[bound]
        if value is not None and not valid(value):
            problems.append(f"--{name.replace('_', '-')} {value}: {requirement}")
    return problems


def fail_if(problems: list[str], what: str) -> None:
    if problems:
        raise UserError(f"{what}:\n  - " + "\n  - ".join(problems))


@dataclass
class MoEFlags:
    """The flags that choose the MoE shape and its routing (convert's); the shape itself is shape.MoEShape."""

    num_experts: int = arg("E: experts per MoE layer; must divide the FFN intermediate size",
                           default=MODEL_DEFAULTS["num_experts"])
    top_k: int = arg("k: experts active per token (1 <= k <= E)", default=MODEL_DEFAULTS["num_experts_per_tok"])
    routing: str = arg("hard: fixed weight s on each selected expert (paper); softmax: renormalized top-k "
                       "probabilities times s (exports to Mixtral / Qwen2-MoE)", choices=ROUTING_MODES,
                       default=MODEL_DEFAULTS["routing"])
    combine_scale: float | None = arg("s, the combine scale; default E/k for hard, E for softmax", default=None)
    router_bias: bool | None = arg("router is W x + b (paper) instead of W x; default: off with a shared expert "
                                   "(a trained bias bought nothing and keeps the model out of the standard MoE "
                                   "formats, bench/RESULTS.md 'Serving') and for softmax; on for the paper's hard "
                                   "routing without one", default=None)

    def routing_problems(self) -> list[str]:
        """Problems of s and the router bias (the shape's own rules are shape.shape_problems)."""
        problems = bound_problems(self, {"combine_scale": "finite > 0"})
        # s weighs each selected expert's output. s = E already gives one expert, 1/E of the FFN's neurons, the whole
        # dense FFN's weight (the largest default: E/k with k = 1, or E for softmax); a larger s only amplifies the
        # FFN beyond anything the dense model produced (1e38 overflows to inf: a model at chance), so it is refused.
        if (self.combine_scale is not None and self.num_experts >= 1 and math.isfinite(self.combine_scale)
                and self.combine_scale > self.num_experts):
            problems.append(f"--combine-scale {self.combine_scale:g}: must be at most --num-experts "
                            f"({self.num_experts}); the default is E/k for hard routing, E for softmax")
        if self.routing == "softmax" and self.router_bias:
            problems.append("--router-bias with --routing softmax: a Mixtral/Qwen2-MoE router has no bias, so the "
                            "model could not be exported; drop --router-bias")
        return problems

    def resolved_scale(self, num_shared: int = 0) -> float:
        # Measured best with a shared expert: every selected routed expert adds its output as is (docs/method.md).
        if self.combine_scale is None and num_shared and self.routing == "hard":
            return 1.0
        return default_combine_scale(self.routing, self.num_experts, self.top_k, self.combine_scale)

    def resolved_router_bias(self, num_shared: int = 0) -> bool:
        if self.router_bias is not None:
            return self.router_bias
        return self.routing == "hard" and not num_shared

    def shape_for(self, dense_config: dict, num_shared: int = 0) -> MoEShape:
        """The MoE shape these flags make of the dense model of ``dense_config``, ``num_shared`` of its FFN's neurons
        in the shared expert. Its scale means something only once shape_problems accepts it (k >= 1)."""
        return MoEShape(num_experts=self.num_experts, top_k=self.top_k,
                        intermediate_size=dense_config.get("intermediate_size"), shared_size=num_shared,
                        hidden_size=dense_config.get("hidden_size"), num_layers=dense_config.get("num_hidden_layers"),
                        routing=self.routing, scale=self.resolved_scale(num_shared) if self.top_k >= 1 else 0.0,
                        router_bias=self.resolved_router_bias(num_shared))


@dataclass
class Objective:
    """The training objective, (1 - w) CE + w KL(teacher || model) + alpha * sum L_PA + beta * sum L_bal; shared
    by train and the DeepSpeed model (w = 0 without a teacher)."""

    distill_weight: float | None = arg("w: with --teacher, the share of the next-token loss taken by the KL "
                                       "divergence from the teacher's distribution (the rest is CE on --data). "
                                       f"Default: {DISTILL_WEIGHT:g} with --teacher (pure distillation, "
                                       "docs/method.md), else 0",
                                       default=None)

    pa_weight: float = arg("alpha: weight of the Prior-Approximate loss (summed over layers)", default=0.05)
    balance_weight: float = arg("beta: weight of the balance loss (summed over layers)", default=0.01)
    balance_kind: str = arg("paper: mean sum top-k p; switch: Switch/GShard l_aux; bias: no balance loss, a "
                            "per-expert bias on the selection logits nudged after each step towards equal load "
                            "(DeepSeek-V3's auxiliary-loss-free rule; hard routing)", choices=BALANCE_KINDS,
                            default="paper")
    balance_bias_rate: float = arg("--balance-kind bias: how far each step moves an expert's selection bias (in "
                                   "logit units), up when under-loaded, down when over-loaded", default=1e-3)
    prior: str = arg("PA teacher: frozen (initial experts = dense FFN) or self (current experts, no grad); "
                     "none disables the PA loss", choices=PRIOR_TEACHERS, default=PRIOR_TEACHERS[0])
    prior_tau: float = arg("temperature of the PA prior softmax", default=1.0)
    router_grad: str = arg("how the next-token (or distillation) loss reaches a hard router: straight-through "
                           "(each selected expert's weight s is s * (1 + p - p.detach()): the forward is unchanged, "
                           "the backward gives the router the loss's gradient through the selected experts' "
                           "probabilities) or none (the paper: the PA loss alone trains the router)",
                           choices=ROUTER_GRADS, default=ROUTER_GRADS[0])
    prior_target: str | None = arg("what the PA prior picks: share (paper: the k experts each closest to their "
                                   "share t*k/E of the teacher output t) or subset (the k experts whose combined "
                                   "output is closest to t). Default: the model's config (set by convert)",
                                   choices=PRIOR_TARGETS, default=None)

    def for_model(self, model_config: dict):
        """This objective with the prior target resolved: the flag, else the model's config (set by convert)."""
        target = self.prior_target or model_config.get("prior_target") or PRIOR_TARGETS[0]
        return dataclasses.replace(self, prior_target=target)

    def resolved_distill_weight(self, has_teacher: bool) -> float:
        return (DISTILL_WEIGHT if has_teacher else 0.0) if self.distill_weight is None else self.distill_weight

    def objective_problems(self) -> list[str]:
        problems = bound_problems(self, {"pa_weight": "finite >= 0", "balance_weight": "finite >= 0"})
        if self.distill_weight is not None and not 0 <= self.distill_weight <= 1:  # also refuses nan and inf
            problems.append(f"--distill-weight {self.distill_weight}: must be a number in [0, 1]")
        return problems + bound_problems(self, {"balance_bias_rate": "finite >= 0", "prior_tau": "finite > 0"})


@dataclass
class ConvertConfig(MoEFlags):
    """factorllm-ds convert: a dense HF checkpoint folder -> a FactorLLM MoE folder."""

    model: Path = arg("dense Hugging Face model folder (safetensors)", default=None, required=True)
    out: Path = arg("output folder for the MoE checkpoint (must not exist, unless --overwrite)", default=None,
                    required=True)
    split: str = arg("how neurons are grouped into experts", choices=SPLIT_METHODS, default="contiguous")
    shared_neurons: str | None = arg("size of the always-on shared expert: a fraction of the FFN's neurons (0.25) or a "
                                     "count (384). It takes the most important neurons on --calib-data (see "
                                     "--importance); the routed experts split the rest. Default: none (the paper)",
                                     default=None)
    importance: str = arg("neuron importance that picks the shared neurons: contribution (mean |a_i| * "
                          "||W_down[:, i]||) or activation_rate (CMoE: share of tokens where the neuron is among the "
                          "top 10%% of activations)", choices=IMPORTANCE_KINDS, default=IMPORTANCE_KINDS[0])
    prior_target: str | None = arg("what the PA prior (and the oracle router) picks: share (paper: the k experts each "
                                   "closest to their share t*k/E of the dense output t) or subset (the k experts "
                                   "whose combined output is closest to t); stored in config.json, `train` follows "
                                   "it. Default: subset with a shared expert, else share", choices=PRIOR_TARGETS,
                                   default=None)
    router_init: str | None = arg("normal: N(0, 0.02), bias 0 (paper); prior: fitted on --calib-data, layer by layer "
                                  "on the hidden states of the already-converted layers, to the experts the PA prior "
                                  "(the oracle) picks, so the model is routed well before any training. Default: "
                                  "prior when --calib-data is given, else normal", choices=ROUTER_INITS, default=None)
    router_fit: str = arg("how --router-init prior sets each layer's router (docs/method.md §4): gate (each "
                          "expert's mean gate row, no data: it routes text of any domain alike), gate-w (the same, "
                          "each neuron weighted by the size of its term on the calibration text), picks (ridge "
                          "regression to the oracle's picks on the calibration text), gain / norm (ridge to each "
                          "expert's gain / output norm), lowrank (a rank-64 neuron-contribution predictor folded "
                          "into the router), local-picks / local-gain (each expert's row built from its own "
                          "neurons' gate and up rows)", choices=ROUTER_FITS, default=ROUTER_FITS[0])
    refit_down: float | None = arg("ridge strength d of the down-projection refit: after the router is fitted, each "
                                   "layer's down projection is refitted by ridge regression so that the routed FFN "
                                   "(shared + the router's picks) reproduces the dense FFN output on the calibration "
                                   "tokens; gate/up stay exact slices. 0 keeps exact slices (every expert on = the "
                                   "dense model, what `verify` checks). "
                                   f"Default: {REFIT_DOWN_RIDGE:g} with --router-init prior, else 0 (docs/method.md)",
                                   default=None)
    calib_data: list[Path] | None = arg(
        "calibration text (.txt/.jsonl/.json/.parquet/.csv) for --shared-neurons, --split coactivation and "
        "--router-init prior. Several files: an equal share of --calib-tokens from the start of each, so that the "
        "split, the router and the refit see every domain the model will serve (docs/method.md §4)", default=None)
    calib_tokens: int = arg("calibration tokens for --shared-neurons / --split coactivation / --router-init prior",
                            default=CALIB_TOKENS)
    calib_seq_len: int = arg("calibration sequence length", default=CALIB_SEQ_LEN)
    seed: int = arg("seed for the random split, k-means initialisation and router initialisation", default=0)
    max_shard_size: str = arg("largest output shard, e.g. 2GB or 500MB", default=MAX_SHARD_SIZE)
    overwrite: bool = arg("replace --out if it exists (only a folder convert or export wrote)", default=False)
    tokenizer: Path | None = arg("folder with the tokenizer files, when --model has none (e.g. the base model's "
                                 "folder); they are copied into --out", default=None)
    allow_nonfinite: bool = arg("convert even if a weight holds NaN or Inf (by default the first one is an "
                                "error)", default=False)
    device: str = arg("where the calibrated steps run (calibration forward, importance, co-activation split, "
                      "oracle, router fit, down refit), one decoder layer at a time: cpu, cuda, cuda:N or auto (cuda "
                      "when available). The weights stream from disk and the output is written from host memory "
                      "either way; the GPU holds one layer and the calibration activations (docs/cluster.md). cpu, "
                      "the default, gives the same bytes on every machine; cuda agrees with it within the tolerance "
                      "docs/cluster.md states. Without calibration there is nothing to compute",
                      default=CONVERT_DEVICE)
    shape: MoEShape | None = field(default=None)  # resolved by validate() from the flags and --model; not a flag

    def needs_calibration(self) -> bool:
        return self.split == "coactivation" or self.router_init == "prior" or bool(self.shared_neurons)

    def _shared_problems(self, intermediate_size: int | None) -> tuple[list[str], int]:
        if not self.shared_neurons or intermediate_size is None:
            return [], 0
        try:
            num_shared = parse_shared(self.shared_neurons, intermediate_size)
        except ValueError as err:
            return [f"--shared-neurons {self.shared_neurons}: {err}"], 0
        problems = []
        if self.calib_data is None:
            problems.append("--shared-neurons picks the most important neurons on calibration text: pass "
                            "--calib-data FILE")
        if intermediate_size - num_shared < max(self.num_experts, 1):
            problems.append(f"--shared-neurons {self.shared_neurons} = {num_shared} neurons leaves "
                            f"{intermediate_size - num_shared} routed neurons for {self.num_experts} experts; "
                            "use a smaller shared part or fewer experts")
        return problems, num_shared

    def validate(self, dense_config: dict) -> ConvertConfig:
        """Every problem at once (one error); returns the resolved copy convert runs with."""
        problems = dense_model_problems(dense_config, self.model)
        intermediate = dense_config.get("intermediate_size")
        shared_problems, num_shared = self._shared_problems(intermediate)
        shape = self.shape_for(dense_config, num_shared)
        problems += shared_problems or shape_problems(shape) + self.routing_problems()
        router_init = self.router_init or ("prior" if self.calib_data is not None else "normal")
        for flag, needs in (("--split coactivation", self.split == "coactivation"),
                            ("--router-init prior", router_init == "prior")):
            if needs and self.calib_data is None:
                problems.append(f"{flag} needs calibration text: pass --calib-data FILE")
        calib_data = calib_files(self.calib_data)
        problems += calibration_problems(calib_data, self.calib_tokens, self.calib_seq_len)
        refit = (REFIT_DOWN_RIDGE if router_init == "prior" else 0.0) if self.refit_down is None else self.refit_down
        if not (math.isfinite(refit) and refit >= 0):
            problems.append(f"--refit-down {self.refit_down}: must be a finite number >= 0 (0 keeps exact slices)")
        elif refit and router_init != "prior":
            problems.append(f"--refit-down {self.refit_down} refits the experts to the fitted router's picks: it "
                            "needs --router-init prior and --calib-data FILE (or pass --refit-down 0)")
        problems += output_problems(self.out, self.model, self.overwrite, self.max_shard_size)
        device = resolved_device(self.device, problems)
        fail_if(problems, "convert: bad arguments")
        target = self.prior_target or ("subset" if num_shared else "share")
        return dataclasses.replace(self, router_init=router_init, shape=shape, refit_down=refit,
                                   prior_target=target, device=device, calib_data=calib_data)


def calibration_problems(calib_data: list[Path] | None, calib_tokens: int, calib_seq_len: int) -> list[str]:
    """What is wrong with --calib-data (resolved by :func:`calib_files`), --calib-tokens and --calib-seq-len, for
    the commands that calibrate (convert, prune)."""
    problems = [f"--calib-data {path}: no such file" for path in calib_data or () if not path.is_file()]
    if calib_data is not None and len(set(map(_resolved_path, calib_data))) < len(calib_data):
        problems.append("--calib-data names one file twice; pass each file once")
    if calib_tokens < 1 or calib_seq_len < 2:
        problems.append("--calib-tokens must be >= 1 and --calib-seq-len >= 2")
    elif calib_data and calib_tokens // min(calib_seq_len, calib_tokens) < len(calib_data):
        problems.append(f"--calib-tokens {calib_tokens} makes fewer sequences of --calib-seq-len "
                        f"{calib_seq_len} than the {len(calib_data)} --calib-data files: each file gives "
                        "whole sequences; raise --calib-tokens or lower --calib-seq-len")
    return problems


def output_problems(out: Path | None, model: Path | None, overwrite: bool, max_shard_size: str) -> list[str]:
    """What is wrong with a model-writing command's --out (beside --model) and --max-shard-size."""
    problems = []
    try:
        parse_size(max_shard_size)
    except ValueError as err:
        problems.append(f"--max-shard-size {max_shard_size!r}: {err}")
    if out is not None and Path(out).exists() and not overwrite:
        problems.append(f"--out {out} already exists; choose another path or pass --overwrite")
    if out is not None and model is not None and Path(out).resolve() == Path(model).resolve():
        problems.append("--out must differ from --model")
    return problems


def resolved_device(device: str, problems: list[str]) -> str:
    """--device resolved (auto -> cuda or cpu), or its problem appended to ``problems`` and ``device`` returned."""
    from factorllm_ds.modeling import resolve_device  # imports transformers: only when a command runs

    try:
        return str(resolve_device(device))
    except UserError as err:
        problems.append(str(err))
        return device


def dense_model_problems(dense_config: dict, model: Path) -> list[str]:
    """What keeps ``--model`` (its config.json read as ``dense_config``) from being a dense model convert and prune
    take: a FactorLLM checkpoint, or an architecture without the SwiGLU MLP they split."""
    model_type = dense_config.get("model_type")
    if model_type == "factorllm":
        return [f"--model {model} is already a FactorLLM checkpoint; pass the dense model"]
    if model_type not in SUPPORTED_FAMILIES:
        arch = ",".join(dense_config.get("architectures") or ["?"])
        return [f"--model {model}: unsupported architecture {arch} (model_type {model_type!r}). "
                f"Supported: {', '.join(SUPPORTED_FAMILIES.values())} (SwiGLU gate/up/down MLP)"]
    return []


def jsonable(value):
    """A setting as a manifest or settings file records it: paths (one, or a list such as --calib-data's) as text."""
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def calib_files(calib_data: str | Path | Sequence[str | Path] | None) -> list[Path] | None:
    """``--calib-data`` as a list of paths (the Python API also takes one path)."""
    if calib_data is None:
        return None
    return [Path(calib_data)] if isinstance(calib_data, (str, Path)) else [Path(p) for p in calib_data]


def calib_inputs(calib_data: str | Path | Sequence[str | Path] | None) -> dict[str, Path]:
    """``--calib-data``'s files as the inputs an output must not overwrite (outputs.check_output), each under the
    flag, numbered when there are several."""
    files = calib_files(calib_data) or []
    return {"--calib-data" + (f" (file {i + 1})" if len(files) > 1 else ""): p for i, p in enumerate(files)}


def _resolved_path(path: Path) -> Path:
    return path.resolve() if path.exists() else path


# No disk or memory holds more: a larger size is a slip of the keyboard (and 1e400 is no float at all).
MAX_BYTES = 2**63 - 1


def size_bytes(number: str, unit: int, example: str) -> int:
    """``number`` (text) times ``unit``, as whole bytes. ValueError saying why (``example`` shows the form) when
    ``number`` is not a number or the size is beyond :data:`MAX_BYTES`, overflow (``1e400``) and inf included;
    negative sizes pass, for the caller to word."""
    try:
        value = float(number) * unit
    except ValueError:
        raise ValueError(f"expected a size like {example}") from None
    if math.isnan(value):
        raise ValueError(f"expected a size like {example}")
    if abs(value) > MAX_BYTES:
        raise ValueError("too large: no disk or memory holds more than 9.2 EB (2**63 bytes)")
    return int(value)


def parse_size(text: str) -> int:
    """``2GB``, ``500MB``, ``1GiB``, ``4096`` -> bytes (KB/MB/GB/TB in powers of 1000, KiB/MiB/GiB of 1024).

    ValueError saying why for anything but a positive size up to :data:`MAX_BYTES`; callers prefix the flag.
    """
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    unit = next((u for u in sorted(units, key=len, reverse=True) if t.endswith(u)), "")
    size = size_bytes(t[: len(t) - len(unit)], units.get(unit, 1), "2GB or 500MB")
    if size <= 0:
        raise ValueError("must be a positive size, e.g. 2GB or 500MB")
    return size
