"""Seed 000's two-optimizer GAN loop, copied from the seed with only the import paths changed.

Why the seed's loop is safe although ``gen_optim`` is built over ``model.parameters()``,
which includes ``model.loss_fn.discriminator``:

* the generator update gives the discriminator no gradient at all (``compute_loss`` freezes
  it for the forward, besides the loop's own ``requires_grad = False``), and every
  ``zero_grad()`` sets gradients to None, so AdamW skips the discriminator's parameters in
  ``gen_optim.step()`` -- weight decay included;
* before ``disc_start`` the discriminator update returns a ``disc_loss`` whose backward
  reaches no discriminator parameter, so ``disc_optim.step()`` leaves it untouched too.

Global optimizer hooks watch every ``step()`` of the copied loop and check exactly that.
"""
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

TINY = dict(patch_size=8, dino_dim=24, encoder_depth=1, encoder_num_heads=2, decoder_depth=1,
            dino_head_depth=1, codebook_dim=8)


def tiny_dataloader(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.randn(2, 16, 24, generator=g)


class StepWatch:
    """Records, for each optimizer step, whether the discriminator's weights moved."""

    def __init__(self, model):
        self.disc = list(model.loss_fn.discriminator.parameters())
        self.gen_ids = {id(p) for p in model.generator_parameters()}
        self.events = []   # (which optimizer, discriminator moved?)
        self._before = None
        self.handles = [register_optimizer_step_pre_hook(self.pre), register_optimizer_step_post_hook(self.post)]

    def which(self, opt):
        ids = {id(p) for g in opt.param_groups for p in g["params"]}
        return "gen" if ids & self.gen_ids else "disc"

    def pre(self, opt, args, kwargs):
        self._before = [p.detach().clone() for p in self.disc]

    def post(self, opt, args, kwargs):
        moved = any(not torch.equal(a, p) for a, p in zip(self._before, self.disc))
        self.events.append((self.which(opt), moved))

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("disc_start", [2])
def test_seed_gan_loop(disc_start):
    from losses.dinovq_model import DinoVQModel

    torch.manual_seed(0)
    model = DinoVQModel(
        img_size=(32, 32),
        encoder_embed_dim=32,
        codebook_size=16,
        # 启用GAN loss
        use_gan=True,
        disc_start=disc_start,  # 10000 in the seed: here 2 steps
        disc_weight=0.5,
        disc_dim=8,
        disc_num_layers=2,
        disc_adaptive_weight=True,  # 自适应权重
        **TINY,
    )
    num_steps = 5
    dataloader = tiny_dataloader(num_steps)
    gen_before = [p.detach().clone() for p in model.generator_parameters()]
    watch = StepWatch(model)
    try:
        # ---------------- copied from seed 000 (imports adapted) ----------------
        # 创建两个optimizer
        from train.optimizer import get_optimizer

        # Generator optimizer (包括encoder/decoder/quantizer)
        gen_optim = get_optimizer(model.parameters(), lr=1e-4, wd=0.0)

        # Discriminator optimizer (单独优化)
        disc_optim = get_optimizer(
            model.loss_fn.discriminator.parameters(),
            lr=1e-4,
            wd=0.0
        )

        # === 训练时需要分开更新 ===
        for step in range(num_steps):
            imgs, dino_gt = next(dataloader)

            # 1. 更新Generator
            # 冻结discriminator，避免gen_adv_loss梯度传播到disc
            for p in model.loss_fn.discriminator.parameters():
                p.requires_grad = False

            gen_losses = model.compute_loss(
                imgs,
                dino_gt,
                update_type="generator",
                global_step=step,
            )

            gen_loss = gen_losses['total_loss']
            gen_loss.backward()
            gen_optim.step()
            gen_optim.zero_grad()

            # 2. 更新Discriminator
            # 解冻discriminator
            for p in model.loss_fn.discriminator.parameters():
                p.requires_grad = True

            disc_losses = model.compute_loss(
                imgs,
                dino_gt,
                update_type="discriminator",
                global_step=step,
            )

            disc_loss = disc_losses['disc_loss']
            disc_loss.backward()
            disc_optim.step()
            disc_optim.zero_grad()
        # ---------------- end of the seed's loop ----------------
    finally:
        watch.close()

    # gen, disc alternate; the generator optimizer never moves the discriminator, and the
    # discriminator only moves from disc_start on.
    assert [w for w, _ in watch.events] == ["gen", "disc"] * num_steps
    gen_moves = [moved for w, moved in watch.events if w == "gen"]
    disc_moves = [moved for w, moved in watch.events if w == "disc"]
    assert not any(gen_moves)
    assert disc_moves == [step >= disc_start for step in range(num_steps)]
    # The generator did train, and the seed's gen_optim holds the discriminator's parameters
    # (model.parameters()) -- safe as shown above.
    assert any(not torch.equal(a, p) for a, p in zip(gen_before, model.generator_parameters()))
    held = {id(p) for g in gen_optim.param_groups for p in g["params"]}
    assert {id(p) for p in model.loss_fn.discriminator.parameters()} <= held
    assert float(disc_losses["disc_weight"]) == 1.0 and set(gen_losses) >= {"gen_adv_loss"}


def test_seed_trainer_class_no_gan_branch():
    """The seed's DinoVQTrainer without GAN: one optimizer over model.parameters()."""
    from losses.dinovq_model import DinoVQModel
    from train.optimizer import get_optimizer

    torch.manual_seed(0)
    model = DinoVQModel(img_size=(32, 32), encoder_embed_dim=32, codebook_size=16, **TINY)
    assert not model.use_gan
    optim = get_optimizer(model.parameters(), lr=1e-3, wd=0.05)
    first = None
    for imgs, dino_gt in tiny_dataloader(1):
        for _ in range(8):
            # === 无GAN: 标准训练 === (seed's train_step, verbatim apart from the loop)
            losses = model.compute_loss(imgs, dino_gt)
            total_loss = losses['total_loss']
            total_loss.backward()
            optim.step()
            optim.zero_grad()
            first = float(total_loss.detach()) if first is None else first
    assert float(total_loss.detach()) < first
