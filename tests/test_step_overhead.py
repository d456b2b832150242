"""The training step's host-device traffic and its non-finite / fp16 bookkeeping.

* A real tiny fit (taming's modules, EMA codebook, GAN on, 2 accumulated micro-batches)
  reads device values on the host once per optimizer step: the step vote.  Every way a
  tensor reaches Python (``item``, ``tolist``, ``bool`` / ``float`` / ``int``, ``cpu``,
  ``numpy``) is counted while it trains.
* A finite loss with a non-finite gradient is still a bad step (the vote carries the
  gradient norms), and changes nothing.
* fp16: ``Side.step`` / ``Side.skip`` after one host read do what ``GradScaler.step`` +
  ``update`` do with their own reads (same weights, same scale), on the real CPU GradScaler.
"""
import copy
import sys

import pytest
import torch

from tests.test_fit import tiny_config
from train.config import load_config
from train.data import resolve_data
from train.sides import Side
from train.trainer import Trainer

CONVERSIONS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


def host_read_counter(monkeypatch):
    """Counts every tensor -> Python conversion from now on; returns the list of call sites.

    Two kinds are left out, neither of which waits for a device on a GPU run either: the
    optimizer's step counter (torch keeps Adam's ``state["step"]`` on the host unless
    ``capturable``) and the loader's per-file skip flags that ``Trainer._prepare`` counts
    (a host tensor from the DataLoader)."""
    sites = []

    def counted(name, original):
        def conversion(self, *args, **kwargs):
            frame = sys._getframe(1)
            where = frame.f_code.co_filename
            if not ("torch/optim/" in where or frame.f_code.co_name == "_prepare"):
                sites.append(f"{name} at {where}:{frame.f_lineno} ({frame.f_code.co_name})")
            return original(self, *args, **kwargs)
        return conversion

    for name in CONVERSIONS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    return sites


def test_one_host_read_per_optimizer_step(tmp_path, monkeypatch):
    cfg = load_config(tiny_config(tmp_path, use_gan=True, disc_start=0, accumulate_grad_batches=2,
                                  log_every=1000, image_every=1000, ckpt_every=1000), ["train.max_steps=5"])
    trainer = Trainer(cfg, resolve_data(cfg), None, use_bar=False)
    sites = host_read_counter(monkeypatch)
    marks = {}

    def mark(batch, step):
        marks.setdefault(step, len(sites))     # reads so far, at the step's first micro-batch
        return batch

    trainer.batch_augmenter = mark
    result = trainer.fit()
    monkeypatch.undo()
    assert result.steps == 5 and result.bad_steps == 0
    # Steps 1-3 whole (forward, backward, both optimizer steps, callbacks): one read each,
    # the vote's (generator and discriminator losses on 2 micro-batches, 2 grad norms).
    per_step = [marks[s + 1] - marks[s] for s in (1, 2, 3)]
    assert per_step == [1, 1, 1], sites[marks[1]:marks[4]]
    assert all("rank_sync.py" in s and "(read)" in s for s in sites[marks[1]:marks[4]])


def test_a_non_finite_gradient_with_a_finite_loss_skips_the_step(tmp_path):
    cfg = load_config(tiny_config(tmp_path, use_gan=True, disc_start=0, log_every=1), ["train.max_steps=3"])
    trainer = Trainer(cfg, resolve_data(cfg), None, use_bar=False)
    poisoned, before = {"on": False}, {}
    weight = trainer.model.decoder.conv_out.weight
    weight.register_hook(lambda g: g * float("nan") if poisoned["on"] else g)

    def spy(batch, step):
        poisoned["on"] = step == 1
        before[step] = copy.deepcopy(trainer.model.state_dict()), copy.deepcopy(trainer.disc.module.state_dict())
        return batch

    trainer.batch_augmenter = spy
    result = trainer.fit()
    assert result.steps == 3 and result.bad_steps == 1
    for now, later in zip(before[1], before[2]):       # step 1 (skipped) changed nothing
        for k, v in now.items():
            assert torch.equal(v, later[k]), k
    assert not torch.equal(before[0][0]["encoder.conv_in.weight"], before[1][0]["encoder.conv_in.weight"])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def _scaled_pair(seed=0):
    """Two identical (linear layer, Adam, CPU GradScaler) triples."""
    torch.manual_seed(seed)
    net = torch.nn.Linear(4, 3)
    twin = copy.deepcopy(net)
    made = []
    for module in (net, twin):
        opt = torch.optim.Adam(module.parameters(), lr=0.1)
        made.append((module, opt, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)))
    return made


@pytest.mark.parametrize("poison", [False, True])
def test_fp16_side_step_matches_the_grad_scalers_own_step(poison):
    (net, opt, scaler), (twin, twin_opt, twin_scaler) = _scaled_pair()
    side = Side("generator", net, list(net.parameters()), opt, scaler, clip=1.0)
    x = torch.randn(5, 4)
    for i in range(3):          # growth_interval 2: the scale grows after finite steps
        bad = poison and i == 1
        side.zero_grad()
        twin_opt.zero_grad(set_to_none=True)
        side.backward(net(x).pow(2).mean() * (float("inf") if bad else 1.0))
        twin_scaler.scale(twin(x).pow(2).mean() * (float("inf") if bad else 1.0)).backward()
        norm = side.unscale_and_clip()
        assert torch.is_tensor(norm) and bool(torch.isfinite(norm)) == (not bad)
        side.step(grads_finite=bool(torch.isfinite(norm)))
        twin_scaler.unscale_(twin_opt)
        torch.nn.utils.clip_grad_norm_(list(twin.parameters()), 1.0)
        twin_scaler.step(twin_opt)
        twin_scaler.update()
        assert scaler.get_scale() == twin_scaler.get_scale()
        for p, q in zip(net.parameters(), twin.parameters()):
            assert torch.equal(p, q)
    assert scaler.get_scale() == (2.0 ** 9 if poison else 2.0 ** 11)


def test_fp16_skip_after_unscale_leaves_the_scaler_usable():
    (net, opt, scaler), _ = _scaled_pair()
    side = Side("generator", net, list(net.parameters()), opt, scaler, clip=None)
    weights = [p.detach().clone() for p in net.parameters()]
    side.zero_grad()
    side.backward(net(torch.randn(2, 4)).sum() * float("nan"))
    side.unscale_and_clip()
    side.skip()         # the guard's undo: no optimizer step, the scaler saw the NaN gradients
    assert all(torch.equal(p, w) for p, w in zip(net.parameters(), weights))
    assert all(p.grad is None for p in net.parameters())
    assert scaler.get_scale() == 2.0 ** 9
    side.zero_grad()
    side.backward(net(torch.randn(2, 4)).sum())
    assert bool(torch.isfinite(side.unscale_and_clip()))      # unscale_ again: no "already unscaled"
    side.step(grads_finite=True)
    assert not all(torch.equal(p, w) for p, w in zip(net.parameters(), weights))
