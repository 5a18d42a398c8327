"""One MoE layer's routed experts, each kernel of the shipped model against the dense FFN it came from.

    python bench/bench_kernels.py                          # SmolLM2-135M's FFN shape (H 576, I 1536), 1,024 tokens
    python bench/bench_kernels.py --hidden 4096 --intermediate 11008 --tokens 2048 --threads 8

For each E (k = E/2 unless --top-k-frac), random weights and routing: the time of `FactorLLMExperts`
with each kernel (`loop`: one matmul pair per expert on its sorted tokens; `all`: every expert on
every token, unselected ones weighted 0; `grouped`: torch's grouped_mm, CUDA only) and of the dense
SwiGLU FFN of the same width, median of --reps, in one process; the figure is dense time / kernel
time (the kernel's speed-up over the dense FFN, whose Amdahl limit here is E/k), and which kernel
`auto` picks. docs/method.md §8 explains the kernels.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from factorllm_ds.hf_model.modeling_factorllm import FactorLLMExperts


def median_seconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536, help="routed neurons of the layer")
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--top-k-frac", type=float, default=0.5, help="k = E * this")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    hidden, inter = args.hidden, args.intermediate
    x_TH = torch.randn(args.tokens, hidden, generator=gen).to(dev)
    gate_up = (torch.randn(2 * inter, hidden, generator=gen) * hidden ** -0.5).to(dev)
    down = (torch.randn(hidden, inter, generator=gen) * inter ** -0.5).to(dev)

    def dense() -> torch.Tensor:
        g, u = F.linear(x_TH, gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(g) * u, down)

    kernels = ["loop", "all"] + (["grouped"] if dev.type == "cuda" and hasattr(F, "grouped_mm") else [])
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.no_grad():
        dense_s = median_seconds(lambda: (dense(), sync()), args.reps)
        print(f"dense FFN H {hidden} I {inter}, {args.tokens} tokens on {dev}"
              + (f", {torch.get_num_threads()} threads" if dev.type == "cpu" else "")
              + f": {dense_s * 1e3:.1f} ms (median of {args.reps})")
        print(f"{'E':>4} {'k':>4} {'I_e':>5} {'auto':>8} " + " ".join(f"{name + ' ms':>11} {'x dense':>7}"
                                                                 for name in kernels))
        for num_experts in args.experts:
            if inter % num_experts:
                print(f"{num_experts:4d}: skipped ({inter} neurons do not split into {num_experts} experts)")
                continue
            k = max(1, round(num_experts * args.top_k_frac))
            experts = FactorLLMExperts(num_experts, hidden, inter // num_experts, "silu").to(dev)
            idx_TK = torch.randn(args.tokens, num_experts, generator=gen).to(dev).topk(k, dim=-1).indices
            w_TK = torch.ones(args.tokens, k, device=dev)
            cells, reference = [], None
            for name in kernels:
                experts.kernel = name
                out = experts(x_TH, idx_TK, w_TK)
                reference = out if reference is None else reference
                err = float((out - reference).abs().max() / reference.abs().max())
                if err > 1e-4:
                    raise SystemExit(f"kernel {name} differs from loop by {err:.2e} (E={num_experts})")
                t = median_seconds(lambda e=experts, i=idx_TK, w=w_TK: (e(x_TH, i, w), sync()), args.reps)
                cells.append(f"{t * 1e3:11.1f} {dense_s / t:7.2f}")
            experts.kernel = "auto"
            print(f"{num_experts:4d} {k:4d} {inter // num_experts:5d} {experts._kernel(x_TH):>8} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
