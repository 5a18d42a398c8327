"""Experts that keep the model: shared-expert MoE structures against static pruning, no training.

SmolLM2-135M (assets), calibrated on KJV text, perplexity on held-out Botchan windows. Each
layer is converted in turn, on the hidden states that the already-converted layers below
produce (``--stream converted``; ``dense`` calibrates every layer on the dense model's states):
the layer's ``mlp`` is replaced by a module running the shared expert plus the K routed
experts its router picks (weight 1), so the numbers come from the real model code.

Runs (each cached under --work, so an interrupted benchmark continues):
  dense; static pruning (the top X% neurons by importance, on every token); structures
  ``S,E,K`` (shared fraction or count, routed experts, experts per token) with routers
  ``oracle`` (the K experts whose sum is closest to dense - shared), ``rep:M`` (each expert
  scored by its M most central neurons' summed contributions) and
  ``linear:LOSS[:bias|nobias][:gain|khot][:dense]`` (a linear router fitted per layer to the
  oracle's picks; LOSS in pa, ce, bce, ridge).

    python bench/bench_structures.py --structures 0.25,6,2 0.125,14,2 --routers oracle linear:pa:bias rep:32 \
        --importance contribution activation_rate --static 0.5 0.25 --out results.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import moe_lab as lab  # bench/: the script's own folder is on sys.path
import torch
from torch import nn

from factorllm_ds import structure as st
from factorllm_ds.split import SPLIT_METHODS


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--structures", nargs="*", default=["0.25,6,2", "0.125,14,6", "0.375,10,2", "0.125,14,2",
                                                        "0.125,28,4"], help="S,E,K: shared (fraction or count), E, k")
    p.add_argument("--routers", nargs="*", default=["oracle", "linear:pa:bias", "rep:32"])
    p.add_argument("--importance", nargs="+", default=["contribution", "activation_rate"], choices=st.IMPORTANCE_KINDS)
    p.add_argument("--static", nargs="*", type=float, default=[0.5, 0.25], help="kept fractions for static pruning")
    p.add_argument("--split", default="coactivation", choices=SPLIT_METHODS, help="how routed neurons are grouped")
    p.add_argument("--rate-fraction", type=float, default=0.1, help="activation_rate: top share of |a| per token")
    p.add_argument("--stream", default="converted", choices=["converted", "dense"],
                   help="calibrate each layer on the converted layers' hidden states, or the dense model's")
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--calib-offset", type=int, default=0, help="first KJV token used for calibration")
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--router-steps", type=int, default=300)
    p.add_argument("--router-lr", type=float, default=0.05)
    p.add_argument("--ridge", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="per-run result cache (default <cache>/bench_structures)")
    p.add_argument("--out", type=Path, default=None, help="write every row as JSON here")
    return p.parse_args()


# ----------------------------------------------------------------------------- routers as the layer runs them


class OracleRouter:
    def select(self, x_TH, shared_TH, routed_ETH, target_TH, k):
        return lab.oracle_topk(routed_ETH, shared_TH, target_TH, k)


class LinearRouter:
    def __init__(self, w_EH, b_E):
        self.w_EH, self.b_E = w_EH, b_E

    def select(self, x_TH, shared_TH, routed_ETH, target_TH, k):
        return lab.linear_topk(x_TH, self.w_EH, self.b_E, k)


class RepresentativeRouter:
    def __init__(self, gate_IH, up_IH, down_HI, reps_EM, act_fn):
        # only the representatives' rows are kept, renumbered 0..E*M-1
        flat = reps_EM.flatten()
        self.weights = (gate_IH[flat].contiguous(), up_IH[flat].contiguous(), down_HI[:, flat].contiguous())
        self.reps_EM, self.act_fn = torch.arange(flat.numel()).view(reps_EM.shape), act_fn

    def select(self, x_TH, shared_TH, routed_ETH, target_TH, k):
        return torch.topk(lab.representative_scores(x_TH, *self.weights, self.reps_EM, self.act_fn), k, dim=-1).indices


class StructuredMLP(nn.Module):
    """Shared expert + the K routed experts the router picks, weight 1, in place of a dense MLP.

    All routed outputs are computed (the oracle needs them, and so does the agreement count);
    the sum of the chosen ones equals ``moe_lab.moe_forward``'s sparse dispatch.
    """

    def __init__(self, weights: lab.SharedMoEWeights, k: int, router, dense: nn.Module):
        super().__init__()
        self.w, self.k, self.router, self.dense = weights, k, router, dense
        self.track = False
        self.hits, self.count = 0.0, 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x_TH = hidden.reshape(-1, hidden.shape[-1]).float()
        act = self.dense.act_fn
        shared_TH = lab.shared_output(x_TH, self.w, act)
        if self.k == 0:
            return shared_TH.to(hidden.dtype).view(hidden.shape)
        routed_ETH = lab.routed_outputs(x_TH, self.w, act)
        needs_target = isinstance(self.router, OracleRouter) or self.track
        target_TH = self.dense(x_TH).float() if needs_target else None
        idx_TK = self.router.select(x_TH, shared_TH, routed_ETH, target_TH, self.k)
        if self.track and not isinstance(self.router, OracleRouter):
            self.hits += lab.topk_agreement(idx_TK, lab.oracle_topk(routed_ETH, shared_TH, target_TH, self.k)) \
                * x_TH.shape[0]
            self.count += x_TH.shape[0]
        return lab.combine(shared_TH, routed_ETH, idx_TK).to(hidden.dtype).view(hidden.shape)


# ----------------------------------------------------------------------------- one run


def parse_router(spec: str) -> dict:
    parts = spec.split(":")
    kind = parts[0]
    if kind == "oracle":
        return {"kind": "oracle"}
    if kind == "rep":
        return {"kind": "rep", "m": int(parts[1]) if len(parts) > 1 else 32}
    if kind != "linear":
        raise SystemExit(f"--routers {spec}: expected oracle, rep:M or linear:LOSS[:bias|nobias][:gain|khot][:dense]")
    opts = set(parts[2:])
    unknown = opts - {"bias", "nobias", "gain", "khot", "dense"}
    if len(parts) < 2 or parts[1] not in lab.ROUTER_LOSSES or unknown:
        raise SystemExit(f"--routers {spec}: loss must be one of {lab.ROUTER_LOSSES}; options bias|nobias, gain|khot, "
                         f"dense (bad: {sorted(unknown)})")
    return {"kind": "linear", "loss": parts[1], "bias": "nobias" not in opts, "gain": "gain" in opts,
            "dense_fit": "dense" in opts}


def build_layer(run: dict, args, dense: nn.Module, x_TH: torch.Tensor, layer: int) -> tuple[StructuredMLP, float]:
    """Convert one layer from its calibration inputs; returns the module and the router's
    top-K agreement with the oracle on the calibration tokens (nan for the oracle itself)."""
    gate_IH, up_IH, down_HI = (dense.gate_proj.weight.float(), dense.up_proj.weight.float(),
                               dense.down_proj.weight.float())
    act_TI = dense.act_fn(x_TH @ gate_IH.T) * (x_TH @ up_IH.T)
    imp_I = st.neuron_importance(act_TI, down_HI, run["importance"], args.rate_fraction)
    seed = args.seed * 100_003 + layer
    if run["k"] == 0:  # static pruning: the shared block alone
        perm = st.shared_partition(imp_I, run["shared"], 1, "contiguous")
        return StructuredMLP(lab.slice_shared_moe(gate_IH, up_IH, down_HI, perm, run["shared"], 1), 0, None, dense), \
            float("nan")
    s, e, k = run["shared"], run["E"], run["k"]
    perm = st.shared_partition(imp_I, s, e, args.split, seed, act_TI=act_TI, weights=(gate_IH, up_IH, down_HI))
    weights = lab.slice_shared_moe(gate_IH, up_IH, down_HI, perm, s, e)
    router_spec = run["router"]
    if router_spec["kind"] == "oracle":
        return StructuredMLP(weights, k, OracleRouter(), dense), float("nan")
    shared_TH = st.group_outputs(act_TI, down_HI, perm[:s].unsqueeze(0))[0]
    routed_ETH = st.group_outputs(act_TI, down_HI, st.routed_groups(perm, s, e))
    target_TH = act_TI @ down_HI.T
    oracle_TK = lab.oracle_topk(routed_ETH, shared_TH, target_TH, k)
    if router_spec["kind"] == "rep":
        reps = lab.representative_neurons(act_TI, perm, s, e, router_spec["m"])
        router = RepresentativeRouter(gate_IH, up_IH, down_HI, reps, dense.act_fn)
    else:
        scores = lab.residual_gain(routed_ETH, target_TH - shared_TH) if router_spec["gain"] else None
        w_EH, b_E = lab.fit_router(x_TH, oracle_TK, e, bias=router_spec["bias"], loss=router_spec["loss"],
                                         scores_TE=scores, steps=args.router_steps, lr=args.router_lr,
                                         ridge=args.ridge)
        router = LinearRouter(w_EH, b_E)
    agree = lab.topk_agreement(router.select(x_TH, shared_TH, routed_ETH, target_TH, k), oracle_TK)
    return StructuredMLP(weights, k, router, dense), agree


class Converter(nn.Module):
    """Stands in for layer ``layer``'s mlp during the calibration pass: builds the structured MLP
    from the inputs it sees, installs it, and returns its output (or the dense one)."""

    def __init__(self, decoder_layer, dense, run, args, layer, keep_dense_stream: bool):
        super().__init__()
        self.decoder_layer, self.dense, self.run, self.args, self.layer = decoder_layer, dense, run, args, layer
        self.keep_dense_stream = keep_dense_stream
        self.agreement = float("nan")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x_TH = hidden.reshape(-1, hidden.shape[-1]).float()
        module, self.agreement = build_layer(self.run, self.args, self.dense, x_TH, self.layer)
        self.decoder_layer.mlp = module
        out = self.dense(hidden) if self.keep_dense_stream else module(hidden)
        return out


@torch.no_grad()
def convert_model(model, dense_mlps, run, args, calib_ids) -> list[float]:
    """Replace every layer's mlp, bottom up, calibrating each on the states below it; per-layer agreement."""
    inner = model.model
    hidden = inner.embed_tokens(calib_ids).float()
    pos = torch.arange(calib_ids.shape[1]).unsqueeze(0)
    pos_emb = inner.rotary_emb(hidden, pos)
    dense_fit = run.get("router", {}).get("dense_fit", False) or args.stream == "dense"
    agreements = []
    for i, layer in enumerate(inner.layers):
        conv = Converter(layer, dense_mlps[i], run, args, i, keep_dense_stream=dense_fit)
        layer.mlp = conv
        out = layer(hidden, attention_mask=None, position_ids=pos, position_embeddings=pos_emb)
        hidden = out[0] if isinstance(out, tuple) else out
        agreements.append(conv.agreement)
        if isinstance(layer.mlp, Converter):
            raise RuntimeError(f"layer {i}: the converter did not run")
    return agreements


