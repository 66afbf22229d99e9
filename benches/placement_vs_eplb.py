#!/usr/bin/env python3
"""``plan_placement`` against DeepSeek's own ``eplb.py`` on random skewed loads.

DeepSeek's ``rebalance_experts`` (github.com/deepseek-ai/EPLB, needs torch) runs in a subprocess with
``--torch-python`` (default: the peers venv), on ``--cases`` random requests (1, 2 or 4 nodes, up to 16
ranks, replicas from none to E/N per rank, Pareto loads, so no ties). Here, for each case, the multiset
of expected rank loads and the copies per expert are compared with ``plan_placement`` on the same
request, where EPLB puts at most one copy of an expert on each rank; where EPLB puts two copies of one
expert on a rank (which ``plan_placement`` never does), the two max/mean rank loads are compared.

    python benches/placement_vs_eplb.py --eplb PATH/TO/eplb.py [--torch-python /work/peers-venv/bin/python]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import moe_router as mr

GENERATE = """
import importlib.util, sys, numpy as np, torch
spec = importlib.util.spec_from_file_location("eplb", sys.argv[1])
eplb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eplb)
rebalance_experts = eplb.rebalance_experts
rng, cases = np.random.default_rng(int(sys.argv[3])), []
for _ in range(int(sys.argv[4])):
    nodes = int(rng.choice([1, 1, 2, 4])); ranks = nodes * int(rng.integers(1, 5))
    groups = nodes * int(rng.integers(1, 4)); experts = groups * int(rng.integers(1, 5))
    slots = ranks * int(rng.integers(-(-experts // ranks), experts // nodes + 1))
    load = rng.pareto(1.2, size=experts) * 100 + rng.random(experts)
    phy2log = rebalance_experts(torch.tensor(load[None]), slots, groups, nodes, ranks)[0][0].numpy()
    cases.append((load, ranks, slots, nodes, groups, phy2log))
np.save(sys.argv[2], np.array(cases, dtype=object), allow_pickle=True)
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--eplb", type=Path, required=True, help="DeepSeek's eplb.py")
    p.add_argument("--torch-python", default="/work/peers-venv/bin/python", help="a Python with torch")
    p.add_argument("--cases", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cases.npy"
        subprocess.run([a.torch_python, "-c", GENERATE, str(a.eplb.resolve()), str(out), str(a.seed),
                        str(a.cases)], check=True)
        cases = np.load(out, allow_pickle=True)
    same, differ, ratios = 0, 0, []
    for load, ranks, slots, nodes, groups, phy2log in cases:
        per = slots // ranks
        held = [phy2log[r * per:(r + 1) * per] for r in range(ranks)]
        copies = np.bincount(phy2log, minlength=load.size)
        theirs = [sum(load[e] / copies[e] for e in h) for h in held]
        ours = mr.plan_placement(load, ranks, num_replicas=slots, num_nodes=nodes, num_groups=groups)
        if all(len(set(h.tolist())) == per for h in held):
            agree = np.allclose(sorted(theirs), sorted(ours.rank_load_after), rtol=1e-9)
            agree = agree and (ours.replica_counts == copies).all()
            same, differ = same + bool(agree), differ + (not agree)
        else:
            ratios.append(ours.imbalance_after / (max(theirs) / (load.sum() / ranks)))
    r = np.array(ratios)
    print(f"{len(cases)} random requests (seed {a.seed}).")
    print(f"EPLB with at most one copy of an expert per rank: {same + differ}; plan_placement gives the same "
          f"rank loads and copies in {same}, different in {differ}.")
    if r.size:
        print(f"EPLB with two copies of an expert on one rank: {r.size}; plan_placement's max/mean rank load "
              f"over EPLB's: median {np.median(r):.3f}, range {r.min():.3f}-{r.max():.3f}; lower in "
              f"{int((r < 1 - 1e-12).sum())}, higher in {int((r > 1 + 1e-12).sum())}.")
    return 0 if differ == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
