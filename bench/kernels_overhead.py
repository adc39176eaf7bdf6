"""Where the time of one headslim kernel call goes on a GPU: host overhead vs kernel time.

For SDPA and headslim's encoder kernel (B32 T128 H12 D64 fp16, with and without a padding mask), the
bare Triton launch, and a batch-1 ragged decode step it prints ``do_bench``'s time, the GPU kernel
time per call (``torch.profiler``), the host time to issue one call, and a cProfile of 500 calls.
Usage, on a GPU machine from the repository root after ``pip install -e .``::

    python bench/kernels_overhead.py > bench/results/gpu/profile_after.txt
"""
import cProfile
import io
import pstats
import sys
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from headslim.kernels import attention as A
from headslim.kernels import encoder_attention, head_groups, ragged_decode_attention

dev = "cuda"
torch.manual_seed(0)


def gpu_kernel_us(fn, n=50):
    from torch.profiler import ProfilerActivity, profile
    fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    tot = sum(e.device_time_total for e in prof.key_averages())
    names = sorted(((e.device_time_total / n, e.key) for e in prof.key_averages()), reverse=True)[:6]
    return tot / n, names


def host_us(fn, n=300):
    fn(); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


def report(name, fn):
    ms = do_bench(fn, warmup=25, rep=200)
    k, names = gpu_kernel_us(fn)
    h = host_us(fn)
    print(f"{name}: do_bench {ms * 1000:.1f} us | GPU kernels {k:.1f} us/call | host issue {h:.1f} us/call")
    for t, key in names:
        print(f"    {t:8.1f} us  {key[:90]}")


B, T, H, D = 32, 128, 12, 64
x = torch.randn(B, T, 3 * H * D, device=dev, dtype=torch.float16)
q, k, v = (t.view(B, T, H, D) for t in x.split(H * D, -1))
qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
mask = torch.ones(B, T, device=dev, dtype=torch.long)
mask[::2, 100:] = 0
report("sdpa B32 T128 H12 D64", lambda: F.scaled_dot_product_attention(qt, kt, vt))
report("encoder nomask", lambda: encoder_attention(q, k, v, None, backend="triton"))
report("encoder mask", lambda: encoder_attention(q, k, v, mask, backend="triton"))

# the launch alone, all metadata precomputed
groups = A._identity_groups(H, "cuda")
kv_len, kv_start, kv_stop, m8 = A._mask_metadata(None, None, B, T, q.device)
out = torch.empty(B, T, H, D, device=dev, dtype=q.dtype)
kmod = A._kernel_module()
cfg = A._launch_config(q, k, T, decode=False)
launch = lambda: kmod.launch_attention(q, k, v, out, None, kv_len, kv_start, kv_stop, groups.q_head_index,  # noqa
                                       groups.offsets, 1, causal=False, mask_queries=False, softmax_scale=0.125,
                                       num_splits=1, dot_precision="ieee", **cfg)
report("launch_attention only", launch)

pr = cProfile.Profile()
fn = lambda: encoder_attention(q, k, v, None, backend="triton")  # noqa
for _ in range(20):
    fn()
torch.cuda.synchronize()
pr.enable()
for _ in range(500):
    fn()
torch.cuda.synchronize()
pr.disable()
s = io.StringIO()
pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
print(s.getvalue()[:5000])

# decode, batch 1
kv = torch.tensor(sum(([g] * n for g, n in enumerate([4, 2, 3, 5, 1, 3, 3])), []), device=dev)
grp = head_groups(kv, 7)
qd = torch.randn(1, 1, 21, 128, device=dev, dtype=torch.float16)
kc = torch.randn(1, 1024, 7, 128, device=dev, dtype=torch.float16)
vc = torch.randn(1, 1024, 7, 128, device=dev, dtype=torch.float16)
sl = torch.tensor([1024], device=dev, dtype=torch.int32)
report("decode B1 cache1024", lambda: ragged_decode_attention(qd, kc, vc, grp, cache_seqlens=sl, backend="triton"))
print("splits chosen:", A._choose_splits(qd, kc, grp, 16, 64), file=sys.stdout)
