"""The DeepSpeed backend: each FFN becomes a ``deepspeed.moe`` MoE layer with expert parallelism.

Each rank builds the model on the meta device and then reads from the converted folder
only the shared (non-expert) weights and its own experts (global id = ep_rank * E/ep +
local id), so host memory per rank does not grow with the experts other ranks hold.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from torch import nn
from transformers import AutoModel

from factorllm_ds import keys
from factorllm_ds.config import Objective
from factorllm_ds.hf_io import CheckpointReader
from factorllm_ds.hf_model.configuration_factorllm import FactorLLMConfig
from factorllm_ds.hf_model.modeling_factorllm import FactorLLMExpert, prior_weight
from factorllm_ds.routing import FactorLLMGate, balance_loss, pa_loss, prior_agreement, prior_topk, switch_balance_loss
from factorllm_ds.shape import MoEShape

EXPERT_PREFIX = "moe.deepspeed_moe.experts.deepspeed_experts"
GATE_PREFIX = "moe.deepspeed_moe.gate.router"
SELECTION_BIAS = "moe.deepspeed_moe.gate.selection_bias"  # --balance-kind bias (sources.py folds it on export)


@dataclass
class BlockAux:
    """What one MoE layer's forward adds to the objective and the logs."""

    pa: torch.Tensor
    balance: torch.Tensor
    agreement: torch.Tensor
    exp_counts: torch.Tensor


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x.contiguous(), group=group)
    return out


