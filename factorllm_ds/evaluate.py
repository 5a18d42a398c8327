"""eval: windowed perplexity, per-layer expert usage and a greedy sample, for a dense or FactorLLM folder.

Perplexity: the text files are joined (blank line between files), tokenized with the model
folder's tokenizer (no special tokens added) and cut into non-overlapping windows of
``--seq-len`` tokens; the tail shorter than a window is dropped. Each window is scored on
its own (no context carried over), over its ``seq_len - 1`` next-token predictions, and
``ppl = exp(total NLL / predicted tokens)``.

Expert usage: every MoE block counts, per expert, the tokens routed to it during the
perplexity passes (all ``seq_len`` positions of every window, so each layer's counts sum
to ``windows * seq_len * k``); ``shares`` divides by that sum.

Router overrides (``--router``), for analysis of a FactorLLM model:
``learned`` the model's router; ``random`` k experts drawn uniformly per token (seeded);
``oracle`` per token, the PA prior's choice of docs/method.md §4 under the model's
``prior_target`` (``share``: the k experts whose outputs are closest to their share k/E of
the teacher ``t``; ``subset``: the k experts whose combined output is closest to t). Here
the teacher is the sum of all the model's *current* experts (the ``self`` prior), not the
frozen original FFN: the two agree until the experts are trained, and only the former is
available from a folder alone.
The oracle computes every expert on every token, so it is slow and says nothing about speed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import textwrap
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from factorllm_ds import __version__
from factorllm_ds.config import arg, bound_problems, fail_if
from factorllm_ds.data import read_text
from factorllm_ds.errors import UserError
from factorllm_ds.hf_io import check_model_folder, check_token_ids, load_tokenizer, read_config, text_config
from factorllm_ds.modeling import DEVICE_DEFAULT, DTYPE_CHOICES, resolve_device
from factorllm_ds.outputs import FILE_MARKER, atomic_file, check_output_file, write_text_atomic
from factorllm_ds.shape import MODEL_WORDING, MoEShape, seq_len_problems, shape_problems

ROUTERS = ("learned", "oracle", "random")  # the first is the default


@dataclass
class EvalConfig:
    """factorllm-ds eval: perplexity, expert usage and a greedy sample of a dense or FactorLLM model."""

    model: Path = arg("model folder: a FactorLLM folder or a dense Hugging Face model", default=None, required=True)
    data: list[Path] = arg("text files: .txt, or .jsonl with a 'text' field per line", default=None,
                           required=True)
    seq_len: int = arg("tokens per perplexity window (non-overlapping windows of the joined text)", default=512)
    max_windows: int | None = arg("score at most this many windows (default: all)", default=None)
    batch_size: int = arg("windows per forward pass", default=4)
    top_k: int | None = arg("FactorLLM only: experts per token at evaluation (default: the model's k); a 'hard' "
                            "model with the default scale uses E/k for the new k", default=None)
    router: str = arg("FactorLLM only: who picks the experts: learned router, oracle (the PA prior's pick against "
                      "the sum of all current experts, per the model's prior_target; slow, every expert runs) or "
                      "random (seeded)",
                      choices=ROUTERS, default=ROUTERS[0])
    seed: int = arg("seed of --router random", default=0)
    recall: bool = arg("FactorLLM with the learned router: also measure, per layer, the share of the oracle's k "
                       "experts that the router picks on these tokens (slow: every expert runs)", default=False)
    dtype: str = arg("dtype the model runs in", choices=DTYPE_CHOICES, default=DTYPE_CHOICES[0])
    device: str = arg("device: cpu, cuda, cuda:1, ... or auto (cuda when available)", default=DEVICE_DEFAULT)
    report: Path | None = arg("write the full JSON report here", default=None)
    plot: Path | None = arg("FactorLLM only: save a layers x experts usage heatmap (PNG; needs matplotlib)",
                            default=None)
    tokenizer: Path | None = arg("folder with the tokenizer files, when --model has none (default: --model)",
                                 default=None)
    prompt: str = arg("prompt of the greedy generated sample", default="Once upon a time")
    sample_tokens: int = arg("new tokens in the greedy sample (0: no sample)", default=32)
    shape: MoEShape | None = field(default=None)  # --model's, resolved by validate() (None: a dense model); not a flag

    def validate(self, model_config: dict) -> EvalConfig:
        """Check every flag against the model folder's config.json; returns the resolved config, whose ``shape`` is
        the model's MoE shape (None: a dense model)."""
        is_moe = model_config.get("model_type") == "factorllm"
        problems = [f"--data {path}: no such file" for path in self.data or [] if not Path(path).is_file()]
        # train's rule: at most the model's positions
        problems += seq_len_problems(self.seq_len, text_config(model_config).get("max_position_embeddings"))
        problems += bound_problems(self, {"max_windows": ">= 1", "batch_size": ">= 1", "sample_tokens": ">= 0"})
        # Output files first: a report that cannot be written must not cost an evaluation. An existing one is
        # replaced only if eval wrote it (outputs.check_output_file).
        inputs = {"--model": self.model, "--tokenizer": self.tokenizer,
                  **{"--data" if i == 0 else f"--data (file {i + 1})": p for i, p in enumerate(self.data or [])}}
        for flag, path in (("--report", self.report), ("--plot", self.plot)):
            try:
                check_output_file(path, flag, inputs)
            except UserError as err:
                problems.append(str(err))
        if self.plot is not None and importlib.util.find_spec("matplotlib") is None:
            problems.append("--plot needs matplotlib: pip install 'factorllm-ds[plot]' (or matplotlib)")
        shape = MoEShape.of_config(model_config) if is_moe else None
        if is_moe:
            if self.top_k is not None:
                problems += shape_problems(replace(shape, top_k=self.top_k), MODEL_WORDING)
            if self.recall and self.router != "learned":
                problems.append(f"--recall measures the learned router against the oracle; drop --router "
                                f"{self.router} (or --recall)")
        else:
            for flag, value, default in (("--top-k", self.top_k, None), ("--router", self.router, ROUTERS[0]),
                                         ("--plot", self.plot, None), ("--recall", self.recall, False)):
                if value != default:
                    problems.append(f"{flag} applies to FactorLLM models only; --model {self.model} is a dense "
                                    f"{model_config.get('model_type')!r} model (no experts)")
        fail_if(problems, "eval: bad arguments")
        return replace(self, shape=shape)


