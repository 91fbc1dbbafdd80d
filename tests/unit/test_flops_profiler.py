"""The flops profiler against hand-computed FLOPs: a Linear/attention model's totals and per-module numbers
(a linear layer on N tokens is 2*N*in*out FLOPs; attention's two products are 4*B*S*S*D), MACs = FLOPs / 2,
parameter counts, the report's sections and DeepSpeed's ``get_model_profile`` entry point."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardwise.profiling.flops_profiler import FlopsProfiler, get_model_profile, number_to_string

B, S, D, H, IN, OUT = 2, 8, 16, 4, 12, 5


class Attention(nn.Module):
    def __init__(self, sdpa: bool) -> None:
        super().__init__()
        self.qkv, self.proj, self.sdpa = nn.Linear(D, 3 * D), nn.Linear(D, D), sdpa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.view(B, S, H, D // H).transpose(1, 2) for t in self.qkv(x).split(D, dim=-1))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = torch.softmax(q @ k.transpose(-1, -2) / (D // H) ** 0.5, dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class Net(nn.Module):
    def __init__(self, sdpa: bool = True) -> None:
        super().__init__()
        self.embed, self.attn, self.act, self.head = nn.Linear(IN, D), Attention(sdpa), nn.GELU(), nn.Linear(D, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.attn(self.embed(x))))


def linear_flops(fan_in: int, fan_out: int) -> int:
    return 2 * B * S * fan_in * fan_out


def linear_params(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


ATTN_PRODUCTS = 4 * B * S * S * D  # QK^T and AV, over all heads
EXPECTED = {
    "embed": linear_flops(IN, D), "attn.qkv": linear_flops(D, 3 * D), "attn.proj": linear_flops(D, D),
    "attn": linear_flops(D, 3 * D) + ATTN_PRODUCTS + linear_flops(D, D), "act": 0, "head": linear_flops(D, OUT),
}
EXPECTED[""] = EXPECTED["embed"] + EXPECTED["attn"] + EXPECTED["head"]


def _profile(sdpa: bool) -> FlopsProfiler:
    torch.manual_seed(0)
    model = Net(sdpa)
    prof = FlopsProfiler(model)
    with torch.no_grad(), prof.profile():
        model(torch.randn(B, S, IN))
    return prof


def test_per_module_flops_params_and_macs_match_hand_counts() -> None:
    for sdpa in (True, False):  # the SDPA kernel and explicit matmuls count the same
        prof = _profile(sdpa)
        stats = prof.module_profile()
        for name, flops in EXPECTED.items():
            assert stats[name].flops == flops, (sdpa, name, stats[name].flops, flops)
            assert stats[name].macs == flops // 2
            assert stats[name].calls == 1
        assert stats["attn"].params == linear_params(D, 3 * D) + linear_params(D, D)
        total_params = linear_params(IN, D) + stats["attn"].params + linear_params(D, OUT)
        assert prof.get_total_params() == total_params == sum(p.numel() for p in Net().parameters())
        assert prof.get_total_flops() == EXPECTED[""] and prof.get_total_macs() == EXPECTED[""] // 2
        assert stats["attn"].duration >= stats["attn.qkv"].duration + stats["attn.proj"].duration
        assert (stats["attn"].depth, stats["attn.qkv"].depth) == (1, 2)


def test_counts_accumulate_over_calls_and_reset_on_start() -> None:
    torch.manual_seed(0)
    model, x = Net(), torch.randn(B, S, IN)
    prof = FlopsProfiler(model)
    prof.start_profile()
    with torch.no_grad():
        model(x)
        model(x)
    assert prof.get_total_flops() == 2 * EXPECTED[""] and prof.module_profile()["head"].calls == 2
    prof.stop_profile()
    with torch.no_grad():
        model(x)  # not counted: hooks removed and the counter closed
    assert prof.get_total_flops() == 2 * EXPECTED[""]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    prof.start_profile(ignore_list=[nn.GELU])
    assert prof.get_total_flops() == 0 and "act" in prof.module_profile()
    prof.end_profile()
    assert prof.module_profile() == {} and not prof.started


def test_report_sections_and_numbers(tmp_path) -> None:
    prof = _profile(True)
    prof.record_step(forward=0.002, backward=0.004, step=0.002, micro_batches=2)
    prof.peak_flops = 1e9
    out = tmp_path / "report" / "profile.txt"
    prof.print_model_profile(profile_step=3, module_depth=1, top_modules=2, output_file=str(out))
    text = out.read_text()
    assert "Profile summary at step 3:" in text
    fwd = next(line for line in text.splitlines() if line.startswith("fwd flops per device:"))
    assert fwd.split(":", 1)[1].strip() == number_to_string(EXPECTED[""]).strip()
    achieved = 3 * EXPECTED[""] * 2 / 0.008
    assert prof.achieved_flops() == achieved
    assert f"{100 * achieved / 1e9:.2f}%" in text  # MFU against the given peak
    assert "depth 1:" in text and "'Linear'" in text and "depth 2:" not in text  # module_depth=1
    tree = [line for line in text.splitlines() if "(Linear)" in line or "(Attention)" in line]
    assert [line.split()[0] for line in tree] == ["embed", "attn", "head"]  # children deeper than 1 left out


def test_get_model_profile_as_deepspeed_returns_it(capsys) -> None:
    torch.manual_seed(0)
    flops, macs, params = get_model_profile(Net(), input_shape=(B, S, IN), as_string=False, print_profile=False)
    assert (flops, macs) == (EXPECTED[""], EXPECTED[""] // 2)
    assert params == sum(p.numel() for p in Net().parameters())
    text = get_model_profile(Net(), args=[torch.randn(B, S, IN)], print_profile=True, detailed=False)
    assert text == (number_to_string(EXPECTED[""]), f"{number_to_string(EXPECTED[''] / 2)}MACs",
                    number_to_string(params).strip())
    out = capsys.readouterr().out
    assert "Aggregated Profile" in out and "Detailed Profile" not in out
