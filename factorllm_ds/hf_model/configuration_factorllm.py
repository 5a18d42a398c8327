# Shipped inside every converted checkpoint folder: it must import nothing from factorllm_ds.
"""Configuration of a FactorLLM Mixture-of-Experts causal LM.

The dense base model's own config (LLaMA, Mistral, Qwen2, ...) is kept whole as
``text_config``; the MoE fields sit next to it. Attention, norms and embeddings are the
base family's modules, unchanged; only each layer's MLP becomes router + experts.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

ROUTING_MODES = ("hard", "softmax")


def default_combine_scale(routing: str, num_experts: int, top_k: int, combine_scale: float | None = None) -> float:
    """The combine scale s: ``combine_scale`` when set, else E/k for ``hard`` and E for ``softmax`` (the paper)."""
    if combine_scale is not None:
        return float(combine_scale)
    return num_experts / top_k if routing == "hard" else float(num_experts)


class FactorLLMConfig(PretrainedConfig):
    model_type = "factorllm"
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        text_config: dict | PretrainedConfig | None = None,
        num_experts: int = 4,
        num_experts_per_tok: int = 2,
        expert_intermediate_size: int | None = None,
        routing: str = "hard",
        combine_scale: float | None = None,
        router_bias: bool = True,
        partition_method: str = "contiguous",
        router_override: str = "learned",
        prior_target: str = "share",
        shared_intermediate_size: int = 0,
        **kwargs,
    ):
        """
        Args:
            text_config: the dense base model's config (a dict with ``model_type``).
            num_experts: E, experts per MoE layer.
            num_experts_per_tok: k, experts selected per token.
            expert_intermediate_size: R = (I - S) / E, neurons per routed expert.
            routing: ``hard`` (paper: fixed weight ``combine_scale`` on each selected
                expert) or ``softmax`` (Mixtral-style renormalized top-k weights times
                ``combine_scale``).
            combine_scale: s. ``None`` means E/k for ``hard`` and E for ``softmax``.
            router_bias: whether the router is ``W x + b`` (paper) or ``W x`` (Mixtral).
            partition_method: how the dense neurons were grouped (informational).
            router_override: ``learned`` | ``oracle`` | ``random``: evaluation-time
                choice of who picks the experts (oracle = the experts closest to their
                share of the dense output, the PA prior).
            prior_target: what the PA prior (and the oracle router) picks: ``share`` (the
                paper: the k experts each closest to their share t*k/E of the teacher
                output t) or ``subset`` (the k experts whose scaled sum is closest to t).
            shared_intermediate_size: S, neurons of the always-on shared expert (0: none). Every
                token runs it with weight 1; the routed experts then hold the other I - S
                neurons, ``expert_intermediate_size`` each.
        """
        if isinstance(text_config, dict):
            if text_config.get("model_type") is None:
                raise ValueError("FactorLLMConfig.text_config needs a 'model_type' (e.g. 'llama').")
            text_config = AutoConfig.for_model(**text_config)
        self.text_config = text_config
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.expert_intermediate_size = expert_intermediate_size
        self.routing = routing
        self.combine_scale = combine_scale
        self.router_bias = router_bias
        self.partition_method = partition_method
        self.router_override = router_override
        self.prior_target = prior_target
        self.shared_intermediate_size = int(shared_intermediate_size or 0)
        if text_config is not None:
            kwargs.setdefault("tie_word_embeddings", getattr(text_config, "tie_word_embeddings", False))
            for name in ("vocab_size", "hidden_size", "num_hidden_layers"):
                kwargs.setdefault(name, getattr(text_config, name))
        super().__init__(**kwargs)

    @property
    def active_fraction(self) -> float:
        """The share of the FFN's neurons each token runs: (shared + k routed) / (shared + E routed)."""
        shared, routed = self.shared_intermediate_size, self.expert_intermediate_size
        return (shared + self.num_experts_per_tok * routed) / (shared + self.num_experts * routed)

    @property
    def scale(self) -> float:
        """The combine scale s actually used (resolves the ``None`` default)."""
        return default_combine_scale(self.routing, self.num_experts, self.num_experts_per_tok, self.combine_scale)