# ---------------------------------------------------------------------------------------------
# Pieces other modules call


def token_windows(token_ids: list[int] | torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [N, seq_len] of a token stream; the short tail is dropped."""
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    num = ids.numel() // seq_len
    if max_windows is not None:
        num = min(num, max_windows)
    return ids[: num * seq_len].view(num, seq_len)


@torch.no_grad()
def window_nll(model, token_windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> tuple[float, int]:
    """(summed next-token NLL, predicted tokens) of ``model`` over windows [N, L], each scored alone."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    total, count = 0.0, 0
    starts = range(0, token_windows.shape[0], batch_size)
    for start in tqdm(starts, desc="perplexity", unit="batch", disable=not progress):
        ids = token_windows[start:start + batch_size].to(device)
        logits = model(input_ids=ids).logits
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                              reduction="sum").item()
        if not math.isfinite(nll):
            raise UserError(f"the loss is {nll} on windows {start}..{start + ids.shape[0] - 1}: "
                            f"{first_nonfinite_output(model, ids)}. The weights or the dtype overflow; check the "
                            "model (a float32 run, --dtype float32, tells the two apart).")
        total += nll
        count += ids[:, 1:].numel()
    return total, count


@torch.no_grad()
def first_nonfinite_output(model, ids: torch.Tensor) -> str:
    """Which part of ``model`` first outputs NaN/Inf on ``ids``: the embeddings, decoder layer L, or the head."""
    inner = getattr(model, "model", model)
    parts = [("the embeddings (model.embed_tokens)", getattr(inner, "embed_tokens", None))]
    parts += [(f"decoder layer {i} (model.layers.{i})", layer) for i, layer in enumerate(getattr(inner, "layers", []))]
    parts += [("the final norm (model.norm)", getattr(inner, "norm", None)),
              ("the output head (lm_head)", getattr(model, "lm_head", None))]
    found: list[str] = []

    def hook(name):
        def check(module, args, output):
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            if not found and isinstance(tensor, torch.Tensor) and not bool(torch.isfinite(tensor).all()):
                found.append(name)
        return check

    handles = [module.register_forward_hook(hook(name)) for name, module in parts if module is not None]
    try:
        model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return (f"the first non-finite output is {found[0]}" if found
            else "every layer's output is finite (the loss overflows)")


