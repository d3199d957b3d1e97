"""Alternating in-process timing of sdpa (is_causal) against the chunked kernel at several block
sizes: python benchmarks/bench_attention_kernel.py THREADS N fwd|bwd REPEATS QBxKB... ; prints
sdpa time / chunked time (higher is better) from the minimum over repeats."""
import sys, time, torch
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))
from anyformer.nn.attention.chunked import chunked_attention
import torch.nn.functional as F
th = int(sys.argv[1]); n = int(sys.argv[2]); bwd = sys.argv[3] == "bwd"; reps=int(sys.argv[4]); cfgs=[tuple(map(int,c.split("x"))) for c in sys.argv[5:]]
torch.set_num_threads(th); torch.manual_seed(0)
q, k, v = (torch.randn(1, 8, n, 64, requires_grad=bwd) for _ in range(3))
def mk(f):
    def g():
        o = f()
        if bwd: o.sum().backward()
    return g
fns = {"sdpa": mk(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))}
for a, b in cfgs: fns[f"c{a}x{b}"] = mk(lambda a=a, b=b: chunked_attention(q, k, v, causal=True, q_block=a, k_block=b))
best = {kk: 1e9 for kk in fns}
with (torch.enable_grad() if bwd else torch.no_grad()):
    for f in fns.values(): f()
    for r in range(reps):
        for kk, f in fns.items():
            t = time.perf_counter(); f(); best[kk] = min(best[kk], time.perf_counter() - t)
print(f"th={th} n={n} {'bwd' if bwd else 'fwd'} sdpa={best['sdpa']*1e3:.0f}ms " + " ".join(f"{kk}={best['sdpa']/v:.2f}x" for kk, v in best.items() if kk!='sdpa'))
