# Shipped inside every converted checkpoint folder: it must import nothing from factorllm_ds,
# so that `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works alone.
"""FactorLLM: a dense LLaMA-family model whose FFNs are split into experts plus a router.

The base family's model (``AutoModel.from_config(config.text_config)``) is built as is and
each decoder layer's ``mlp`` is replaced by :class:`FactorLLMSparseMoeBlock`, so checkpoint
keys match the dense model's except under ``.mlp.``::

    model.layers.{L}.mlp.router.{weight,bias}
    model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight
    model.layers.{L}.mlp.shared_expert.{gate,up,down}_proj.weight   (when shared_intermediate_size > 0)

The shared expert runs on every token with weight 1; of the routed experts only the selected
ones run on each token (sparse dispatch).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # a relative import when loaded as remote code, an absolute one inside factorllm_ds
    from .configuration_factorllm import FactorLLMConfig
except ImportError:  # pragma: no cover
    from configuration_factorllm import FactorLLMConfig


# transformers 5.x renamed past_key_values to cache (argument and output field); use whichever it has.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def route(logits_TE: torch.Tensor, k: int, routing: str, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: returns (expert ids [T, k], combine weights [T, k] in fp32).

    ``hard``: every selected expert gets the constant weight ``scale`` (E/k in the paper);
    the top-k choice carries no gradient, so the router learns from its auxiliary losses.
    ``softmax``: ``scale * p_i / sum_{j in top-k} p_j`` (Mixtral with ``scale`` folded in).
    """
    probs_TE = F.softmax(logits_TE.float(), dim=-1)
    top_p_TK, top_idx_TK = torch.topk(probs_TE, k, dim=-1)
    if routing == "hard":
        weights_TK = torch.full_like(top_p_TK, scale).detach()
    elif routing == "softmax":
        weights_TK = scale * top_p_TK / top_p_TK.sum(dim=-1, keepdim=True)
    else:
        raise ValueError(f"unknown routing mode {routing!r}; expected 'hard' or 'softmax'")
    return top_idx_TK, weights_TK


PRIOR_TARGETS = ("share", "subset")
_MAX_SUBSETS = 512  # exact search over all k-subsets up to this many, greedy beyond


def prior_topk(expert_out_ETH: torch.Tensor, target_TH: torch.Tensor, k: int, target: str = "share",
               weight: float = 1.0) -> torch.Tensor:
    """The PA prior's choice of k experts per token: expert ids [T, k].

    ``expert_out_ETH`` holds every expert's output per token, ``target_TH`` the teacher t.
    ``share`` (the paper): the k experts whose own output is closest to their share t*k/E.
    ``subset``: the k experts whose combination, as the model computes it (each selected
    output times ``weight``, the combine scale), is closest to t:
    argmin_S ||weight * sum_{i in S} E_i - t||^2 over all k-subsets S (greedy when there
    are more than 512 subsets).
    """
    num_experts = expert_out_ETH.shape[0]
    out_ETH, t_TH = expert_out_ETH.float(), target_TH.float()
    if target == "share":
        dist_TE = (out_ETH - t_TH.unsqueeze(0) * (k / num_experts)).pow(2).mean(dim=-1).transpose(0, 1)
        return torch.topk(-dist_TE, k, dim=-1).indices
    if target != "subset":
        raise ValueError(f"unknown prior target {target!r}; expected one of {PRIOR_TARGETS}")
    # ||w sum_S E_i - t||^2 = w^2 sum_{i,j in S} <E_i,E_j> - 2w sum_{i in S} <E_i,t> + const
    gram_TEE = torch.einsum("ith,jth->tij", out_ETH, out_ETH) * weight * weight
    cross_TE = torch.einsum("eth,th->te", out_ETH, t_TH) * (2 * weight)
    subsets = list(itertools.combinations(range(num_experts), k))
    if len(subsets) <= _MAX_SUBSETS:
        idx_SK = torch.tensor(subsets, device=out_ETH.device)
        mask_SE = torch.zeros(len(subsets), num_experts, device=out_ETH.device).scatter_(1, idx_SK, 1.0)
        quad_TS = torch.einsum("se,tef,sf->ts", mask_SE, gram_TEE, mask_SE)
        best_T = (quad_TS - cross_TE @ mask_SE.T).argmin(dim=-1)
        return idx_SK[best_T]
    chosen_TE = torch.zeros(out_ETH.shape[1], num_experts, device=out_ETH.device)
    for _ in range(k):  # add the expert that lowers the error most, given those already chosen
        gain_TE = torch.diagonal(gram_TEE, dim1=1, dim2=2) + 2 * torch.einsum("tef,tf->te", gram_TEE, chosen_TE) \
            - cross_TE
        chosen_TE.scatter_(1, gain_TE.masked_fill(chosen_TE.bool(), float("inf")).argmin(dim=-1, keepdim=True), 1.0)
    return torch.topk(chosen_TE, k, dim=-1).indices


def prior_weight(routing: str, scale: float, k: int) -> float:
    """The weight each selected expert's output gets, as the ``subset`` prior assumes it:
    the combine scale for ``hard`` routing, its mean share scale/k for ``softmax``."""
    return scale if routing == "hard" else scale / k