class DeepSpeedMoEBlock(nn.Module):
    """Router + experts as a DeepSpeed MoE layer, plus the PA prior and losses."""

    def __init__(self, shape: MoEShape, hidden_act: str, ep_size: int, objective: Objective):
        super().__init__()
        hidden = self.hidden_size = shape.hidden_size
        self.num_experts, self.k = shape.num_experts, shape.top_k
        self.num_local = shape.num_experts // ep_size
        self.ep_size = ep_size
        self.objective = objective
        self.prior_weight = prior_weight(shape.routing, shape.scale, self.k)
        expert = FactorLLMExpert(hidden, shape.expert_size, hidden_act)
        self.moe = MoE(hidden_size=hidden, expert=expert, num_experts=self.num_experts, ep_size=ep_size, k=self.k,
                       drop_tokens=False, use_rts=False, min_capacity=0)
        self.moe.deepspeed_moe.gate = FactorLLMGate(hidden, self.num_experts, self.k, shape.routing, shape.scale,
                                                    shape.router_bias, objective.router_grad)
        # The shared expert: a dense module beside the MoE layer, data parallel like every dense weight.
        self.shared_expert = FactorLLMExpert(hidden, shape.shared_size, hidden_act) if shape.shared_size else None
        if objective.prior == "frozen":
            # The frozen teacher: this rank's initial experts, stacked (and the initial shared expert); non-persistent
            # so they are never written to checkpoints (they are re-read from the converted folder on resume).
            teachers = {"teacher": (self.num_local, shape.expert_shapes()),
                        "teacher_shared": (1, shape.shared_shapes())}
            for prefix, (count, shapes) in teachers.items():
                for part, part_shape in shapes.items():
                    self.register_buffer(f"{prefix}_{part}", torch.empty(count, *part_shape), persistent=False)
        self.act_fn = expert.act_fn
        self.last_aux: BlockAux | None = None
        # Activation checkpointing (enable_activation_checkpointing): the first forward keeps the PA prior's
        # choice for the backward's replay, which reuses it instead of running every expert (and both
        # all-to-alls of the PA target) a second time; ``replaying`` is set only during that replay.
        self.checkpointed = False
        self.replaying = False
        self.replay_prior_idx: torch.Tensor | None = None

    @property
    def gate(self) -> FactorLLMGate:
        return self.moe.deepspeed_moe.gate

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    def _stacked(self, x_UH: torch.Tensor, gate_ERH: torch.Tensor, up_ERH: torch.Tensor, down_EHR: torch.Tensor,
                 chunks: int = 1) -> torch.Tensor:
        """Stacked experts on every token, the tokens cut into ``chunks`` equal runs: [chunks, E, U/chunks, H].

        Gate and up of all experts are one matmul each over their E·R rows (thin experts are far below the
        BLAS's speed one by one); the down projections one batched matmul per chunk, written straight into
        the layout the all-to-all sends (chunk r to rank r), so the [E, U, H] outputs are never copied."""
        num, rows, hidden = gate_ERH.shape
        x = x_UH.to(gate_ERH.dtype)
        h_UER = self.act_fn(x @ gate_ERH.reshape(num * rows, hidden).t()) * (x @ up_ERH.reshape(num * rows, hidden).t())
        h_EUR = h_UER.view(-1, num, rows).transpose(0, 1)
        per = x_UH.shape[0] // chunks
        out = x.new_empty(chunks, num, per, hidden)
        for r in range(chunks):
            torch.bmm(h_EUR[:, r * per:(r + 1) * per], down_EHR.transpose(1, 2), out=out[r])
        return out

    def _teacher(self, x_TH: torch.Tensor, prefix: str = "teacher", chunks: int = 1) -> torch.Tensor:
        """Frozen initial local experts (or the frozen shared expert) on every token: [chunks, E_local or 1,
        T/chunks, H]."""
        return self._stacked(x_TH, *(getattr(self, f"{prefix}_{part}") for part in keys.MLP_PARTS), chunks=chunks)

    @torch.no_grad()
    def all_expert_outputs(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every routed expert on every local token, and what the routed experts must add up to: ([E, T, H], [T, H]).

        That target is the teacher FFN's output t minus the current shared expert's output (t − shared): the
        routed experts complete the always-on part. Without a shared expert it is t itself.

        Under expert parallelism each token is sent to every rank of the expert group (one
        all-to-all), every rank runs its local experts (and frozen copies) on all of them,
        and one all-to-all per part (current, frozen) brings the E outputs home.
        """
        group = self.moe.deepspeed_moe.ep_group
        ep = self.ep_size
        num_tokens = x_TH.shape[0]
        x_PTH = x_TH.unsqueeze(0)
        if ep > 1:
            x_PTH = _all_to_all(x_PTH.expand(ep, -1, -1), group)  # tokens of every rank
        x_UH = x_PTH.reshape(-1, self.hidden_size)

        def home(outs_PETH: torch.Tensor) -> torch.Tensor:
            """[ep(src), E_local, T, H] computed here -> [E, T, H] of this rank's tokens, experts in global order."""
            if ep > 1:
                outs_PETH = _all_to_all(outs_PETH, group)  # now [ep(owner of experts), E_local, T, H]
            return outs_PETH.view(self.num_experts, num_tokens, -1)

        weights = [torch.stack([getattr(expert, f"{part}_proj").weight for expert in self.local_experts])
                   for part in keys.MLP_PARTS]  # gate, up [E_local, R, H]; down [E_local, H, R]
        current_ETH = home(self._stacked(x_UH, *weights, chunks=ep))
        if self.objective.prior != "frozen":  # self: t = shared + sum of the current routed experts
            return current_ETH, current_ETH.sum(dim=0)
        target_TH = home(self._teacher(x_UH, chunks=ep).to(current_ETH.dtype)).sum(dim=0)
        if self.shared_expert is not None:  # frozen: t = frozen shared + frozen routed; minus the current shared
            target_TH = target_TH + (self._teacher(x_TH, "teacher_shared")[0, 0] - self.shared_expert(x_TH)).to(
                target_TH.dtype)
        return current_ETH, target_TH

    def _prior_idx(self, x_TH: torch.Tensor) -> torch.Tensor:
        """The PA prior's k experts per token: [T, k]. A checkpoint replay reuses the first forward's choice."""
        if self.replaying:
            prior_idx, self.replay_prior_idx = self.replay_prior_idx, None
            return prior_idx
        outs_ETH, target_TH = self.all_expert_outputs(x_TH)
        prior_idx = prior_topk(outs_ETH, target_TH, self.k, self.objective.prior_target, self.prior_weight)
        if self.checkpointed and torch.is_grad_enabled():
            self.replay_prior_idx = prior_idx
        return prior_idx

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x_TH = hidden_states.reshape(-1, self.hidden_size)
        prior_idx = None
        if self.objective.prior != "none" and self.training:
            prior_idx = self._prior_idx(x_TH)
        out, _, exp_counts = self.moe(hidden_states)
        if self.shared_expert is not None:
            out = out + self.shared_expert(hidden_states)
        probs_TE = self.gate.last_probs
        zero = probs_TE.new_zeros(())
        kind = self.objective.balance_kind
        bal = zero if kind == "bias" else (switch_balance_loss if kind == "switch" else balance_loss)(probs_TE, self.k)
        aux = BlockAux(pa=zero, balance=bal, agreement=zero, exp_counts=exp_counts)
        if prior_idx is not None:
            aux.pa = pa_loss(probs_TE, prior_idx, self.objective.prior_tau)
            aux.agreement = prior_agreement(probs_TE.detach(), prior_idx)
        # A replay recomputes what the backward needs (the losses' saved tensors included) but must not replace
        # the first forward's aux, from which the loss was built: the objective counts each layer once.
        if not self.replaying:
            self.last_aux = aux
        return out


@contextlib.contextmanager
def _replaying(block: DeepSpeedMoEBlock):
    block.replaying = True
    try:
        yield
    finally:
        block.replaying = False


def _checkpoint_layer(block: DeepSpeedMoEBlock, forward, *args):
    """torch.utils.checkpoint of one decoder layer (HF's GradientCheckpointingLayer calls this).

    Non-reentrant: tensors that leave the layer other than its output (each block's aux losses) keep
    their gradient path, and the backward goes through the original graph with the saved tensors
    recomputed. Early stop is off so that every rank replays the whole layer, with each of its
    collectives (the capacity all-reduce, the dispatch and combine all-to-alls): ranks never disagree
    on the collectives they enter.
    """
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    with set_checkpoint_early_stop(False):
        return checkpoint(forward, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), _replaying(block)))


