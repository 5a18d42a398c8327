"""The MoE shape: how one dense SwiGLU FFN becomes an MoE layer, and the rules that shape must keep.

Every command builds one :class:`MoEShape` (convert from the dense config and its flags, the others from a
converted folder's config.json) and hands it down; :func:`shape_problems` is the one place the rules are
checked and worded.

The letters below name the same thing everywhere in the package: in tensor names (``x_TH``, ``w_EH``),
shape comments (``# [E, T, H]``) and docs.

    T  tokens                         H  hidden size
    I  neurons of the dense FFN (intermediate_size)
    S  neurons of the always-on shared expert (0: none)
    E  routed experts                 R  neurons per routed expert, (I - S) / E
    K  experts per token (k, --top-k)
    L  decoder layers                 V  vocabulary
    P  expert-parallel ranks (--ep-size) that share the experts of one group
    U  the tokens of all P ranks of such a group (P x T)
    N  some of the I neurons          G  groups of neurons
    F  features of a fit              Q  rank of a low-rank predictor
    O  outputs of a fit

A partition is a permutation ``perm`` of the I neurons: ``perm[:S]`` is the shared expert and routed expert e
owns ``perm[S + e*R : S + (e+1)*R]``. Each expert is three tensors, :func:`part_shape` of its neuron count.
"""

from __future__ import annotations

from dataclasses import dataclass

MLP_PARTS = ("gate", "up", "down")  # a SwiGLU FFN's projections, in the order every file lists them


def part_shape(part: str, rows, hidden) -> tuple:
    """The shape of one projection of ``rows`` neurons: gate and up are [rows, H], down is [H, rows].

    Any dimension objects go (ints, or hf_io's (name, value) pairs that name a config field)."""
    return (hidden, rows) if part == "down" else (rows, hidden)


@dataclass(frozen=True)
class MoEShape:
    """One MoE layer as every command sees it: its sizes and how the selected experts are combined.

    ``intermediate_size`` (and so every size derived from it) is None only while the dense model is not read
    yet (the demo's flags); ``hidden_size`` and ``num_layers`` are None where a command does not need them.
    """

    num_experts: int  # E
    top_k: int  # K
    intermediate_size: int | None = None  # I
    shared_size: int = 0  # S
    hidden_size: int | None = None  # H
    num_layers: int | None = None  # L
    routing: str = "hard"  # hard: weight s on each selected expert; softmax: renormalized top-k probabilities x s
    scale: float = 1.0  # s, resolved (hf_model's default_combine_scale)
    router_bias: bool = True  # the router is W x + b (else W x)

    @classmethod
    def of_config(cls, config: dict) -> MoEShape:
        """The shape of a converted folder's config.json (``model_type`` factorllm); a field it lacks takes the
        shipped model config's default, as the model itself does when it loads."""
        from factorllm_ds.hf_model.configuration_factorllm import FactorLLMConfig

        fields = ("num_experts", "num_experts_per_tok", "routing", "combine_scale", "router_bias",
                  "shared_intermediate_size")
        moe = FactorLLMConfig(**{k: v for k, v in config.items() if k in fields})
        text = config.get("text_config") or {}
        return cls(num_experts=int(moe.num_experts), top_k=int(moe.num_experts_per_tok),
                   intermediate_size=text.get("intermediate_size"), shared_size=moe.shared_intermediate_size,
                   hidden_size=text.get("hidden_size"),
                   num_layers=text.get("num_hidden_layers", config.get("num_hidden_layers")), routing=moe.routing,
                   scale=moe.scale, router_bias=bool(moe.router_bias))

    @property
    def routed_size(self) -> int | None:
        """I - S: the neurons the E routed experts split."""
        return None if self.intermediate_size is None else self.intermediate_size - self.shared_size

    @property
    def expert_size(self) -> int | None:
        """R = (I - S) / E: neurons per routed expert."""
        return None if self.routed_size is None else self.routed_size // self.num_experts

    @property
    def active_fraction(self) -> float:
        """The share of the FFN's neurons each token runs: (S + K R) / I."""
        return (self.shared_size + self.top_k * self.expert_size) / self.intermediate_size

    def expert_shapes(self) -> dict[str, tuple[int, int]]:
        """Each routed expert's tensors: gate, up [R, H] and down [H, R]."""
        return {part: part_shape(part, self.expert_size, self.hidden_size) for part in MLP_PARTS}

    def shared_shapes(self) -> dict[str, tuple[int, int]]:
        """The shared expert's tensors: gate, up [S, H] and down [H, S] (empty without one)."""
        return {part: part_shape(part, self.shared_size, self.hidden_size) for part in MLP_PARTS} \
            if self.shared_size else {}

    def valid_num_experts(self, low: int = 1, high: int | None = None) -> list[int]:
        """Every E from ``low`` to ``high`` (default: I - S) that splits the I - S routed neurons equally."""
        routed = self.routed_size
        return [e for e in range(max(low, 1), min(routed, high or routed) + 1) if routed % e == 0]


# ----------------------------------------------------------------------------- the rules


