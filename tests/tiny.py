"""Tiny random dense models and converted MoE folders, for tests in any file.

Plain functions (no pytest) so that fixtures, other test modules and ad-hoc scripts can
build the same models: ``import tiny`` (conftest puts tests/ on ``sys.path``), then
``tiny.build_dense(dir, "llama")`` or ``tiny.build_tiny_moe(dir, dense_dir)``.

Every dense model is saved with ``max_shard_size="100KB"``, so it is split over several
safetensors shards with an index, and carries a real 32,000-piece LLaMA tokenizer
(vocab size 32,000 to match).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

VOCAB = 32000
HIDDEN = 64
FAMILIES = ("llama", "mistral", "qwen2")

# Per family: what makes it a distinct test case (FFN width, depth, tied embeddings, dtype).
SPECS: dict[str, dict] = {
    "llama": dict(intermediate_size=128, num_hidden_layers=2, tie_word_embeddings=False, dtype=torch.float32),
    "mistral": dict(intermediate_size=256, num_hidden_layers=3, tie_word_embeddings=False, dtype=torch.float32),
    "qwen2": dict(intermediate_size=128, num_hidden_layers=2, tie_word_embeddings=True, dtype=torch.bfloat16),
}


def dense_config(family: str, **overrides):
    """A transformers config of ``family`` with the tiny shape (overrides win)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    spec = {k: v for k, v in SPECS[family].items() if k != "dtype"}
    kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=None, **spec)
    kw.update(overrides)
    return cls(**kw)


def tokenizer_dir() -> Path:
    from factorllm_ds.assets import llama_tokenizer_dir

    return llama_tokenizer_dir()


def copy_tokenizer(dst: Path) -> None:
    for f in tokenizer_dir().iterdir():
        if f.is_file():
            shutil.copy2(f, Path(dst) / f.name)


def build_dense(out_dir: Path, family: str = "llama", *, seed: int = 0, dtype: torch.dtype | None = None,
                max_shard_size: str = "100KB", tokenizer: bool = True, **overrides) -> Path:
    """Save a random dense ``family`` model (several shards + index) to ``out_dir``; returns it."""
    from transformers import AutoModelForCausalLM

    config = dense_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model = model.to(dtype or SPECS[family]["dtype"]).eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    if tokenizer:
        copy_tokenizer(out_dir)
    return out_dir


def convert_tiny(dense_dir: Path, out_dir: Path, **settings) -> Path:
    """Run the converter in-process (no progress bar); ``settings`` are ConvertConfig fields."""
    from factorllm_ds.config import ConvertConfig
    from factorllm_ds.convert import convert

    return convert(ConvertConfig(model=Path(dense_dir), out=Path(out_dir), **settings), progress=False)


def build_tiny_moe(out_dir: Path, dense_dir: Path, *, num_experts: int = 4, top_k: int = 2,
                   routing: str = "hard", **settings) -> Path:
    """The standard tiny FactorLLM checkpoint: ``dense_dir`` split into E=4 experts, k=2, hard routing."""
    return convert_tiny(dense_dir, out_dir, num_experts=num_experts, top_k=top_k, routing=routing, **settings)