def enable_activation_checkpointing(model: FactorLLMTrainModel) -> None:
    """Recompute each decoder layer in the backward: one hidden state per layer stays from the forward."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for layer in model.model.layers:
        if not isinstance(layer, GradientCheckpointingLayer):
            raise RuntimeError(f"internal error: {type(layer).__name__} cannot be checkpointed (not a "
                               "transformers GradientCheckpointingLayer)")
        layer.gradient_checkpointing = True  # checked per call: only in training with grad enabled
        layer._gradient_checkpointing_func = functools.partial(_checkpoint_layer, layer.mlp)
        layer.mlp.checkpointed = True


class FactorLLMTrainModel(nn.Module):
    """The base family's decoder with DeepSpeed MoE blocks and the FactorLLM objective."""

    def __init__(self, config: FactorLLMConfig, shape: MoEShape, ep_size: int, objective: Objective):
        super().__init__()
        text = config.text_config
        text._attn_implementation = "sdpa"
        self.config = config
        self.objective = objective
        self.model = AutoModel.from_config(text)
        for layer in self.model.layers:
            layer.mlp = DeepSpeedMoEBlock(shape, text.hidden_act, ep_size, objective)
        self.tied = bool(getattr(text, "tie_word_embeddings", False))
        # Tied models reuse the embedding matrix as the output projection: no second copy.
        self.lm_head = None if self.tied else nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.teacher: nn.Module | None = None

    def attach_teacher(self, teacher: nn.Module) -> None:
        """The model whose next-token distribution the KL term pulls towards (train --teacher): frozen, in eval
        mode, and kept outside this module's parameters, state dict and ``.to()``: DeepSpeed neither
        optimizes, partitions nor checkpoints it."""
        teacher.eval().requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)

    def blocks(self) -> list[DeepSpeedMoEBlock]:
        return [layer.mlp for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        hidden = self.model(input_ids=input_ids, use_cache=False).last_hidden_state
        weight = self.model.embed_tokens.weight if self.tied else self.lm_head.weight
        logits = F.linear(hidden, weight)
        if labels is None:
            return logits
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))
        kd = ce.new_zeros(())
        distill = self.objective.resolved_distill_weight(self.teacher is not None)
        if distill:
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=input_ids, use_cache=False).logits[:, :-1]
            kd = distill_kl(logits[:, :-1], teacher_logits)
        aux = [b.last_aux for b in self.blocks()]
        pa = torch.stack([a.pa for a in aux]).sum()
        bal = torch.stack([a.balance for a in aux]).sum()
        loss = (1 - distill) * ce + distill * kd + self.objective.pa_weight * pa + self.objective.balance_weight * bal
        metrics = {"ce": ce.detach(), "kd": kd.detach(), "pa": pa.detach(), "balance": bal.detach(),
                   "agreement": torch.stack([a.agreement for a in aux]).mean().detach(),
                   "expert_counts": torch.stack([a.exp_counts for a in aux]).detach()}
        return loss, metrics


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) between next-token distributions, in fp32."""
    vocab = student_logits.shape[-1]
    log_p = F.log_softmax(teacher_logits.reshape(-1, vocab).float(), dim=-1)
    log_q = F.log_softmax(student_logits.reshape(-1, vocab).float(), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def ep_rank_of(ep_size: int) -> int:
    """This rank's position in its expert-parallel group (DeepSpeed's default layout)."""
    if not dist.is_initialized() or ep_size == 1:
        return 0
    return dist.get_rank() % ep_size


def build_train_model(moe_dir: Path, ep_size: int, objective: Objective, ep_rank: int,
                      activation_checkpointing: bool = False, shape: MoEShape | None = None) -> FactorLLMTrainModel:
    """Build on meta, then read shared weights and only this rank's experts from ``moe_dir``.

    ``activation_checkpointing``: recompute each decoder layer in the backward (enable_activation_checkpointing).
    ``shape``: the folder's MoE shape, when the caller built it already (train's validate).
    """
    config = FactorLLMConfig.from_pretrained(moe_dir)
    shape = shape or MoEShape.of_config(config.to_dict())
    objective = objective.for_model(config.to_dict())  # no-op when train resolved it already
    with torch.device("meta"):
        model = FactorLLMTrainModel(config, shape, ep_size, objective)
    reader = CheckpointReader(moe_dir)
    frozen = objective.prior == "frozen"
    state = {name: reader.get(name) for name in reader.names() if ".mlp." not in name}
    for layer, block in enumerate(model.blocks()):
        prefix = f"model.layers.{layer}.mlp."
        state[f"{prefix}{GATE_PREFIX}.weight"] = reader.get(keys.ROUTER_WEIGHT.format(layer=layer))
        state[f"{prefix}{SELECTION_BIAS}"] = torch.zeros(shape.num_experts)
        if shape.router_bias:
            state[f"{prefix}{GATE_PREFIX}.bias"] = reader.get(keys.ROUTER_BIAS.format(layer=layer))
        for part in keys.MLP_PARTS:
            experts = [reader.get(keys.expert_key(part, layer, ep_rank * block.num_local + local))
                       for local in range(block.num_local)]
            for local, tensor in enumerate(experts):
                state[f"{prefix}{EXPERT_PREFIX}.{local}.{part}_proj.weight"] = tensor
            if frozen:
                setattr(block, f"teacher_{part}", torch.stack(experts))
            if block.shared_expert is not None:
                shared = reader.get(keys.shared_expert_key(part, layer))
                state[f"{prefix}shared_expert.{part}_proj.weight"] = shared
                if frozen:
                    setattr(block, f"teacher_shared_{part}", shared.unsqueeze(0).clone())
    if model.tied:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or missing:
        raise RuntimeError(f"internal error loading {moe_dir}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    # assign=True swaps in new Parameter objects, losing the marks DeepSpeed's Experts set on
    # its parameters; without them ZeRO would treat experts as data-parallel weights.
    for block in model.blocks():
        for param in block.local_experts.parameters():
            param.allreduce = False
            param.group_name = block.moe.expert_group_name
    # Non-persistent buffers (rotary frequencies) were built on meta: rebuild them for real.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config.text_config)
    set_trainable(model)
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def set_trainable(model: FactorLLMTrainModel) -> None:
    """Experts and routers train; embeddings, attention, norms and lm_head stay frozen (paper)."""
    for name, param in model.named_parameters():
        param.requires_grad_(".mlp." in name)