@dataclass(frozen=True)
class Wording:
    """How one command's messages name the shape's numbers. The rules are the same for every wording; the
    sentences are the commands' own (tests pin them), so a command picks one of those below."""

    experts: str = "--num-experts"  # E as its flag (or argument) is named
    top_k: str = "--top-k"
    shared: str = "--shared-neurons"
    ep_size: str = "--ep-size"
    top_k_bound: str = "--num-experts ({E})"  # E in the top-k rule
    ep_bound: str = "the number of experts ({E})"  # E in the ep rule
    world: str = "the world size ({world} processes)"  # the ranks in the ep rule
    divides: str = "does not divide"  # E and the routed neurons
    valid: str = "valid E: {valid}"  # the E that would, listed from valid_from to valid_to (default: all)
    valid_from: int = 2
    valid_to: int | None = None
    valid_shown: int | None = 16  # at most this many listed, then ", ..."


CONVERT_WORDING = Wording()  # E and k are the user's flags
# E is the converted model's own (train, eval, bench-speed): a broken config.json is named as such
MODEL_WORDING = Wording(experts="config.json's num_experts", shared="config.json's shared_intermediate_size",
                        top_k_bound="the model's {E} experts")
PLAN_WORDING = Wording(top_k_bound="E={E}", world="--gpus {world}", divides="must divide",
                       valid="E from 2 to {valid_to} that would: {valid}", valid_to=64, valid_shown=None)
DEMO_WORDING = Wording(ep_bound="--num-experts ({E})", world="--nproc ({world})")
ARGUMENT_WORDING = Wording(experts="num_experts", top_k="top_k", shared="num_shared", ep_size="ep_size",
                           top_k_bound="num_experts ({E})", divides="must divide", valid="valid: {valid}",
                           valid_from=1, valid_shown=24)  # structure.py's ValueError, for library callers


def _valid_list(shape: MoEShape, wording: Wording) -> str:
    valid = shape.valid_num_experts(wording.valid_from, wording.valid_to)
    shown = valid if wording.valid_shown is None else valid[:wording.valid_shown]
    listed = ", ".join(map(str, shown)) + (", ..." if len(shown) < len(valid) else "")
    return wording.valid.format(valid=listed or "none", valid_to=wording.valid_to)


def expert_problems(shape: MoEShape, wording: Wording) -> list[str]:
    """S within the FFN, E >= 1 and dividing the I - S routed neurons, 1 <= k <= E."""
    w, experts, inter, shared = wording, shape.num_experts, shape.intermediate_size, shape.shared_size
    if inter is not None and not 0 <= shared < inter:
        return [f"{w.shared} {shared}: must be in [0, {inter}) (the FFN intermediate size)"]
    if experts < 1:
        return [f"{w.experts} {experts}: must be >= 1"]
    problems = []
    routed = shape.routed_size
    if routed is not None and (routed < experts or routed % experts):
        what = (f"the FFN intermediate size {inter}" if not shared else
                f"the {routed} routed neurons (intermediate size {inter} - {shared} shared)")
        problems.append(f"{w.experts} {experts} {w.divides} {what}; {_valid_list(shape, w)}")
    if not 1 <= shape.top_k <= experts:
        problems.append(f"{w.top_k} {shape.top_k}: must be between 1 and {w.top_k_bound.format(E=experts)}")
    return problems


def ep_problems(num_experts: int, ep_size: int, world: int | None, wording: Wording) -> list[str]:
    """Expert parallelism: ep_size >= 1 divides E (each rank holds E / ep_size experts) and the ranks."""
    w = wording
    if ep_size < 1:
        return [f"{w.ep_size} {ep_size}: must be >= 1"]
    problems = []
    if num_experts >= 1 and num_experts % ep_size:
        problems.append(f"{w.ep_size} {ep_size} must divide {w.ep_bound.format(E=num_experts)}")
    if world is not None and world >= 1 and world % ep_size:
        problems.append(f"{w.ep_size} {ep_size} must divide {w.world.format(world=world)}")
    return problems


def seq_len_problems(seq_len: int, max_positions: int | None) -> list[str]:
    """``--seq-len`` against the model: at least 2 tokens (one prediction), at most its positions."""
    if seq_len < 2:
        return [f"--seq-len {seq_len}: must be >= 2 (a sequence predicts seq_len - 1 tokens)"]
    if isinstance(max_positions, int) and 0 < max_positions < seq_len:
        return [f"--seq-len {seq_len} exceeds the model's max_position_embeddings ({max_positions}); use --seq-len "
                f"{max_positions} or less"]
    return []


def shape_problems(shape: MoEShape, wording: Wording = CONVERT_WORDING, *, ep_size: int | None = None,
                   world: int | None = None, seq_len: int | None = None,
                   max_positions: int | None = None) -> list[str]:
    """Every rule the shape breaks, worded by ``wording``: :func:`expert_problems`, then with ``ep_size`` the
    expert-parallel rule over ``world`` ranks, then with ``seq_len`` the sequence length against
    ``max_positions`` (the model's max_position_embeddings)."""
    problems = expert_problems(shape, wording)
    if ep_size is not None:
        problems += ep_problems(shape.num_experts, ep_size, world, wording)
    if seq_len is not None:
        problems += seq_len_problems(seq_len, max_positions)
    return problems