def build_qwen3_dense(out_dir: Path) -> Path:
    """A tiny fp32 Qwen3 (q/k norms, head_dim 24 != hidden / heads) with the test tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24)
    Qwen3ForCausalLM(config).save_pretrained(out_dir)
    copy_tokenizer(out_dir)
    return Path(out_dir)


SHARED_E, SHARED_K = 6, 2  # 25% shared + 6 routed experts of the rest, k = 2: half of the FFN active per token


def convert_shared(dense_dir: Path, out_dir: Path, calib_text: Path, **settings) -> Path:
    """The recommended structure in small: 25% shared expert, E=6, k=2, co-activation split on ``calib_text``."""
    base = dict(num_experts=SHARED_E, top_k=SHARED_K, shared_neurons="0.25", split="coactivation",
                calib_data=calib_text, calib_tokens=512, calib_seq_len=128)
    return convert_tiny(dense_dir, out_dir, **(base | settings))


def hiding(module: str) -> str:
    """Python source that makes ``import module`` (and its submodules) fail as if it were not installed, in the
    process that runs it: the start of a ``python -c`` script."""
    return (f"import sys\n"
            f"class _Hide:\n"
            f"    def find_spec(self, name, path=None, target=None):\n"
            f"        if name.partition('.')[0] == {module!r}:\n"
            f"            raise ModuleNotFoundError(\"No module named {module!r}\", name=name)\n"
            f"sys.meta_path.insert(0, _Hide())\n")


def write_calibration_text(path: Path, chars: int = 20_000) -> Path:
    """The opening of *Botchan* (real English text, a cached PyPI asset) as a calibration file."""
    from factorllm_ds.assets import botchan_text

    text = botchan_text().read_text(encoding="utf-8")[:chars]
    Path(path).write_text(text, encoding="utf-8")
    return Path(path)


def ffn_tensors(seed: int = 0, tokens: int = 64, hidden: int = 16, inter: int = 48):
    """(x [T, H], gate [I, H], up [I, H], down [H, I]): a random SwiGLU FFN and its inputs, unit-scale outputs."""
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(inter, hidden, generator=g) / hidden ** 0.5
    up = torch.randn(inter, hidden, generator=g) / hidden ** 0.5
    down = torch.randn(hidden, inter, generator=g) / inter ** 0.5
    return torch.randn(tokens, hidden, generator=g), gate, up, down


def swiglu_acts(x_TH: torch.Tensor, gate_IH: torch.Tensor, up_IH: torch.Tensor) -> torch.Tensor:
    """The down projection's input act(gate x) * (up x): [T, I]."""
    return torch.nn.functional.silu(x_TH @ gate_IH.T) * (x_TH @ up_IH.T)


def expert_output(block, e: int, x_TH: torch.Tensor) -> torch.Tensor:
    """Routed expert ``e`` of a shipped-model MoE block on x, from its own slices of the stacked weights
    (gate rows, then up rows; docs/method.md §1), written out independently of the model's kernels."""
    inter = block.experts.intermediate_size
    gate_up, down = block.experts.gate_up_proj[e], block.experts.down_proj[e]
    act = block.experts.act_fn
    return torch.nn.functional.linear(act(x_TH @ gate_up[:inter].T) * (x_TH @ gate_up[inter:].T), down)


def expert_outputs(block, x_TH: torch.Tensor) -> torch.Tensor:
    """Every routed expert on every token: [E, T, H]."""
    return torch.stack([expert_output(block, e, x_TH) for e in range(block.num_experts)])


def oracle_agreement(moe_dir: Path, text: Path, prior_target: str = "subset", tail: bool = False) -> float:
    """Mean over layers of the share of the learned router's top-k that the oracle (the PA prior's best k for the
    routed experts' own sum, docs/method.md §4) also picks, on 256 tokens of ``text`` (its head, or its tail)."""
    from transformers import AutoTokenizer

    from factorllm_ds.hf_model.modeling_factorllm import prior_topk
    from factorllm_ds.modeling import load_moe
    from factorllm_ds.routing import prior_agreement

    model = load_moe(moe_dir)
    chars = text.read_text()
    ids = AutoTokenizer.from_pretrained(moe_dir)(chars[-3000:] if tail else chars[:4000],
                                                  return_tensors="pt")["input_ids"][:, :256]
    scores = []

    def hook(block, args):
        x_TH = args[0].reshape(-1, args[0].shape[-1])
        out_ETH = expert_outputs(block, x_TH)
        oracle = prior_topk(out_ETH, out_ETH.sum(0), block.top_k, prior_target, block.scale)
        scores.append(prior_agreement(block.router(x_TH), oracle).item())  # top-k of the logits = of the probs

    handles = [layer.mlp.register_forward_pre_hook(hook) for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return sum(scores) / len(scores)


def cli(capsys, *argv) -> tuple[int, str]:
    """(exit code, stderr) of ``factorllm-ds ARGV`` in this process; argparse's own exit included."""
    from factorllm_ds.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err