def run_name(run: dict) -> str:
    if run["k"] == 0:
        return f"static{run['keep']}-{run['importance']}"
    r = run["router"]
    if r["kind"] == "linear":
        rs = "linear-" + r["loss"] + ("-bias" if r["bias"] else "-nobias") + ("-gain" if r["gain"] else "") + \
            ("-densefit" if r["dense_fit"] else "")
    else:
        rs = r["kind"] + (str(r["m"]) if r["kind"] == "rep" else "")
    return f"S{run['shared']}-E{run['E']}-k{run['k']}-{rs}-{run['importance']}"


def all_runs(args, inter: int) -> list[dict]:
    runs = []
    for imp in args.importance:
        for keep in args.static:
            runs.append({"importance": imp, "k": 0, "keep": keep, "shared": round(keep * inter), "E": 0})
    for spec in args.structures:
        s, e, k = spec.split(",")
        shared = st.parse_shared(s, inter)
        st.check_shared_split(inter, shared, int(e), int(k))
        for router in args.routers:
            for imp in args.importance:
                runs.append({"importance": imp, "shared": shared, "E": int(e), "k": int(k),
                             "router": parse_router(router), "router_spec": router})
    return runs


def active_share(run: dict, inter: int) -> float:
    if run["k"] == 0:
        return run["shared"] / inter
    return (run["shared"] + run["k"] * (inter - run["shared"]) // run["E"]) / inter


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from factorllm_ds import assets
    from factorllm_ds.calibration import read_text
    from factorllm_ds.evaluate import perplexity, token_windows

    model_dir = assets.smollm2_model_dir()
    work = args.work or assets.cache_dir() / "bench_structures"
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    kjv = tok(read_text(assets.kjv_text(), "kjv"), add_special_tokens=False)["input_ids"]
    need = args.calib_tokens // args.calib_seq_len * args.calib_seq_len
    calib_ids = torch.tensor(kjv[args.calib_offset:args.calib_offset + need]).view(-1, args.calib_seq_len)
    botchan = tok(read_text(assets.botchan_text(), "botchan"), add_special_tokens=False)["input_ids"]
    windows = token_windows(botchan, args.eval_seq_len, args.eval_windows)

    def load():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        return model.eval()

    model = load()
    inter = model.config.intermediate_size
    setting = {k: getattr(args, k) for k in ("split", "rate_fraction", "stream", "calib_tokens", "calib_seq_len",
                                             "calib_offset", "eval_windows", "eval_seq_len", "router_steps",
                                             "router_lr", "ridge", "seed")}
    key = hashlib.sha1(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:8]
    dense_file = work / f"dense-{args.eval_windows}x{args.eval_seq_len}.json"
    if not dense_file.is_file():
        started = time.time()
        dense_ppl = perplexity(model, windows)
        dense_file.write_text(json.dumps({"ppl": dense_ppl, "seconds": time.time() - started}))
    dense_ppl = json.loads(dense_file.read_text())["ppl"]
    rows = [{"name": "dense", "active": 1.0, "ppl": dense_ppl, "over_dense": 1.0}]
    print(json.dumps(rows[0]), file=sys.stderr, flush=True)
    dense_mlps = [layer.mlp for layer in model.model.layers]
    for run in all_runs(args, inter):
        name = run_name(run)
        cache = work / f"{name}-{key}.json"
        if cache.is_file():
            rows.append(json.loads(cache.read_text()))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            continue
        started = time.time()
        calib_agree = convert_model(model, dense_mlps, run, args, calib_ids)
        convert_s = time.time() - started
        blocks = [layer.mlp for layer in model.model.layers]
        for b in blocks:
            b.track = True
        ppl = perplexity(model, windows)
        held = [b.hits / b.count for b in blocks if b.count]
        row = {"name": name, "active": active_share(run, inter), "shared": run["shared"], "E": run["E"], "k": run["k"],
               "router": run.get("router_spec", "static"), "importance": run["importance"], "ppl": ppl,
               "over_dense": ppl / dense_ppl,
               "agree_calib": (sum(calib_agree) / len(calib_agree)) if not math.isnan(calib_agree[0]) else None,
               "agree_heldout": (sum(held) / len(held)) if held else None,
               "agree_heldout_per_layer": held or None,
               "convert_s": round(convert_s, 1), "eval_s": round(time.time() - started - convert_s, 1),
               "settings": setting}
        cache.write_text(json.dumps(row, indent=1))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("agree_heldout_per_layer", "settings")}),
              file=sys.stderr, flush=True)
        for i, layer in enumerate(model.model.layers):
            layer.mlp = dense_mlps[i]
    print_table(rows, args)
    if args.out:
        meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor() or
                platform.machine(), "threads": args.threads, "torch": torch.__version__, "argv": sys.argv[1:]}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def print_table(rows: list[dict], args) -> None:
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"\ncalibration {args.calib_tokens} KJV tokens ({args.stream} stream, split {args.split}); "
          f"eval Botchan {args.eval_windows}x{args.eval_seq_len}\n")
    print("| run | active | router | importance | ppl | ppl/dense | agree calib | agree held-out |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['active']:.3f} | {r.get('router', '–')} | {r.get('importance', '–')} | "
              f"{r['ppl']:.2f} | {r['over_dense']:.2f} | {fmt(r.get('agree_calib'))} | {fmt(r.get('agree_heldout'))} |")


if __name__ == "__main__":
    main()
