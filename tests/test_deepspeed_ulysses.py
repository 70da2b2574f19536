"""Our Ulysses against DeepSpeed's `DistributedAttention` (the reference implementation),
on CPU/gloo: same inputs, same outputs and gradients."""

import torch

from longtrain.parallel.attention import sequence_parallel_attention, shard_sequence
from tests.dist import mesh_for


class _LocalSDPA(torch.nn.Module):
    def forward(self, q, k, v, *args, **kwargs):  # [b, s, h, d]
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return out.transpose(1, 2)


def compare_with_deepspeed(seed):
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention

    deepspeed.init_distributed(dist_backend="gloo")  # reuses the existing process group
    mesh = mesh_for(cp_ulysses=2)
    g = torch.Generator().manual_seed(seed)
    b, s, h, d = 2, 64, 4, 16
    q, k, v, dout = (torch.randn(b, s, h, d, generator=g) for _ in range(4))
    results = []
    for impl in ("ours", "deepspeed"):
        ql, kl, vl = (shard_sequence(t, mesh).requires_grad_() for t in (q, k, v))
        if impl == "ours":
            out = sequence_parallel_attention(ql, kl, vl, mesh, causal=True)
        else:
            ds = DistributedAttention(_LocalSDPA(), mesh.group("cp_ulysses"), scatter_idx=2, gather_idx=1)
            out = ds(ql, kl, vl, 0)
        out.backward(shard_sequence(dout, mesh))
        results.append([out.detach(), ql.grad, kl.grad, vl.grad])
    return [(a - b).abs().max().item() for a, b in zip(*results)]


def test_matches_deepspeed_distributed_attention(pool2):
    for errs in pool2.run(compare_with_deepspeed, 0):
        assert max(errs) < 1e-5, errs
