"""T=64 latency (against np.argpartition) and T=262144 time of route_logits, for the SIMD level
MOE_ROUTER_SIMD selects; one markdown table. Usage: MOE_ROUTER_SIMD=avx2 python benches/idle_latency.py"""
import time, os, sys, numpy as np, moe_router as mr
mr.set_num_threads(2)
rng = np.random.default_rng(0)
def best(f, n, reps=5):
    f()
    out=[]
    for _ in range(reps):
        t=time.perf_counter()
        for _ in range(n): f()
        out.append((time.perf_counter()-t)/n)
    return min(out), float(np.median(out))
rows=[]
for E,k in [(8,2),(64,2),(64,8),(256,8)]:
    cfg=mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=1.25)
    x=rng.normal(size=(64,E)).astype(np.float32)
    mn,md=best(lambda: mr.route_logits(x,cfg), 2000)
    ap,_=best(lambda: np.argpartition(x,-k,axis=1), 2000)
    big=rng.normal(size=(262144,E)).astype(np.float32)
    bmn,bmd=best(lambda: mr.route_logits(big,cfg), 1, reps=7)
    rows.append(f"| {E} | {k} | {md*1e6:.1f} | {ap*1e6:.1f} | {md/ap:.2f} | {bmd*1e3:.1f} |")
print(f"SIMD={os.environ.get('MOE_ROUTER_SIMD','auto')}")
print("| E | k | T=64 median us | argpartition us | ratio | T=262144 median ms |")
print("|---|---|---|---|---|---|")
print("\n".join(rows))
