"""Cost of `convert --refit-down` per layer against the layer's own calibration forward (issue 13).

The refit (factorllm_ds.structure.refit_down, docs/method.md §4) solves one I x I ridge system per
layer: about 2·T·I² flops for the Gram matrix, I³/3 for its Cholesky factor and 2·I²·H for the
solve, where the layer's calibration forward (gate, up, down over T tokens) costs 6·T·H·I. So the
ratio grows with I (and shrinks with T). This prints, for each FFN shape, the measured seconds of
both on random data (the arithmetic does not depend on the values) and their ratio, in one run.

    python bench/bench_refit.py [--tokens 4096] [--shapes 576x1536 2048x8192 5120x13824] [--threads N]

A shape is HIDDENxINTERMEDIATE (SmolLM2-135M: 576x1536; LLaMA-3.2-1B: 2048x8192; LLaMA-2-13B:
5120x13824; LLaMA-3-70B: 8192x28672). Memory: the I x I system and two T x I activations in fp32.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from factorllm_ds.structure import refit_down


def best_of(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(hidden: int, inter: int, tokens: int, reps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen)
    gate = torch.randn(inter, hidden, generator=gen) * hidden ** -0.5
    up = torch.randn(inter, hidden, generator=gen) * hidden ** -0.5
    down = torch.randn(hidden, inter, generator=gen) * inter ** -0.5
    act = None

    def forward():
        nonlocal act
        act = F.silu(x @ gate.T) * (x @ up.T)
        return act @ down.T

    forward_s = best_of(forward, reps)
    target = act @ down.T
    gates = (torch.rand(tokens, inter, generator=gen) < 0.5).float()  # half of the neurons on per token
    refit_s = best_of(lambda: refit_down(act, gates, down, target, ridge=4.0), reps)
    return {"shape": f"{hidden}x{inter}", "forward_s": forward_s, "refit_s": refit_s, "ratio": refit_s / forward_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens (convert's --calib-tokens default)")
    p.add_argument("--shapes", nargs="+", default=["576x1536", "2048x8192", "5120x13824"])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, "
          f"T = {args.tokens} tokens, best of {args.reps}")
    print("| FFN (H x I) | calibration forward s | refit s | refit / forward |\n|---|---|---|---|")
    for shape in args.shapes:
        hidden, inter = (int(v) for v in shape.split("x"))
        r = measure(hidden, inter, args.tokens, args.reps)
        print(f"| {r['shape']} | {r['forward_s']:.3f} | {r['refit_s']:.3f} | {r['ratio']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
