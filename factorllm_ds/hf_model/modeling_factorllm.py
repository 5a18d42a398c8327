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
ones run on each token (sparse dispatch). In memory the routed experts of a layer are stacked
(``experts.gate_up_proj`` [E, 2*R, H], ``experts.down_proj`` [E, H, R], R neurons per expert) so that all selected
experts run as one grouped computation; loading and saving keep the per-expert keys above
(a transformers weight conversion, the one Mixtral uses; torch's ``load_state_dict`` accepts them too).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
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
    if math.comb(num_experts, k) <= _MAX_SUBSETS:  # counted first: C(28, 12) is 30 million subsets
        idx_SK = torch.tensor(list(itertools.combinations(range(num_experts), k)), device=out_ETH.device)
        mask_SE = torch.zeros(idx_SK.shape[0], num_experts, device=out_ETH.device).scatter_(1, idx_SK, 1.0)
        quad_TS = torch.einsum("se,tef,sf->ts", mask_SE, gram_TEE, mask_SE)
        best_T = (quad_TS - cross_TE @ mask_SE.T).argmin(dim=-1)
        return idx_SK[best_T]
    # Greedy: add the expert that lowers the error most, given those already chosen. Adding e changes the error
    # by G_ee + 2 sum_{f chosen} G_ef - cross_e; the sum is kept up to date one chosen column at a time (T*E per
    # step, where recomputing it from the chosen mask costs T*E*E).
    num_tokens = out_ETH.shape[1]
    tokens_T = torch.arange(num_tokens, device=out_ETH.device)
    gain_TE = torch.diagonal(gram_TEE, dim1=1, dim2=2) - cross_TE
    taken_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=out_ETH.device)
    picks = []
    for _ in range(k):
        pick_T = gain_TE.masked_fill(taken_TE, float("inf")).argmin(dim=-1)
        taken_TE[tokens_T, pick_T] = True
        gain_TE += 2 * gram_TEE[tokens_T, :, pick_T]
        picks.append(pick_T)
    return torch.stack(picks, dim=-1)


def prior_weight(routing: str, scale: float, k: int) -> float:
    """The weight each selected expert's output gets, as the ``subset`` prior assumes it:
    the combine scale for ``hard`` routing, its mean share scale/k for ``softmax``."""
    return scale if routing == "hard" else scale / k