def perplexity(model, token_windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over windows [N, L] (a tensor or a list of equal-length token lists)."""
    windows = torch.as_tensor(token_windows, dtype=torch.long)
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"perplexity needs windows [N >= 1, L >= 2], got shape {tuple(windows.shape)}")
    total, count = window_nll(model, windows, batch_size)
    return math.exp(total / count)


@contextmanager
def count_expert_usage(model):
    """Count routed tokens per layer and expert while the body runs; yields a dict filled on exit
    with ``counts`` [layers][experts] (ints)."""
    blocks = model.moe_blocks()
    for block in blocks:
        block.usage_counts = torch.zeros(block.num_experts, dtype=torch.long)
    result: dict = {}
    try:
        yield result
    finally:
        result["counts"] = [block.usage_counts.tolist() for block in blocks]
        for block in blocks:
            block.usage_counts = None


@contextmanager
def oracle_recall(model, enabled: bool = True):
    """While the body runs, each MoE block also computes the oracle's k experts (docs/method.md §4: the subset
    of its current experts closest to their sum, as ``--router oracle`` picks them) on its own inputs and counts
    how many of them its router picked. Yields a dict filled on exit with ``per_layer`` recall and ``mean``."""
    from factorllm_ds.hf_model.modeling_factorllm import prior_topk, prior_weight

    result: dict = {}
    if not enabled:
        yield result
        return
    blocks = model.moe_blocks()
    hits = [[0.0, 0] for _ in blocks]

    def hook(layer: int):
        def count(block, args):
            x_TH = args[0].reshape(-1, args[0].shape[-1])
            with torch.no_grad():
                picked_TK = block.select(x_TH)[0]
                out_ETH = block.experts.all_outputs(x_TH)
                oracle_TK = prior_topk(out_ETH, out_ETH.sum(dim=0), block.top_k, block.prior_target,
                                       prior_weight(block.routing, block.scale, block.top_k))
            hits[layer][0] += float((picked_TK.unsqueeze(-1) == oracle_TK.unsqueeze(-2)).any(dim=-1).sum())
            hits[layer][1] += oracle_TK.numel()
        return count

    handles = [block.register_forward_pre_hook(hook(i)) for i, block in enumerate(blocks)]
    try:
        yield result
    finally:
        for handle in handles:
            handle.remove()
        result["per_layer"] = [h / n if n else None for h, n in hits]
        done = [r for r in result["per_layer"] if r is not None]
        result["mean"] = sum(done) / len(done) if done else None


def usage_report(counts: list[list[int]], top_k: int, tokens: int) -> dict:
    """Counts and shares per layer; each layer's counts sum to ``tokens * top_k``, shares to 1."""
    totals = [sum(row) for row in counts]
    shares = [[c / total if total else 0.0 for c in row] for row, total in zip(counts, totals)]
    return {"tokens": tokens, "top_k": top_k, "counts": counts, "shares": shares,
            "max_share": max((max(r) for r in shares), default=0.0),
            "min_share": min((min(r) for r in shares), default=0.0)}


