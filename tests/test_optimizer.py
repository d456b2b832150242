"""get_optimizer: AdamW, no decay on norms / biases / embeddings / codebooks."""
import pytest
import torch
from torch import nn

from train.optimizer import get_optimizer, split_decay


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.tok = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 8)
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.LayerNorm(8)
        self.gn = nn.GroupNorm(2, 8)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(16, 8)   # taming's codebook layout
        self.frozen = nn.Linear(8, 8).requires_grad_(False)


def ids(params):
    return {id(p) for p in params}


def test_module_groups():
    net = Net()
    decay, no_decay = split_decay(net)
    assert ids(decay) == ids([net.proj.weight, net.conv.weight])
    assert ids(no_decay) == ids([net.pos_embed, net.cls_token, net.tok.weight, net.proj.bias, net.conv.bias,
                                 net.norm.weight, net.norm.bias, net.gn.weight, net.gn.bias,
                                 net.quantize.embedding.weight])
    opt = get_optimizer(net, lr=1e-3, wd=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert not ids(net.frozen.parameters()) & ids(p for g in opt.param_groups for p in g["params"])


def test_named_parameters_use_names():
    net = Net()
    decay, no_decay = split_decay(net.named_parameters())
    # Names reach embeddings and codebooks; only bare nn.Embedding weights (name "tok.weight")
    # cannot be told from a matrix by name.
    assert ids(decay) == ids([net.proj.weight, net.conv.weight, net.tok.weight])
    assert id(net.quantize.embedding.weight) in ids(no_decay) and id(net.pos_embed) in ids(no_decay)


def test_bare_parameters_use_shapes():
    net = Net()
    decay, no_decay = split_decay(net.parameters())
    assert ids(no_decay) == ids(p for p in net.parameters() if p.ndim <= 1 and p.requires_grad)
    assert id(net.pos_embed) in ids(decay)   # a bare 3-D tensor: nothing says it is an embedding


def test_shared_parameters_once_and_errors():
    lin = nn.Linear(2, 2)
    decay, no_decay = split_decay([lin.weight, lin.weight, lin.bias])
    assert len(decay) == 1 and len(no_decay) == 1
    with pytest.raises(ValueError, match="no trainable"):
        get_optimizer([], lr=1e-3)
    with pytest.raises(TypeError, match="params must be"):
        get_optimizer([3], lr=1e-3)


def test_decay_applies_to_weights_only_and_never_to_params_without_grad():
    torch.manual_seed(0)
    net = Net()
    opt = get_optimizer(net, lr=0.1, wd=0.5)
    idle = net.conv.weight.detach().clone()         # gets no gradient: must not decay either
    before_w, before_b = net.proj.weight.detach().clone(), net.proj.bias.detach().clone()
    net.proj.weight.grad = torch.zeros_like(net.proj.weight)
    net.proj.bias.grad = torch.zeros_like(net.proj.bias)
    opt.step()
    assert torch.allclose(net.proj.weight, before_w * (1 - 0.1 * 0.5))
    assert torch.equal(net.proj.bias, before_b)
    assert torch.equal(net.conv.weight, idle)


def test_dinovq_groups():
    from losses.dinovq_model import DinoVQModel

    model = DinoVQModel(img_size=32, patch_size=8, encoder_embed_dim=16, encoder_depth=1, encoder_num_heads=2,
                        decoder_depth=1, dino_head_depth=1, codebook_size=8, codebook_dim=4, dino_dim=8)
    decay, no_decay = split_decay(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay} >= {"encoder.pos_embed", "decoder.pos_embed", "encoder.norm.weight",
                                                "pixel_head.bias"}
    assert all(names[id(p)].endswith("weight") and p.ndim >= 2 for p in decay)
    assert "pixel_head.weight" in {names[id(p)] for p in decay}
