"""Run calibration text through a dense model one decoder layer at a time.

Only the current layer's weights are in memory: each layer is built on the meta device,
filled from the checkpoint, run over the calibration hidden states, and dropped. Used by
the ``coactivation`` split, which needs each layer's FFN activations on real text.

``cfg.device`` (convert --device) is where the layer runs and the hidden states, MLP inputs,
outputs and activations live; the weights are read on the CPU and copied there one layer at
a time, and the embedding lookup stays on the CPU (the [vocab, H] table never goes to the GPU).
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from factorllm_ds import keys
from factorllm_ds.config import calib_files
from factorllm_ds.data import read_text
from factorllm_ds.errors import UserError
from factorllm_ds.hf_io import check_token_ids, load_tokenizer


def calibration_ids(tokenizer, dense_config: dict, cfg) -> torch.Tensor:
    """``cfg.calib_tokens`` tokens of ``cfg.calib_data`` as [sequences, seq_len] ids on the CPU.

    One file: its first tokens. Several: an equal share of the sequences from the start of each (the
    first files take one more when they do not divide evenly), interleaved file by file, so that a mixed
    corpus is not just its first file's domain.
    """
    files = calib_files(cfg.calib_data)
    seq_len = min(cfg.calib_seq_len, cfg.calib_tokens)
    n_seq = cfg.calib_tokens // seq_len
    shares = [n_seq // len(files) + (i < n_seq % len(files)) for i in range(len(files))]
    blocks = []
    for path, share in zip(files, shares):
        ids = tokenizer(read_text(path, "--calib-data"), add_special_tokens=False)["input_ids"]
        check_token_ids(max(ids, default=-1), tokenizer, dense_config, f"--model {cfg.model}", tokenizer.factorllm_desc)
        if len(ids) < share * seq_len:
            need = f"--calib-tokens {cfg.calib_tokens}" if len(files) == 1 else \
                f"its share of --calib-tokens {cfg.calib_tokens}, {share} sequences of {seq_len} tokens"
            raise UserError(f"--calib-data {path}: only {len(ids)} tokens, fewer than {need}. Use a longer text or "
                            "lower --calib-tokens.")
        blocks.append(torch.tensor(ids[: share * seq_len], device="cpu").view(share, seq_len))
    order = sorted(((j, i) for i, block in enumerate(blocks) for j in range(block.shape[0])))
    return torch.stack([blocks[i][j] for j, i in order])


class CalibrationRunner:
    def __init__(self, reader, dense_config: dict, cfg):
        self.reader = reader
        self.device = torch.device(cfg.device)
        text_cfg = {k: v for k, v in dense_config.items() if k != "model_type"}
        self.config = AutoConfig.for_model(dense_config["model_type"], **text_cfg)
        self.config._attn_implementation = "sdpa"  # causal without building a mask
        tokenizer = load_tokenizer(cfg.model, cfg.tokenizer, model_config=dense_config)  # ids within the vocabulary
        self.input_ids = calibration_ids(tokenizer, dense_config, cfg)
        base = MODEL_MAPPING[type(self.config)]
        module = sys.modules[base.__module__]
        prefix = base.__name__[: -len("Model")]
        self.layer_cls = getattr(module, prefix + "DecoderLayer")
        with torch.device("cpu"):  # built where its inverse frequencies are computed on every machine alike
            self.rotary = getattr(module, prefix + "RotaryEmbedding")(config=self.config).to(self.device)

    def start(self) -> None:
        embed = self.reader.get("model.embed_tokens.weight").float()
        self.hidden = torch.nn.functional.embedding(self.input_ids, embed).to(self.device)
        del embed
        self.position_ids = torch.arange(self.input_ids.shape[1], device=self.device).unsqueeze(0)
        self.position_embeddings = self.rotary(self.hidden, self.position_ids)

    @torch.no_grad()
    def run_layer(self, layer: int) -> None:
        """Advance the hidden states through dense layer ``layer``, keeping the MLP input and activations."""
        with torch.device("meta"):
            block = self.layer_cls(self.config, layer)
        prefix = keys.LAYER.format(layer=layer)
        # copied in the checkpoint's dtype (half the bytes of fp32 for bf16), widened where it runs
        state = {name[len(prefix):]: self.reader.get(name).to(self.device).float()
                 for name in self.reader.infos if name.startswith(prefix)}
        block.load_state_dict(state, strict=True, assign=True)
        block.eval()
        captured = {}
        hooks = [block.mlp.register_forward_pre_hook(lambda _m, args: captured.setdefault("x", args[0])),
                 block.mlp.register_forward_hook(lambda _m, _args, out: captured.setdefault("y", out)),
                 # down_proj's input is act(W_gate x) * (W_up x): kept, not computed a second time
                 block.mlp.down_proj.register_forward_pre_hook(lambda _m, args: captured.setdefault("h", args[0]))]
        self.hidden = block(self.hidden, attention_mask=None, position_ids=self.position_ids,
                            position_embeddings=self.position_embeddings)
        for hook in hooks:
            hook.remove()
        self.mlp_input = captured["x"]
        self._mlp_output = captured["y"]
        self._activations = captured["h"]

    @torch.no_grad()
    def replace_mlp_output(self, new_TH: torch.Tensor) -> None:
        """Continue from the converted layer instead of the dense one: the decoder layer adds its MLP's
        output to the residual stream, so swapping that term is exact without running attention again."""
        self.hidden = self.hidden - self._mlp_output + new_TH.reshape(self._mlp_output.shape).to(self.hidden.dtype)

    def mlp_output(self) -> torch.Tensor:
        """The dense MLP's output of the current layer, as its forward computed it: [tokens, H]."""
        return self._mlp_output.reshape(-1, self._mlp_output.shape[-1])

    def mlp_activations(self) -> torch.Tensor:
        """act(W_gate x) * (W_up x) of the current layer, as its forward computed it: [tokens, I]."""
        return self._activations.reshape(-1, self._activations.shape[-1])