def plot_usage(shares: list[list[float]], path: Path, title: str) -> Path:
    """A layers x experts heatmap of routing shares, saved as PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise UserError("--plot needs matplotlib: pip install 'factorllm-ds[plot]' (or matplotlib)") from err
    data = torch.tensor(shares)
    num_layers, num_experts = data.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * num_experts + 2), max(3.0, 0.25 * num_layers + 1.5)))
    im = ax.imshow(data.numpy(), aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(num_experts))
    ax.set_yticks(range(0, num_layers, max(1, num_layers // 16)))
    # Narrow figures (few experts) would cut a long title: wrap it to the figure's width.
    ax.set_title("\n".join(textwrap.wrap(title, width=int(fig.get_figwidth() * 9))), fontsize=9)
    fig.colorbar(im, ax=ax, label="share of routed tokens")
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_file(path, "--plot") as tmp:
            fig.savefig(tmp, format="png", dpi=120, metadata={"Software": FILE_MARKER.decode()})  # marks it as ours
    finally:
        plt.close(fig)
    return path


@torch.no_grad()
def greedy_sample(model, tokenizer, prompt: str, new_tokens: int) -> dict:
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt")
    ids = enc["input_ids"].to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(input_ids=ids, attention_mask=enc["attention_mask"].to(device), max_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=pad)
    new = out[0, ids.shape[1]:]
    return {"prompt": prompt, "completion": tokenizer.decode(new, skip_special_tokens=True),
            "new_tokens": int(new.numel())}


def load_eval_model(model_dir: Path, is_moe: bool, dtype: torch.dtype, device: torch.device):
    from factorllm_ds.modeling import load_dense, load_moe

    model = load_moe(model_dir, dtype) if is_moe else load_dense(model_dir, dtype, flag="--model")
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# The command


def evaluate(cfg: EvalConfig, progress: bool = True) -> dict:
    """Run the whole evaluation and return the report (also written to ``cfg.report`` if set)."""
    from factorllm_ds.modeling import DTYPES

    started = time.time()
    model_config = read_config(cfg.model, "--model")
    cfg = cfg.validate(model_config)
    is_moe = cfg.shape is not None
    check_model_folder(cfg.model, "--model", model_config)  # shards and shapes, before any text is read
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer, "--model", model_config)  # its ids must fit the vocabulary
    text = read_text(cfg.data, "--data")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    check_token_ids(max(ids, default=-1), tokenizer, model_config, f"--model {cfg.model}", tokenizer.factorllm_desc)
    windows = token_windows(ids, cfg.seq_len, cfg.max_windows)
    if windows.shape[0] == 0:
        raise UserError(f"--data {' '.join(map(str, cfg.data))}: {len(ids)} tokens, shorter than one window of "
                        f"--seq-len {cfg.seq_len}. Pass more text or a smaller --seq-len.")
    model = load_eval_model(cfg.model, is_moe, DTYPES[cfg.dtype], device)

    # The first key marks the file as this tool's: a later eval may replace it (outputs.check_output_file).
    report: dict = {FILE_MARKER.decode(): __version__, "model": str(cfg.model),
                    "kind": "factorllm" if is_moe else model.config.model_type, "data": [str(p) for p in cfg.data],
                    "seq_len": cfg.seq_len, "windows": int(windows.shape[0]), "text_tokens": len(ids),
                    "dtype": cfg.dtype, "device": str(device)}
    if is_moe:
        if cfg.top_k is not None:
            model.set_top_k(cfg.top_k)
        model.set_router_override(cfg.router, seed=cfg.seed)
        block = model.moe_blocks()[0]
        report["moe"] = {"num_experts": block.num_experts, "top_k": block.top_k, "routing": block.routing,
                         "combine_scale": block.scale, "router": cfg.router,
                         "seed": cfg.seed if cfg.router == "random" else None,
                         "oracle_teacher": "sum of all current experts" if cfg.router == "oracle" else None,
                         "oracle_target": block.prior_target if cfg.router == "oracle" else None}
    with (count_expert_usage(model) if is_moe else nullcontext()) as usage, \
            oracle_recall(model, is_moe and cfg.recall) as recall:
        total, count = window_nll(model, windows, cfg.batch_size, progress)
    if is_moe:
        report["expert_usage"] = usage_report(usage["counts"], block.top_k, windows.numel())
        if cfg.recall:
            report["router_recall"] = recall
    report.update(nll_per_token=total / count, perplexity=math.exp(total / count), tokens_scored=count)
    if is_moe and cfg.plot is not None:
        title = (f"{Path(cfg.model).name}: expert usage, k={block.top_k}/{block.num_experts}, router {cfg.router}, "
                 f"{windows.numel()} tokens")
        report["plot"] = str(plot_usage(report["expert_usage"]["shares"], cfg.plot, title))
    if cfg.sample_tokens > 0:
        report["sample"] = greedy_sample(model, tokenizer, cfg.prompt, cfg.sample_tokens)
    report["seconds"] = round(time.time() - started, 3)
    report["settings"] = {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
                          for k, v in asdict(cfg).items()}
    if cfg.report is not None:  # whole or not at all: a full disk leaves the previous report, not an empty file
        write_text_atomic(cfg.report, json.dumps(report, indent=2) + "\n", "--report")
    return report


def summary_lines(report: dict) -> list[str]:
    lines = [f"perplexity {report['perplexity']:.4g} over {report['windows']} windows x {report['seq_len']} tokens "
             f"({report['tokens_scored']} predicted tokens)"]
    if "moe" in report:
        m, u = report["moe"], report["expert_usage"]
        lines.append(f"experts: k={m['top_k']}/{m['num_experts']}, routing {m['routing']}, "
                     f"scale {m['combine_scale']:g}, router {m['router']}; usage share per expert "
                     f"{u['min_share']:.3f} .. {u['max_share']:.3f} (uniform {1 / m['num_experts']:.3f})")
    if report.get("router_recall", {}).get("mean") is not None:
        lines.append(f"router recall of the oracle's experts: {report['router_recall']['mean']:.3f} (mean over layers)")
    if "sample" in report:
        lines.append(f"sample: {report['sample']['prompt']!r} -> {report['sample']['completion']!r}")
    if "plot" in report:
        lines.append(f"usage heatmap: {report['plot']}")
    return lines


def run_command(cfg: EvalConfig) -> int:
    print("\n".join(summary_lines(evaluate(cfg))))
    if cfg.report is not None:
        print(f"report: {cfg.report}")
    return 0