class FactorLLMExpert(nn.Module):
    """One expert: the SwiGLU FFN restricted to R of the dense neurons."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


_GROUPED_MM = getattr(F, "grouped_mm", None)


class FactorLLMExperts(nn.Module):
    """A layer's routed experts, stacked: ``gate_up_proj`` [E, 2*R, H] (gate rows, then up rows) and
    ``down_proj`` [E, H, R]. Kernels (docs/method.md §8):

    - many tokens (prefill, training): only the selected experts run. The (token, expert) pairs are
      sorted by expert once and each expert multiplies one contiguous slice:
      ``torch.nn.functional.grouped_mm`` (one call for all experts) where the device and strides allow
      it, else one matmul pair per expert that has tokens; no per-expert mask, gather or scatter.
    - at most ``few_tokens`` tokens (decode): reading the weights, not the arithmetic, is the cost. On the
      GPU every expert runs on every token in one matmul over the stacked weights, the unselected ones
      weighted 0: no per-expert launch and no host sync. On the CPU (``union``) only the experts some token
      selected are read, gathered into one matmul pair, so a single sequence's decode reads its active
      fraction of the FFN weights, not all of them.
    - many tokens on CPU with thin experts (``intermediate_size`` < ``loop_min_intermediate``): the
      same every-expert pass, with one dense-width matmul for the down projection; it costs what the
      dense FFN costs, which the per-expert matmuls of a few dozen neurons each do not reach.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act_fn = ACT2FN[hidden_act]
        self.kernel = "auto"  # auto | grouped | loop | all | union (tests pin one)
        self.few_tokens = 16
        # CPU: below this expert width the per-expert matmuls are too thin to beat one dense-width
        # pass over every neuron (measured, docs/method.md §8)
        self.loop_min_intermediate = 64
        with torch.no_grad():  # nn.Linear's default init, per expert (a checkpoint overwrites it)
            self.gate_up_proj.uniform_(-hidden_size ** -0.5, hidden_size ** -0.5)
            self.down_proj.uniform_(-max(intermediate_size, 1) ** -0.5, max(intermediate_size, 1) ** -0.5)

    def __len__(self) -> int:
        return self.num_experts

    def all_outputs(self, x_TH: torch.Tensor) -> torch.Tensor:
        """Every expert on every token: [E, T, H] (the oracle router and analysis need them all)."""
        gate_ETI, up_ETI = torch.matmul(x_TH, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
        return torch.matmul(self.act_fn(gate_ETI) * up_ETI, self.down_proj.transpose(1, 2))

    def _kernel(self, x_TH: torch.Tensor) -> str:
        if self.kernel != "auto":
            return self.kernel
        if x_TH.shape[0] <= self.few_tokens:
            return "all" if x_TH.is_cuda else "union"
        aligned = all(t.stride(-2) * t.element_size() % 16 == 0 and t.stride(-1) == 1
                      for t in (x_TH, self.gate_up_proj, self.down_proj))
        if _GROUPED_MM is not None and x_TH.is_cuda and aligned:
            return "grouped"
        return "loop" if self.intermediate_size >= self.loop_min_intermediate else "all"

    def _weighted_acts(self, x_TH: torch.Tensor, gate_up_UXH: torch.Tensor, w_TU: torch.Tensor) -> torch.Tensor:
        """act(gate) * up of the experts of ``gate_up_UXH`` on every token, each times the token's weight for that
        expert (0 where the token did not select it): [T, U, I]."""
        h_TUXI = F.linear(x_TH, gate_up_UXH.reshape(-1, x_TH.shape[-1])).view(-1, gate_up_UXH.shape[0], 2,
                                                                              self.intermediate_size)
        a_TUI = self.act_fn(h_TUXI[:, :, 0]) * h_TUXI[:, :, 1]
        return (a_TUI.float() * w_TU.unsqueeze(-1)).to(x_TH.dtype)

    @staticmethod
    def _summed_down(a_TUI: torch.Tensor, down_UHI: torch.Tensor) -> torch.Tensor:
        """sum over the experts of their down projections, each weight read once ([U, T, H] is small): [T, H]."""
        return torch.bmm(a_TUI.transpose(0, 1), down_UHI.transpose(1, 2)).float().sum(dim=0)

    def _all_experts(self, x_TH: torch.Tensor, idx_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        num_experts, inter = self.num_experts, self.intermediate_size
        w_TE = torch.zeros(idx_TK.shape[0], num_experts, dtype=torch.float32, device=x_TH.device)
        w_TE.scatter_(1, idx_TK, weights_TK.float())
        a_TEI = self._weighted_acts(x_TH, self.gate_up_proj, w_TE)
        if x_TH.shape[0] <= self.few_tokens:  # decode
            return self._summed_down(a_TEI, self.down_proj)
        # many tokens: one matmul over every neuron, as the dense FFN ([E, T, H] would dwarf the work)
        down_HN = self.down_proj.permute(1, 0, 2).reshape(x_TH.shape[-1], num_experts * inter)
        return F.linear(a_TEI.reshape(-1, num_experts * inter), down_HN).float()

    def _union_experts(self, x_TH: torch.Tensor, idx_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        if idx_TK.shape[0] == 1:  # one token: its k experts, its own weights
            union_U, w_TU = idx_TK[0], weights_TK.float()
        else:
            union_U = torch.unique(idx_TK)  # sorted; one host sync
            w_TU = torch.zeros(idx_TK.shape[0], union_U.numel(), dtype=torch.float32, device=x_TH.device)
            w_TU.scatter_(1, torch.searchsorted(union_U, idx_TK), weights_TK.float())
        a_TUI = self._weighted_acts(x_TH, self.gate_up_proj.index_select(0, union_U), w_TU)  # selected rows only
        return self._summed_down(a_TUI, self.down_proj.index_select(0, union_U))

    def forward(self, x_TH: torch.Tensor, idx_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """sum over the k selected experts of weight * expert(x), accumulated in fp32: [T, H]."""
        kernel = self._kernel(x_TH)
        if kernel == "all":
            return self._all_experts(x_TH, idx_TK, weights_TK)
        if kernel == "union":
            return self._union_experts(x_TH, idx_TK, weights_TK)
        num_tokens, k = idx_TK.shape
        expert_N = idx_TK.reshape(-1)
        order_N = torch.argsort(expert_N, stable=True)
        token_N = order_N // k
        counts_E = torch.bincount(expert_N, minlength=self.num_experts)
        x_NH = x_TH[token_N]
        if kernel == "grouped":
            offs_E = counts_E.cumsum(0).to(torch.int32)
            gate_NI, up_NI = _GROUPED_MM(x_NH, self.gate_up_proj.transpose(1, 2), offs=offs_E).chunk(2, dim=-1)
            y_NH = _GROUPED_MM((self.act_fn(gate_NI) * up_NI).contiguous(), self.down_proj.transpose(1, 2),
                               offs=offs_E)
        else:
            pieces = []
            for e, x_nH in enumerate(x_NH.split(counts_E.tolist())):  # one host sync
                if len(x_nH):  # experts without tokens cost nothing
                    gate_nI, up_nI = F.linear(x_nH, self.gate_up_proj[e]).chunk(2, dim=-1)
                    pieces.append(F.linear(self.act_fn(gate_nI) * up_nI, self.down_proj[e]))
            y_NH = torch.cat(pieces) if pieces else x_NH.new_zeros(0, x_TH.shape[-1])
        y_NH = y_NH.float() * weights_TK.reshape(-1)[order_N, None].float()
        out_TH = torch.zeros(num_tokens, x_TH.shape[-1], dtype=torch.float32, device=x_TH.device)
        return out_TH.index_add_(0, token_N, y_NH)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """torch ``load_state_dict`` with per-expert keys (``{e}.gate_proj.weight`` ...): stacked here."""
        if f"{prefix}0.gate_proj.weight" in state_dict and f"{prefix}gate_up_proj" not in state_dict:
            gate_EIH, up_EIH, down_EHI = (
                torch.stack([state_dict.pop(f"{prefix}{e}.{w}_proj.weight") for e in range(self.num_experts)])
                for w in ("gate", "up", "down"))
            state_dict[f"{prefix}gate_up_proj"] = torch.cat([gate_EIH, up_EIH], dim=1)
            state_dict[f"{prefix}down_proj"] = down_EHI
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# Per-expert checkpoint keys <-> stacked parameters, for ``from_pretrained`` and ``save_pretrained``.
register_checkpoint_conversion_mapping(FactorLLMConfig.model_type, [
    WeightConverter(source_patterns=["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
                    target_patterns="mlp.experts.gate_up_proj",
                    operations=[MergeModulelist(dim=0), Concatenate(dim=1)]),
    WeightConverter(source_patterns=["mlp.experts.*.down_proj.weight"], target_patterns="mlp.experts.down_proj",
                    operations=[MergeModulelist(dim=0)]),
], overwrite=True)


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
        self.prior_target = config.prior_target
        self.router = nn.Linear(text.hidden_size, config.num_experts, bias=config.router_bias)
        self.experts = FactorLLMExperts(config.num_experts, text.hidden_size, config.expert_intermediate_size,
                                        text.hidden_act)
        shared_size = config.shared_intermediate_size
        self.shared_expert = FactorLLMExpert(text.hidden_size, shared_size, text.hidden_act) if shared_size else None
        # Opt-in usage counter for analysis: set to a zero tensor [E] to accumulate counts.
        self.usage_counts: torch.Tensor | None = None
        self.random_generator: torch.Generator | None = None

    def select(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids [T, k] and combine weights [T, k] for each token."""
        if self.router_override == "learned":
            return route(self.router(x_TH), self.top_k, self.routing, self.scale)
        if self.router_override == "random":
            scores_TE = torch.rand(x_TH.shape[0], self.num_experts, generator=self.random_generator).to(x_TH.device)
            idx_TK = torch.topk(scores_TE, self.top_k, dim=-1).indices
        elif self.router_override == "oracle":
            # The target is the whole FFN (shared + every routed expert); with the shared expert always
            # on, the routed experts must complete it: their target is that sum minus the shared output.
            out_ETH = self.experts.all_outputs(x_TH)
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
        out_TH = self.experts(x_TH, idx_TK, weights_TK)
        if self.shared_expert is not None:
            out_TH += self.shared_expert(x_TH).float()
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
        # lm_head and resized embeddings: normal(0, 0.02). The base model, a PreTrainedModel itself, initialises
        # every module under it (routers included) with its own _init_weights; the checkpoint then overwrites them.
        if isinstance(module, (nn.Linear, nn.Embedding)):
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
        self.config.num_experts_per_tok = k
        for block in self.moe_blocks():
            block.top_k = k
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
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep  # 0: all
        logits = self.lm_head(outputs.last_hidden_state[:, keep, :])
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
