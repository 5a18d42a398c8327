"""The router ladder (issue 22): every router fit on the same experts, in domain and out of it.

SmolLM2-135M (assets), converted layer by layer as ``convert`` does it (importance, shared expert,
co-activation split, the oracle's picks, the router fit, the down-projection refit, each on the
hidden states of the already-converted layers below), with one router method at a time. Held-out
texts flow through the same converted layers in the same pass, twice: once routed by the fitted
router, once by the oracle (per token, the k experts whose sum is closest to the sum of all current
experts: ``eval --router oracle``). Per method and held-out text: perplexity with the fitted router,
with the oracle, their ratio, and the fitted router's top-k recall of the oracle's picks (mean over
layers; the oracle computed on the fitted stream's own inputs).

Equal-compute baseline in every table: static pruning of the same active fraction (the top neurons by
importance, on every token) with the same down refit; the floor: the per-token neuron limit (each
token keeps its own top neurons by contribution |a_i|·||W_down[:, i]||, same count as the MoE runs).

    python bench/bench_router.py --structures 0.25,48,16 --methods picks gate --calib kjv --eval botchan tech code

Methods are ``structure.ROUTER_FITS`` (docs/method.md §4). Each row is cached under --work.
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

import torch
import torch.nn.functional as F

from factorllm_ds import assets, structure as st
from factorllm_ds.data import read_text
from factorllm_ds.hf_model.modeling_factorllm import prior_topk
from factorllm_ds.split import SPLIT_METHODS

TEXTS = {"kjv": assets.kjv_text, "botchan": assets.botchan_text, "tech": assets.technical_text,
         "code": assets.code_text}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--structures", nargs="+", default=["0.25,48,16"], help="S,E,K: shared fraction, E, k")
    p.add_argument("--methods", nargs="+", default=list(st.ROUTER_FITS))
    p.add_argument("--static", nargs="*", type=float, default=[], help="active fractions for static pruning + refit")
    p.add_argument("--limit", action="store_true", help="also the per-token neuron limit at each structure's fraction")
    p.add_argument("--calib", nargs="+", default=["kjv"], choices=list(TEXTS), help="calibration texts (mixed)")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--eval", nargs="+", default=["botchan", "tech", "code"], choices=list(TEXTS))
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--split", default="coactivation", choices=SPLIT_METHODS, help="how routed neurons are grouped")
    p.add_argument("--refit-down", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="row cache (default <cache>/bench_router)")
    p.add_argument("--out", type=Path, default=None, help="also write every row as JSON here")
    p.add_argument("--plot", type=Path, default=None, help="PNG: perplexity / dense against the active fraction, "
                   "on the first --eval text, for every run (the quality-compute frontier)")
    return p.parse_args()


# ----------------------------------------------------------------------------- token streams


def token_ids(tok, names: list[str]) -> list[int]:
    return tok(read_text([TEXTS[n]() for n in names], "text"), add_special_tokens=False)["input_ids"]


def calibration_ids(tok, names: list[str], tokens: int, seq_len: int, skip: dict[str, int]) -> torch.Tensor:
    """``tokens`` calibration tokens in ``seq_len`` sequences, an equal share from each text (convert reads
    one file's first tokens; a mixed corpus is the texts interleaved by sequence); ``skip``: tokens to pass
    over at the start of a text (its held-out windows, when it is also scored)."""
    per = tokens // seq_len // len(names)
    seqs = []
    for name in names:
        ids = token_ids(tok, [name])[skip.get(name, 0):]
        if len(ids) < per * seq_len:
            raise SystemExit(f"--calib {name}: {len(ids)} tokens, fewer than the {per * seq_len} needed")
        seqs.append(torch.tensor(ids[: per * seq_len]).view(per, seq_len))
    return torch.stack(seqs, dim=1).reshape(-1, seq_len)  # interleaved: every text in every block


def eval_windows(tok, name: str, windows: int, seq_len: int, skip: int = 0) -> torch.Tensor:
    ids = token_ids(tok, [name])[skip:]
    num = min(windows, len(ids) // seq_len)
    return torch.tensor(ids[: num * seq_len]).view(num, seq_len)


# ----------------------------------------------------------------------------- one layer, as convert builds it


class Layer:
    """The converted MLP of one layer at neuron level: who is shared, each expert's neurons, router, down."""

    def __init__(self, mlp, x_TH: torch.Tensor, run: dict, args, layer: int):
        gate_IH, up_IH, down_HI = (mlp.gate_proj.weight.float(), mlp.up_proj.weight.float(),
                                   mlp.down_proj.weight.float())
        self.gate_IH, self.up_IH, self.act = gate_IH, up_IH, mlp.act_fn
        act_TI = self.activations(x_TH)
        target_TH = act_TI @ down_HI.T
        imp_I = st.neuron_importance(act_TI, down_HI)
        inter = gate_IH.shape[0]
        self.kind = run["kind"]
        if self.kind in ("static", "limit"):
            self.keep = round(run["active"] * inter)
            self.down_HI = down_HI
            self.perm = torch.argsort(imp_I, descending=True)
            if self.kind == "static":
                gates_TI = torch.zeros_like(act_TI)
                gates_TI[:, self.perm[:self.keep]] = 1.0
                self._refit(act_TI, gates_TI, target_TH, args.refit_down)
            self.out_calib = self.output(act_TI, self.gates(x_TH, act_TI, "fitted"))
            return
        s, e, k = run["shared"], run["E"], run["k"]
        self.s, self.e, self.k = s, e, k
        seed = args.seed * 100_003 + layer
        self.perm = st.shared_partition(imp_I, s, e, args.split, seed, act_TI=act_TI, weights=(gate_IH, up_IH, down_HI))
        groups_ER = st.routed_groups(self.perm, s, e)
        routed_ETH = st.group_outputs(act_TI, down_HI, groups_ER)
        oracle_TK = prior_topk(routed_ETH, routed_ETH.sum(dim=0), k, "subset", 1.0)
        y_TE = st.router_targets(run["method"], routed_ETH, oracle_TK)
        self.router_EH, self.bias_E = st.fit_router(run["method"], x_TH, y_TE, act_TI, groups_ER, gate_IH, up_IH,
                                                     down_HI)
        del routed_ETH
        self.down_HI = down_HI
        picked_TK = self.learned_topk(x_TH)
        self.calib_recall = recall(picked_TK, oracle_TK)
        gates_TI = self.neuron_gates(picked_TK)
        self._refit(act_TI, gates_TI, target_TH, args.refit_down)
        self.out_calib = self.output(act_TI, gates_TI)

    def _refit(self, act_TI, gates_TI, target_TH, ridge):
        if ridge:
            self.down_HI = st.refit_down(act_TI, gates_TI, self.down_HI, target_TH, ridge)

    def activations(self, x_TH):
        return self.act(x_TH @ self.gate_IH.T) * (x_TH @ self.up_IH.T)

    def learned_topk(self, x_TH):
        return torch.topk(F.linear(x_TH, self.router_EH, self.bias_E), self.k, dim=-1).indices

    def oracle_topk(self, act_TI):
        groups_ER = st.routed_groups(self.perm, self.s, self.e)
        routed_ETH = st.group_outputs(act_TI, self.down_HI, groups_ER)
        return prior_topk(routed_ETH, routed_ETH.sum(dim=0), self.k, "subset", 1.0)

    def neuron_gates(self, idx_TK):
        return st.neuron_gates(idx_TK, torch.ones(idx_TK.shape), self.perm, self.s, self.e)

    def gates(self, x_TH, act_TI, router: str) -> torch.Tensor:
        if self.kind == "static":
            g = torch.zeros_like(act_TI)
            g[:, self.perm[:self.keep]] = 1.0
            return g
        if self.kind == "limit":  # each token its own top neurons by contribution
            contrib_TI = act_TI.abs() * self.down_HI.norm(dim=0)
            return torch.zeros_like(act_TI).scatter_(1, torch.topk(contrib_TI, self.keep, dim=1).indices, 1.0)
        idx_TK = self.learned_topk(x_TH) if router == "fitted" else self.oracle_topk(act_TI)
        return self.neuron_gates(idx_TK)

    def output(self, act_TI, gates_TI):
        return (act_TI * gates_TI) @ self.down_HI.T


def recall(pred_TK: torch.Tensor, target_TK: torch.Tensor) -> float:
    return float((pred_TK.unsqueeze(-1) == target_TK.unsqueeze(-2)).any(dim=-1).float().mean())


class Swap(torch.nn.Module):
    """Stands in for a decoder layer's mlp: calls ``fn`` on the flat inputs."""

    def __init__(self):
        super().__init__()
        self.fn = None

    def forward(self, hidden):
        return self.fn(hidden.reshape(-1, hidden.shape[-1]).float()).to(hidden.dtype).view(hidden.shape)


@torch.no_grad()
def run_one(model, dense_mlps, run: dict, args, calib_ids, evals: dict) -> dict:
    inner = model.model
    streams = {"calib": calib_ids}
    for name, ids in evals.items():
        streams[f"{name}/fitted"] = ids
        if run["kind"] == "moe":
            streams[f"{name}/oracle"] = ids
    hidden = {n: inner.embed_tokens(ids).float() for n, ids in streams.items()}
    pos = {n: torch.arange(ids.shape[1]).unsqueeze(0) for n, ids in streams.items()}
    pos_emb = {n: inner.rotary_emb(hidden[n], pos[n]) for n in streams}
    hits = {name: [] for name in evals}
    calib_recall = []
    for i, decoder in enumerate(inner.layers):
        swap = decoder.mlp = Swap()
        built = {}

        def build(x_TH, built=built, i=i):  # bound now: called within this layer's loop turn
            built["layer"] = Layer(dense_mlps[i], x_TH, run, args, i)
            return built["layer"].out_calib

        def apply(stream, built=built):
            def fn(x_TH):
                layer = built["layer"]
                act_TI = layer.activations(x_TH)
                router = stream.split("/")[1]
                if run["kind"] == "moe" and router == "fitted":
                    hits[stream.split("/")[0]].append(recall(layer.learned_topk(x_TH), layer.oracle_topk(act_TI)))
                return layer.output(act_TI, layer.gates(x_TH, act_TI, router))
            return fn

        for name in streams:
            swap.fn = build if name == "calib" else apply(name)
            out = decoder(hidden[name], attention_mask=None, position_ids=pos[name], position_embeddings=pos_emb[name])
            hidden[name] = out[0] if isinstance(out, tuple) else out
        if run["kind"] == "moe":
            calib_recall.append(built["layer"].calib_recall)
        decoder.mlp = dense_mlps[i]
    row = {}
    for name, ids in streams.items():
        if name == "calib":
            continue
        logits = model.lm_head(inner.norm(hidden[name]))
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        row[f"ppl/{name}"] = math.exp(float(nll))
    for name in evals:
        if run["kind"] == "moe":
            row[f"recall/{name}"] = sum(hits[name]) / len(hits[name])
            row[f"ratio/{name}"] = row[f"ppl/{name}/fitted"] / row[f"ppl/{name}/oracle"]
    if calib_recall:
        row["recall/calib"] = sum(calib_recall) / len(calib_recall)
    return row


# ----------------------------------------------------------------------------- the table


def all_runs(args, inter: int) -> list[dict]:
    runs = []
    for spec in args.structures:
        s, e, k = spec.split(",")
        shared = st.parse_shared(s, inter)
        e, k = int(e), int(k)
        st.check_shared_split(inter, shared, e, k)
        active = (shared + k * (inter - shared) // e) / inter
        runs += [{"kind": "moe", "shared": shared, "E": e, "k": k, "method": m, "active": active,
                  "name": f"S{shared}-E{e}-k{k}-{m}"} for m in args.methods]
        if args.limit:
            runs.append({"kind": "limit", "active": active, "name": f"limit{active:.3f}"})
    runs += [{"kind": "static", "active": f, "name": f"static{f:.3f}"} for f in args.static]
    return runs


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = assets.smollm2_model_dir()
    work = args.work or assets.cache_dir() / "bench_router"
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    # a held-out text that is also a calibration text is scored on its first windows, as every other text, and
    # calibrates on the tokens after them (calibration on the served domain, not on the scored tokens)
    held = {n: args.eval_windows * args.eval_seq_len for n in args.eval if n in args.calib}
    calib_ids = calibration_ids(tok, args.calib, args.calib_tokens, args.calib_seq_len, held)
    evals = {n: eval_windows(tok, n, args.eval_windows, args.eval_seq_len) for n in args.eval}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    dense_mlps = [layer.mlp for layer in model.model.layers]
    setting = {k: getattr(args, k) for k in ("calib", "calib_tokens", "calib_seq_len", "eval", "eval_windows",
                                             "eval_seq_len", "refit_down", "seed", "split")}
    if set(args.calib) & set(args.eval):
        setting["calib_after_eval"] = True  # the convention above (rows before it scored after the calibration)
    key = hashlib.sha1(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:8]
    rows = []
    dense_file = work / f"dense-{key}.json"
    if not dense_file.is_file():
        dense = {}
        with torch.no_grad():
            for name, ids in evals.items():
                logits = model(input_ids=ids).logits
                dense[f"ppl/{name}"] = math.exp(float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                                      ids[:, 1:].reshape(-1))))
        dense_file.write_text(json.dumps(dense))
    dense = json.loads(dense_file.read_text())
    print(json.dumps({"name": "dense", **dense}), file=sys.stderr, flush=True)
    for run in all_runs(args, model.config.intermediate_size):
        cache = work / f"{run['name']}-{key}.json"
        if cache.is_file():
            rows.append(json.loads(cache.read_text()))
        else:
            started = time.time()
            row = {**run, **run_one(model, dense_mlps, run, args, calib_ids, evals),
                   "seconds": round(time.time() - started, 1)}
            cache.write_text(json.dumps(row, indent=1))
            rows.append(row)
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print_table(rows, dense, args)
    if args.plot:
        plot_frontier(rows, dense, args.eval[0], args.plot)
    if args.out:
        meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": platform.processor() or platform.machine(), "threads": args.threads,
                "torch": torch.__version__, "argv": sys.argv[1:], "settings": setting}
        args.out.write_text(json.dumps({"meta": meta, "dense": dense, "rows": rows}, indent=1))