class FactorLLMExpert(nn.Module):
    """One expert: the SwiGLU FFN restricted to I/E of the dense neurons."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class FactorLLMSparseMoeBlock(nn.Module):
    """Router + experts in place of a dense MLP; computes only the selected experts."""

    def __init__(self, config: FactorLLMConfig):
        super().__init__()
        text = config.text_config
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.routing = config.routing
        self.scale = config.scale
        self.router_override = config.router_override
        self.prior_target = getattr(config, "prior_target", "share")
        self.router = nn.Linear(text.hidden_size, config.num_experts, bias=config.router_bias)
        self.experts = nn.ModuleList(
            FactorLLMExpert(text.hidden_size, config.expert_intermediate_size, text.hidden_act)
            for _ in range(config.num_experts)
        )
        shared_size = getattr(config, "shared_intermediate_size", 0) or 0
        self.shared_expert = FactorLLMExpert(text.hidden_size, shared_size, text.hidden_act) if shared_size else None
        # Opt-in usage counter for analysis: set to a zero tensor [E] to accumulate counts.
        self.usage_counts: torch.Tensor | None = None
        self.random_generator: torch.Generator | None = None

    def select(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids [T, k] and combine weights [T, k] for each token."""
        if self.router_override == "learned":
            return route(self.router(x_TH), self.top_k, self.routing, self.scale)
        num_tokens = x_TH.shape[0]
        if self.router_override == "random":
            scores_TE = torch.rand(num_tokens, self.num_experts, generator=self.random_generator).to(x_TH.device)
            idx_TK = torch.topk(scores_TE, self.top_k, dim=-1).indices
        elif self.router_override == "oracle":
            # The target is the whole FFN (shared + every routed expert); with the shared expert always
            # on, the routed experts must complete it: their target is that sum minus the shared output.
            out_ETH = torch.stack([expert(x_TH) for expert in self.experts])
            idx_TK = prior_topk(out_ETH, out_ETH.sum(dim=0), self.top_k, self.prior_target,
                                prior_weight(self.routing, self.scale, self.top_k))
        else:
            raise ValueError(f"unknown router_override {self.router_override!r}")
        if self.routing == "hard":
            weights_TK = torch.full(idx_TK.shape, self.scale, device=x_TH.device)
        else:  # the learned router's renormalized probabilities over the chosen experts
            probs_TE = F.softmax(self.router(x_TH).float(), dim=-1)
            chosen_TK = probs_TE.gather(1, idx_TK)
            weights_TK = self.scale * chosen_TK / chosen_TK.sum(dim=-1, keepdim=True)
        return idx_TK, weights_TK

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x_TH = hidden_states.reshape(-1, shape[-1])
        idx_TK, weights_TK = self.select(x_TH)
        if self.usage_counts is not None:
            self.usage_counts += torch.bincount(idx_TK.flatten(), minlength=self.num_experts).to(self.usage_counts)
        # fp32 accumulation: summing k expert outputs in bf16 loses precision.
        if self.shared_expert is not None:
            out_TH = self.shared_expert(x_TH).float()
        else:
            out_TH = torch.zeros(x_TH.shape, dtype=torch.float32, device=x_TH.device)
        for e, expert in enumerate(self.experts):
            token_ids, slot_ids = torch.where(idx_TK == e)
            if token_ids.numel() == 0:
                continue
            y = expert(x_TH[token_ids]).float() * weights_TK[token_ids, slot_ids, None]
            out_TH.index_add_(0, token_ids, y)
        return out_TH.to(hidden_states.dtype).reshape(shape)


class FactorLLMPreTrainedModel(PreTrainedModel):
    config_class = FactorLLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Routers: normal(0, 0.02), bias 0 (the paper). Everything else comes from the checkpoint.
        if isinstance(module, FactorLLMSparseMoeBlock):
            module.router.weight.normal_(0.0, 0.02)
            if module.router.bias is not None:
                module.router.bias.zero_()
        elif isinstance(module, nn.Linear):
            module.weight.normal_(0.0, 0.02)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, 0.02)


class FactorLLMForCausalLM(FactorLLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: FactorLLMConfig):
        super().__init__(config)
        text = config.text_config
        self.model = AutoModel.from_config(text)
        for layer in self.model.layers:
            layer.mlp = FactorLLMSparseMoeBlock(config)
        self.vocab_size = text.vocab_size
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.post_init()

    def moe_blocks(self) -> list[FactorLLMSparseMoeBlock]:
        return [layer.mlp for layer in self.model.layers]

    def set_router_override(self, mode: str, seed: int = 0) -> None:
        """Evaluation-time routing: ``learned`` | ``oracle`` | ``random`` (seeded)."""
        for i, block in enumerate(self.moe_blocks()):
            block.router_override = mode
            block.random_generator = torch.Generator().manual_seed(seed + i)
        self.config.router_override = mode

    def set_top_k(self, k: int) -> None:
        """Change k at run time; a ``hard`` model's default scale E/k follows k."""
        for block in self.moe_blocks():
            block.top_k = k
        self.config.num_experts_per_tok = k
        for block in self.moe_blocks():
            block.scale = self.config.scale

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        # transformers renamed past_key_values to cache in 5.x; accept both spellings.
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{_CACHE_FIELD: cache},
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:, :]
        elif not isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{_CACHE_FIELD: outputs.get(_CACHE_FIELD)},
        )
