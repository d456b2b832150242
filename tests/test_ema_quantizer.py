"""EMA vector quantizer: numerics against an independent reference, layout, gradients, DDP.

    .venv/bin/python -m pytest -q tests/test_ema_quantizer.py
"""
import os

import numpy as np
import pytest
import torch

from adapters.ema_quantizer import EMAVectorQuantizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- an independent reference: float64 numpy, one vector and one code at a time ----------

def reference_ema_step(weight, cluster_size, embed_avg, z, decay, eps, beta):
    """Upstream taming's EMA step written out by hand.

    weight/embed_avg: (K, D), cluster_size: (K,), z: (B, D, H, W) -- all float64 numpy.
    Returns (indices (B*H*W,), loss, z_q (B, D, H, W), new weight, cluster_size, embed_avg).
    """
    k, d = weight.shape
    b, _, h, w = z.shape
    vectors = [z[i, :, y, x] for i in range(b) for y in range(h) for x in range(w)]
    indices = []
    for v in vectors:
        best, best_dist = None, None
        for j in range(k):
            dist = sum((v[c] - weight[j, c]) ** 2 for c in range(d))
            if best_dist is None or dist < best_dist:
                best, best_dist = j, dist
        indices.append(best)
    # quantized vectors and the commitment loss use the codebook before the update
    z_q = np.zeros_like(z)
    sq = 0.0
    for n, (i, y, x) in enumerate((i, y, x) for i in range(b) for y in range(h) for x in range(w)):
        z_q[i, :, y, x] = weight[indices[n]]
        sq += sum((weight[indices[n], c] - z[i, c, y, x]) ** 2 for c in range(d))
    loss = beta * sq / z.size

    counts = np.zeros(k)
    sums = np.zeros((k, d))
    for n, v in enumerate(vectors):
        counts[indices[n]] += 1
        sums[indices[n]] += v
    new_cluster = decay * cluster_size + (1 - decay) * counts
    new_avg = decay * embed_avg + (1 - decay) * sums
    total = new_cluster.sum()
    new_weight = np.zeros_like(weight)
    for j in range(k):
        smoothed = (new_cluster[j] + eps) / (total + k * eps) * total
        new_weight[j] = new_avg[j] / smoothed
    return np.array(indices), loss, z_q, new_weight, new_cluster, new_avg