def plot_frontier(rows: list[dict], dense: dict, text: str, path: Path) -> None:
    from plots import plot_fractions  # bench/plots.py, beside this script

    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        ratio = r[f"ppl/{text}/fitted"] / dense[f"ppl/{text}"]
        label = {"static": "static pruning + refit", "limit": "per-token neuron limit"}.get(
            r["kind"], f"MoE, {r.get('method')} router")
        series.setdefault(label, []).append((r["active"], ratio))
        if r.get(f"ppl/{text}/oracle"):
            series.setdefault("MoE, oracle router", []).append(
                (r["active"], r[f"ppl/{text}/oracle"] / dense[f"ppl/{text}"]))
    plot_fractions([(f"perplexity / dense ({text}, held out)", series)],
                   "SmolLM2-135M, untrained conversion: quality against compute", path)


def print_table(rows: list[dict], dense: dict, args) -> None:
    print(f"\ncalibration: {'+'.join(args.calib)}, {args.calib_tokens} tokens; held out: {args.eval_windows} x "
          f"{args.eval_seq_len} tokens of each text; down refit d = {args.refit_down}\n")
    head = "| run | active | " + " | ".join(
        f"{n} fitted | {n} oracle | {n} fitted/oracle | {n} fitted/dense | {n} recall" for n in args.eval) + \
        " | calib recall |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        cells = []
        for n in args.eval:
            fitted = r[f"ppl/{n}/fitted"]
            oracle = r.get(f"ppl/{n}/oracle")
            cells.append(f"{fitted:.2f} | {'–' if oracle is None else f'{oracle:.2f}'} | "
                         f"{'–' if oracle is None else f'{fitted / oracle:.3f}'} | {fitted / dense[f'ppl/{n}']:.3f} | "
                         f"{r[f'recall/{n}']:.3f}" if f"recall/{n}" in r else
                         f"{fitted:.2f} | – | – | {fitted / dense[f'ppl/{n}']:.3f} | –")
        calib = r.get("recall/calib")
        print(f"| {r['name']} | {r['active']:.3f} | " + " | ".join(cells) +
              f" | {'–' if calib is None else f'{calib:.3f}'} |")
    print("| dense | 1.000 | " + " | ".join(f"{dense[f'ppl/{n}']:.2f} | – | – | 1.000 | –" for n in args.eval)
          + " | – |")


if __name__ == "__main__":
    main()
