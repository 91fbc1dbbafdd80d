"""Muon, single process: the same math as torch.optim.Muon (+ AdamW for the rest), the Gram iteration equal to the
standard one, DeepSpeed's parameter split and config keys, and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from shardwise.engine.optimizers import build_optimizer, is_zero_supported_optimizer
from shardwise.ops.muon import MuonWithAuxAdam, default_use_muon, lr_ratio, orthogonalize, split_params


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust", [None, "match_rms_adamw"])
def test_bf16_standard_muon_equals_torch_optim_muon_and_adamw(nesterov: bool, adjust: str | None) -> None:
    ours_model, ref_model = _mlp(), _mlp()
    mats = [p for p in ours_model.parameters() if p.dim() == 2]
    rest = [p for p in ours_model.parameters() if p.dim() < 2]
    ours = MuonWithAuxAdam([
        {"params": mats, "use_muon": True, "lr": 0.02, "momentum": 0.9, "weight_decay": 0.1, "nesterov": nesterov,
         "ns_method": "standard", "ns_dtype": "bf16", "adjust_lr_fn": adjust},
        {"params": rest, "use_muon": False, "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}])
    torch_muon = torch.optim.Muon([p for p in ref_model.parameters() if p.dim() == 2], lr=0.02, momentum=0.9,
                                  weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust)
    torch_adam = torch.optim.AdamW([p for p in ref_model.parameters() if p.dim() < 2], lr=1e-3, weight_decay=0.01,
                                   foreach=False)
    for step in range(4):
        x = torch.randn(6, 8, generator=torch.Generator().manual_seed(step))
        for model in (ours_model, ref_model):
            model.zero_grad()
            model(x).pow(2).mean().backward()
        ours.step()
        torch_muon.step()
        torch_adam.step()
    for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
        assert torch.equal(a, b), name  # bitwise: the same operations in the same order


@pytest.mark.parametrize("shape", [(16, 40), (40, 16), (24, 24)])
def test_gram_iteration_equals_the_standard_one(shape: tuple[int, int]) -> None:
    g = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gram = orthogonalize(g, method="gram", steps=5)
    standard = orthogonalize(g, method="standard", steps=5)
    torch.testing.assert_close(gram, standard, rtol=1e-10, atol=1e-12)
    # and it is an approximate orthogonalisation: singular values pushed towards 1 (Muon's ~[0.5, 1.5] band)
    s = torch.linalg.svdvals(standard)
    assert s.min() > 0.3 and s.max() < 1.6


def test_lr_ratio_and_conv_weights_are_viewed_as_matrices() -> None:
    assert lr_ratio(40, 10, None) == 2.0 and lr_ratio(10, 40, "original") == 1.0
    assert lr_ratio(16, 64, "match_rms_adamw") == pytest.approx(0.2 * 8)
    conv = nn.Conv2d(2, 6, 3)
    opt = MuonWithAuxAdam([{"params": [conv.weight], "use_muon": True, "ns_dtype": "fp32"}])
    conv.weight.grad = torch.randn_like(conv.weight)
    before = conv.weight.detach().clone()
    opt.step()
    delta = (before - conv.weight.detach()).reshape(6, 18) / 0.02  # lr 0.02, no weight decay; ratio 1 (6 < 18)
    s = torch.linalg.svdvals(delta)
    assert s.min() > 0.3 and s.max() < 1.6


def test_deepspeed_split_and_config_keys() -> None:
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(10, 4)
            self.proj = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.lm_head = nn.Linear(4, 10, bias=False)

    model = LM()
    model.proj.bias.use_muon = False
    groups = split_params(model.named_parameters(), {"lr": 0.1, "muon_lr": 0.05, "adam_lr": 1e-3, "momentum": 0.9,
                                                     "betas": [0.8, 0.9], "weight_decay": 0.01})
    muon, adam = groups
    assert muon["use_muon"] and [p.shape for p in muon["params"]] == [torch.Size([4, 4])]
    assert muon["lr"] == 0.05 and muon["momentum"] == 0.9 and muon["weight_decay"] == 0.01
    assert not adam["use_muon"] and adam["lr"] == 1e-3 and adam["betas"] == (0.8, 0.9) and len(adam["params"]) == 5
    assert model.proj.weight.use_muon and not model.embed_tokens.weight.use_muon and not model.lm_head.weight.use_muon
    assert default_use_muon("blocks.0.mlp.weight", model.proj.weight)
    opt = build_optimizer("muon", {"lr": 0.02}, model.parameters(), named_parameters=model.named_parameters())
    assert isinstance(opt, MuonWithAuxAdam) and is_zero_supported_optimizer(opt)
    assert opt.param_groups[0]["lr"] == 0.02 and opt.param_groups[1]["lr"] == 0.02  # lr applies to both sides


def test_errors_name_the_key_and_the_fix() -> None:
    model = _mlp()
    with pytest.raises(ValueError, match="unknown parameter 'momentun'.*Did you mean 'momentum'"):
        build_optimizer("Muon", {"momentun": 0.9}, model.parameters(), named_parameters=model.named_parameters())
    with pytest.raises(ValueError, match="needs the model's parameter names"):
        build_optimizer("Muon", {}, model.parameters())
    with pytest.raises(ValueError, match="offload_optimizer is not supported"):
        build_optimizer("Muon", {}, model.parameters(), offload=True, named_parameters=model.named_parameters())
    with pytest.raises(ValueError, match=r"shape \(16,\) has use_muon True"):
        MuonWithAuxAdam([{"params": [model[0].bias], "use_muon": True}])
    with pytest.raises(ValueError, match="ns_method 'fast'"):
        MuonWithAuxAdam([{"params": [model[0].weight], "use_muon": True, "ns_method": "fast"}])
    with pytest.raises(ValueError, match="'use_muon' flag"):
        MuonWithAuxAdam([{"params": [model[0].weight]}])


def test_state_dict_round_trip_continues_identically() -> None:
    a, b = _mlp(), _mlp()
    cfg = {"lr": 0.02, "adam_lr": 1e-2}
    opt_a = build_optimizer("Muon", cfg, a.parameters(), named_parameters=a.named_parameters())
    for step in range(2):
        a.zero_grad()
        a(torch.randn(4, 8, generator=torch.Generator().manual_seed(step))).sum().backward()
        opt_a.step()
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer("Muon", cfg, b.parameters(), named_parameters=b.named_parameters())
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    x = torch.randn(4, 8)
    for model, opt in ((a, opt_a), (b, opt_b)):
        model.zero_grad()
        model(x).sum().backward()
        opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