def test_numerics_match_reference_over_several_updates():
    torch.manual_seed(0)
    k, d, decay, eps, beta = 12, 4, 0.9, 1e-5, 0.25
    q = EMAVectorQuantizer(k, d, beta=beta, decay=decay, eps=eps).train()
    weight = q.embedding.weight.double().numpy().copy()
    cluster = q.embedding.cluster_size.double().numpy().copy()
    avg = q.embedding.embed_avg.double().numpy().copy()
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        # data drifts, so codes move and some stay unused (exercises the smoothing)
        z = torch.randn(2, d, 3, 3, generator=gen) * 1.5 + 0.3 * step
        z_q, loss, (perplexity, min_encodings, indices) = q(z)
        ref_idx, ref_loss, ref_zq, weight, cluster, avg = reference_ema_step(
            weight, cluster, avg, z.double().numpy(), decay, eps, beta)
        assert indices.tolist() == ref_idx.tolist(), f"step {step}"
        assert min_encodings is None
        np.testing.assert_allclose(z_q.detach().numpy(), ref_zq, rtol=1e-5, atol=1e-5)
        assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
        np.testing.assert_allclose(q.embedding.cluster_size.numpy(), cluster, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(q.embedding.embed_avg.numpy(), avg, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(q.embedding.weight.numpy(), weight, rtol=1e-4, atol=1e-5)
        counts = np.bincount(ref_idx, minlength=k) / len(ref_idx)
        ref_ppl = np.exp(-(counts * np.log(counts + 1e-10)).sum())
        assert perplexity.item() == pytest.approx(ref_ppl, rel=1e-5)
    # the codebook really moved towards the data
    assert float(q.embedding.cluster_size.sum()) > 0


def test_state_dict_layout_is_upstreams(tmp_path):
    q = EMAVectorQuantizer(16, 8)
    shapes = {k: tuple(v.shape) for k, v in q.state_dict().items()}
    assert shapes == {"embedding.weight": (16, 8), "embedding.cluster_size": (16,),
                      "embedding.embed_avg": (16, 8)}
    used = tmp_path / "used.npy"
    np.save(used, np.arange(0, 16, 2))
    qr = EMAVectorQuantizer(16, 8, remap=str(used))
    assert set(qr.state_dict()) == set(shapes) | {"used"}
    # round trip into a fresh quantizer, strictly
    fresh = EMAVectorQuantizer(16, 8)
    fresh.load_state_dict(q.state_dict(), strict=True)
    assert torch.equal(fresh.embedding.weight, q.embedding.weight)


def test_codebook_never_requires_grad_and_straight_through():
    torch.manual_seed(0)
    q = EMAVectorQuantizer(8, 4).train()
    assert list(q.parameters()) == []  # nothing an optimizer could pick up
    for t in (q.embedding.weight, q.embedding.cluster_size, q.embedding.embed_avg):
        assert not t.requires_grad
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, loss, _ = q(z)
    upstream_grad = torch.randn_like(z_q)
    z_q.backward(upstream_grad)
    # straight-through: the gradient passes to z unchanged
    assert torch.equal(z.grad, upstream_grad)
    z.grad = None
    loss.backward()
    # commitment only: d/dz beta*mean((sg[z_q]-z)^2) = 2*beta*(z - z_q)/N
    expected = 2 * 0.25 * (z.detach() - z_q.detach()) / z.numel()
    torch.testing.assert_close(z.grad, expected)
    for t in (q.embedding.weight, q.embedding.cluster_size, q.embedding.embed_avg):
        assert t.grad is None and not t.requires_grad


def test_updates_only_in_training_mode():
    torch.manual_seed(0)
    q = EMAVectorQuantizer(8, 4)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    z = torch.randn(2, 4, 3, 3)
    q.eval()
    q(z)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    q.train()
    q.update = False
    q(z)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    q.update = True
    q(z)
    assert not torch.equal(before["embedding.cluster_size"], q.embedding.cluster_size)


def test_statistics_stay_float32_under_autocast():
    torch.manual_seed(0)
    q = EMAVectorQuantizer(8, 4).train()
    z = torch.randn(2, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, loss, _ = q(z.to(torch.bfloat16))
    assert z_q.dtype == torch.bfloat16
    for t in q.state_dict().values():
        assert t.dtype == torch.float32


def test_remap_and_sane_index_shape(tmp_path):
    torch.manual_seed(0)
    used = tmp_path / "used.npy"
    np.save(used, np.arange(8))  # all codes used: remapped index == code index
    q = EMAVectorQuantizer(8, 4, remap=str(used), sane_index_shape=True).eval()
    z = torch.randn(2, 4, 3, 5)
    z_q, _, (_, _, idx) = q(z)
    assert idx.shape == (2, 3, 5)
    back = q.get_codebook_entry(idx.reshape(-1), (2, 3, 5, 4))
    torch.testing.assert_close(back, z_q)


def test_two_rank_torchrun_keeps_identical_codebooks(torchrun_jobs):
    """2 CPU processes (gloo), different data per rank: codebooks end identical and equal to
    one process seeing both ranks' data (the all-reduced update)."""
    r0 = torch.load(torchrun_jobs / "ema" / "rank0.pt", weights_only=True)
    r1 = torch.load(torchrun_jobs / "ema" / "rank1.pt", weights_only=True)
    # the two ranks saw different batches ...
    assert not torch.equal(r0["data"], r1["data"])
    # ... and still hold bit-identical codebooks (quantizer alone, and inside a DDP model)
    for key in r0["quantizer"]:
        assert torch.equal(r0["quantizer"][key], r1["quantizer"][key]), key
    for key in r0["model_codebook"]:
        assert torch.equal(r0["model_codebook"][key], r1["model_codebook"][key]), key
    assert r0["model_codebook"]["embedding.cluster_size"].sum() > 0

    # single process over the concatenated batches reproduces the distributed result
    from tests.dist_ema_worker import make_quantizer, run_updates
    single = make_quantizer()
    run_updates(single, [torch.cat([a, b]) for a, b in zip(r0["data"], r1["data"])])
    for key, value in single.state_dict().items():
        torch.testing.assert_close(r0["quantizer"][key], value, rtol=1e-5, atol=1e-5)
    # whereas rank-local updates (upstream's behaviour) would have drifted apart
    local0, local1 = make_quantizer(), make_quantizer()
    run_updates(local0, list(r0["data"]))
    run_updates(local1, list(r1["data"]))
    assert not torch.allclose(local0.embedding.weight, local1.embedding.weight)
