"""Each transform on small models: structure (what really changed) and accuracy (what it costs)."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch import nn

import zoo
from kiln.errors import KilnError, Skip
from kiln.transforms import Adapted, Recipe, apply, layer_kinds
from kiln.transforms.bnfold import fold_batchnorm
from kiln.transforms.prune import magnitude, structured


class ConvNet(nn.Module):
    """Conv -> BN -> ReLU -> Conv -> BN -> ReLU -> pool -> Linear -> ReLU -> Linear: every pass has work here."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.f1, self.f2 = nn.Linear(8, 32), nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.f2(torch.relu(self.f1(x.mean((2, 3)))))


class Untraceable(nn.Module):
    """An `if` on tensor values defeats FX tracing: folding falls back to nn.Sequential pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return y * 2 if y.sum() > 0 else y


def _bn_count(m: nn.Module) -> int:
    return sum(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())


@pytest.mark.parametrize("cls", [ConvNet, Untraceable, zoo.ConvBN])
def test_bn_folding_removes_every_batchnorm_and_keeps_outputs(cls: type[nn.Module]) -> None:
    m = zoo.seeded(cls)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = m(x)
        assert _bn_count(m) > 0
        folded = apply(m, Recipe("fp32", ("bnfold",)))
        assert _bn_count(folded) == 0 and _bn_count(m) > 0  # the original is untouched
        torch.testing.assert_close(folded(x), ref, rtol=1e-4, atol=1e-5)


def test_bn_folding_leaves_a_shared_conv_alone() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y  # the conv's output is used twice: folding BN into it would change `+ y`

    m = zoo.seeded(Shared)
    assert fold_batchnorm(m) == 0 and _bn_count(m) == 1


def test_magnitude_pruning_zeroes_exactly_the_smallest_weights() -> None:
    m = zoo.seeded(ConvNet)
    before = {n: p.detach().clone() for n, p in m.named_parameters() if n.endswith("weight") and p.dim() > 1}
    report = magnitude(m, 0.3)
    for name, w0 in before.items():
        w = dict(m.named_parameters())[name]
        zeros = int((w == 0).sum())
        assert zeros == round(w.numel() * 0.3), name  # exactly 30% per layer
        kept = w0.abs()[w != 0]
        assert kept.min() >= w0.abs()[w == 0].max()  # and they were the smallest
    assert "prune30" in report and "(30%)" in report


def test_structured_pruning_shrinks_layers_and_keeps_the_signature() -> None:
    m = zoo.seeded(ConvNet)
    x = torch.randn(2, 3, 16, 16)
    params = sum(p.numel() for p in m.parameters())
    pruned = apply(m, Recipe("fp32", ("chprune50",)))
    assert pruned.c1.out_channels == 8 and pruned.b1.num_features == 8 and pruned.c2.in_channels == 8
    assert pruned.f1.out_features == 16 and pruned.f2.in_features == 16
    assert pruned.c2.out_channels == 8  # feeds a mean and a Linear: no safe pair, so kept whole
    assert sum(p.numel() for p in pruned.parameters()) < params
    assert pruned(x).shape == m(x).shape


def test_structured_pruning_says_when_the_model_does_not_allow_it() -> None:
    with pytest.raises(Skip, match="no Conv->Conv or Linear->Linear pair"):
        structured(zoo.seeded(zoo.ConvBN), 0.3)


@pytest.mark.parametrize("precision,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_keeps_fp32_io_and_casts_inside(precision: str, dtype: torch.dtype) -> None:
    m = zoo.seeded(ConvNet)
    x = torch.randn(3, 3, 16, 16)
    half = apply(m, Recipe(precision, ("channels_last",)))
    assert isinstance(half, Adapted) and half.inner.c1.weight.dtype == dtype
    assert half.inner.c1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out, ref = half(x), m(x)
    assert out.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999


def test_dynamic_int8_weights_are_really_int8() -> None:
    m = zoo.seeded(zoo.MLP)  # Linear 16 -> 32, ReLU, Linear 32 -> 5
    notes: list[str] = []
    q = apply(m, Recipe("int8-dynamic"), notes)
    assert q.net[0].weight.qdata.dtype == torch.int8  # torchao's Int8Tensor: int8 data and a scale per channel
    assert q.net[2].weight.dtype == torch.float32  # 5 outputs: cuBLAS's int8 GEMM takes multiples of 8 only
    assert notes == ["int8-dynamic: 1 Linear layer(s) in int8, 1 kept in float (in or out features not a multiple "
                     "of 8, which cuBLAS's int8 GEMM needs)"]
    x = torch.randn(64, 16)
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(q(x).flatten(), m(x).flatten(), dim=0) > 0.99
    with pytest.raises(Skip, match="Linear"):
        apply(nn.Sequential(nn.Conv2d(3, 3, 1)), Recipe("int8-dynamic"))
    with pytest.raises(Skip, match="multiples of 8.*none of this model's 1"):
        apply(nn.Sequential(nn.Linear(12, 5)), Recipe("int8-dynamic"))


def test_dynamic_int8_pads_a_few_rows_up_to_what_cublas_int8_takes() -> None:
    from kiln.transforms.torch_int8 import INT8_GEMM_MIN_ROWS, RowPaddedLinear, pad_rows

    m = zoo.seeded(zoo.MLP)
    q = apply(m, Recipe("int8-dynamic"))
    assert isinstance(q.net[0], RowPaddedLinear) and q.state_dict().keys() == m.state_dict().keys()
    seen: list[int] = []

    def forward(x: torch.Tensor) -> torch.Tensor:  # records what the int8 GEMM would get
        seen.append(x.shape[0])
        return nn.Linear.forward(q.net[0], x)

    with torch.no_grad():
        for shape in [(3, 16), (2, 5, 16), (INT8_GEMM_MIN_ROWS + 3, 16)]:
            x = torch.randn(*shape)
            seen.clear()
            out = pad_rows(forward, x)
            assert seen == [max(INT8_GEMM_MIN_ROWS, x.numel() // 16)]
            assert out.shape == (*shape[:-1], q.net[0].out_features)
            torch.testing.assert_close(out, q.net[0](x))  # the padding rows change no real row's result
        compiled = torch.compile(functools.partial(pad_rows, q.net[0].forward, min_rows=INT8_GEMM_MIN_ROWS),
                                 backend="eager", dynamic=True, fullgraph=True)
        for rows in (3, 40):
            x = torch.randn(rows, 16)
            torch.testing.assert_close(compiled(x), q.net[0](x))


def test_static_int8_program_has_int8_weights_and_calibrated_scales() -> None:
    from kiln.backends.common import torch_dynamic_shapes
    from kiln.signature import FlatModel
    from kiln.spec import TensorSpec
    from kiln.transforms.torch_int8 import static

    m = zoo.seeded(ConvNet)
    spec = [TensorSpec.parse("image:float32[batch,3,16,16]")]
    calib = [[torch.randn(8, 3, 16, 16)] for _ in range(4)]
    if not torch.__version__.startswith("2.13"):  # seen with torch 2.11 + torchao 0.18: no Q/DQ inserted, said so
        with pytest.raises(KilnError, match="inserted no quantize"):
            static(FlatModel(m).eval(), (torch.randn(2, 3, 16, 16),), torch_dynamic_shapes(spec), calib)
        return
    ep = static(FlatModel(m).eval(), (torch.randn(2, 3, 16, 16),), torch_dynamic_shapes(spec), calib)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("dequantize" in t for t in targets) and any("quantize" in t.replace("dequantize", "") for t in targets), targets
    consts = list(ep.state_dict.values()) + list(ep.constants.values())
    assert any(isinstance(c, torch.Tensor) and c.dtype == torch.int8 for c in consts)
    with pytest.raises(KilnError, match="calibration"):
        static(FlatModel(m).eval(), (torch.randn(2, 3, 16, 16),), torch_dynamic_shapes(spec), None)


def test_recipe_names_round_trip_and_bad_passes_are_refused() -> None:
    r = Recipe.parse("fp16+bnfold+channels_last+cudagraphs")
    assert r.precision == "fp16" and r.passes == ("bnfold", "channels_last", "cudagraphs") and r.dtype == torch.float16
    assert r.tag == "fp16+bnfold+channels_last+cudagraphs"
    assert Recipe.parse("fp32+chprune30").prune() == ("structured", 0.3)
    assert Recipe.parse("fp32+prune5").prune() == ("magnitude", 0.05)
    with pytest.raises(KilnError, match="unknown transform"):
        Recipe.parse("fp32+sparkle")
    with pytest.raises(KilnError, match="unknown precision"):
        Recipe.parse("fp8")
    assert layer_kinds(zoo.seeded(ConvNet)) == {"batchnorm": 2, "conv": 2, "linear": 2, "gelu_ffn": 0,
                                                  "self_attention": 0}


def test_epilogue_fuses_the_feed_forward_gelu_of_an_encoder() -> None:
    """A Hugging Face BERT's intermediate layers become one linear_gelu op each, planned only for CUDA halves; the
    fused model computes what the original does (on CPU the op is exact GELU; cuBLASLt's tanh GELU is judged by
    the build's verification on the GPU)."""
    transformers = pytest.importorskip("transformers", reason="the encoder extra (transformers) is not installed")
    from kiln.backends import compile as compile_backend
    from kiln.backends.common import Target
    from kiln.transforms.epilogue import LinearGELU

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=100)
    bert = transformers.BertModel(config, add_pooling_layer=False).eval()
    assert layer_kinds(bert)["gelu_ffn"] == 2
    notes: list[str] = []
    fused = apply(bert, Recipe("fp32", ("epilogue",)), notes)
    assert sum(isinstance(m, LinearGELU) for m in fused.modules()) == 2 and notes == ["epilogue: 2 Linear + GELU layer(s) as one GEMM each"]
    assert not any(isinstance(m, LinearGELU) for m in bert.modules())  # the original is untouched
    ids = torch.randint(0, 100, (2, 7))
    with torch.inference_mode():
        torch.testing.assert_close(fused(input_ids=ids).last_hidden_state, bert(input_ids=ids).last_hidden_state)
    gpu = [r.tag for r in compile_backend.variants(Target(device="cuda:0", halves=("fp16", "bf16"), linear=14, gelu_ffn=2))]
    assert "bf16+epilogue+cudagraphs" in gpu and "fp16+epilogue+cudagraphs" in gpu
    assert not any(r.has("epilogue") for r in compile_backend.variants(Target(device="cpu", halves=("bf16",), gelu_ffn=2)))
    with pytest.raises(KilnError, match="no feed-forward Linear"):
        apply(zoo.seeded(ConvNet), Recipe("fp32", ("epilogue",)))


def test_qkv_makes_one_projection_of_three_and_keeps_padding_masked() -> None:
    """A Hugging Face BERT's self-attention layers become one Q/K/V GEMM each; with a padded batch (the mask as the
    encoder passes it) the fused model computes what the original does (compiled on a GPU, the build verifies it
    like every variant: bench/gpu.py). Planned on CUDA with the epilogue pass, only where the model has such layers."""
    transformers = pytest.importorskip("transformers", reason="the encoder extra (transformers) is not installed")
    from kiln.backends import compile as compile_backend
    from kiln.backends.common import Target
    from kiln.transforms.qkv import FusedQKVAttention

    torch.manual_seed(0)
    for impl in ("sdpa", "eager"):  # the two masks the encoder hands its layers: boolean or additive
        config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, vocab_size=100, attn_implementation=impl)
        bert = transformers.BertModel(config, add_pooling_layer=False).eval()
        assert layer_kinds(bert)["self_attention"] == 2
        notes: list[str] = []
        fused = apply(bert, Recipe("fp32", ("qkv",)), notes)
        assert sum(isinstance(m, FusedQKVAttention) for m in fused.modules()) == 2
        assert notes == ["qkv: 2 self-attention layer(s) with Q, K and V as one GEMM each",
                         "qkv: the padding mask handed to the fused layers as [batch, 1, 1, seq]"]
        assert not any(isinstance(m, FusedQKVAttention) for m in bert.modules())
        ids = torch.randint(0, 100, (3, 9))
        mask = torch.ones(3, 9, dtype=torch.int64)
        mask[1, 4:] = 0
        mask[2, 7:] = 0
        seen: list[tuple[int, ...]] = []
        layer = next(m for m in fused.modules() if isinstance(m, FusedQKVAttention))
        layer.register_forward_pre_hook(functools.partial(_record_mask, seen), with_kwargs=True)
        expanded = mask[:, None, None, :].expand(3, 1, 9, 9).bool()
        with torch.inference_mode():
            want = bert(input_ids=ids, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(fused(input_ids=ids, attention_mask=mask).last_hidden_state, want)
            assert seen == [(3, 1, 1, 9)]  # cut to one row of keys
            compiled = torch.compile(fused, backend="eager", fullgraph=True)  # as the compile backend traces it
            torch.testing.assert_close(compiled(input_ids=ids, attention_mask=mask).last_hidden_state, want)
            # a mask the caller expanded already reaches the layers as the encoder makes it from that
            torch.testing.assert_close(fused(input_ids=ids, attention_mask=expanded).last_hidden_state, want)
            assert seen[-1] == (3, 1, 9, 9)
    gpu = [r.tag for r in compile_backend.variants(Target(device="cuda:0", halves=("bf16",), gelu_ffn=2,
                                                          self_attention=2))]
    assert "bf16+epilogue+qkv+cudagraphs" in gpu
    no_attention = Target(device="cuda:0", halves=("bf16",), gelu_ffn=2)
    assert [r.tag for r in compile_backend.variants(no_attention) if r.has("epilogue")] == ["bf16+epilogue+cudagraphs"]
    with pytest.raises(KilnError, match="no self-attention layer"):
        apply(zoo.seeded(ConvNet), Recipe("fp32", ("qkv",)))


def _record_mask(seen: list[tuple[int, ...]], _: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
    seen.append(tuple(kwargs["attention_mask"].shape))


class Bottleneck(nn.Module):
    """torchvision's ResNet block, as written there: conv-BN-ReLU twice, conv-BN, `out += identity`, in-place ReLU."""

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, 4 * width, 1, stride, bias=False), nn.BatchNorm2d(4 * width))
                           if stride != 1 or cin != 4 * width else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(Bottleneck(8, 4), Bottleneck(16, 4), Bottleneck(16, 8, stride=2))
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer1(self.relu(self.bn1(self.conv1(x)))).mean((2, 3)))


class GatedResNet(TinyResNet):
    """The same layers behind a data-dependent `if`: the whole does not trace, its blocks do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if x.sum() > -1e9 else x.mean()


@pytest.mark.parametrize(("cls", "fusions"), [(TinyResNet, 1 + 3 * 3), (GatedResNet, 3 * 3), (ConvNet, 2),
                                              (zoo.ConvBN, 1)])
def test_convfuse_makes_conv_bias_residual_relu_one_op_and_keeps_outputs(cls: type[nn.Module], fusions: int) -> None:
    """After bnfold, every conv -> ReLU and conv -> add -> ReLU is one kiln::conv_relu call (the stem, two per block,
    the block's last conv with its residual); off CUDA the op computes the same in plain ATen, so the rewritten model
    matches the original. Where the whole model does not trace (GatedResNet), its children are rewritten."""
    from kiln.transforms import convfuse

    model = zoo.seeded(cls)
    for m in model.modules():  # BatchNorm statistics that are not the identity, so that folding is exercised
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    notes: list[str] = []
    fused = apply(model, Recipe("fp32", ("bnfold", "convfuse")), notes)
    assert convfuse.count(apply(model, Recipe("fp32", ("bnfold",)))) == fusions
    calls = [n for m in fused.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes
             if n.target is torch.ops.kiln.conv_relu.default]
    assert len(calls) == fusions and notes[-1] == f"convfuse: {fusions} convolution(s) + bias [+ residual] + ReLU as one cuDNN call each"
    with_residual = sum(n.args[3] is not None for n in calls)
    assert with_residual == (3 if cls in (TinyResNet, GatedResNet) else 0)
    assert not any(isinstance(m, torch.fx.GraphModule) for m in model.modules())  # the original is untouched
    x = torch.randn(2, 3, 12, 12)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def test_convfuse_leaves_a_conv_whose_output_is_used_twice_and_refuses_a_model_without_one() -> None:
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return torch.relu(y) + y  # fusing the ReLU would lose y

    from kiln.transforms import convfuse

    assert convfuse.count(Branch()) == 0
    with pytest.raises(KilnError, match="no convolution followed by ReLU") as e:
        apply(Branch(), Recipe("fp32", ("convfuse",)))
    assert "drop +convfuse" in str(e.value.hint)
    with pytest.raises(KilnError, match="no convolution followed by ReLU"):
        apply(zoo.seeded(zoo.MLP), Recipe("fp32", ("convfuse",)))


def test_convfuse_fake_op_has_the_real_ops_shape_and_layout() -> None:
    """torch.compile sees the op through its fake: shape and strides must be what the op returns, NCHW and NHWC,
    with stride, padding and dilation (else Inductor would read the output with wrong strides). The layout is the
    rewrite's `channels_last` flag: a fake that judged it from a traced input's symbolic strides could disagree."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kiln.transforms.convfuse import conv_relu

    for channels_last in (False, True):
        x, w, b = torch.randn(2, 6, 15, 13), torch.randn(8, 3, 3, 5), torch.randn(8)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        for x_fmt in (torch.contiguous_format, torch.channels_last):  # the flag decides, not the input's layout
            x, w = x.contiguous(memory_format=x_fmt), w.contiguous(memory_format=x_fmt)
            args = ([2, 1], [1, 2], [2, 1], 2)
            real = conv_relu(x, w, b, None, *args, channels_last)
            z = torch.randn(real.shape).contiguous(memory_format=fmt)
            torch.testing.assert_close(conv_relu(x, w, b, z, *args, channels_last), torch.relu(
                nn.functional.conv2d(x, w, b, *args) + z))
            with FakeTensorMode() as mode:
                fake = conv_relu(mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(b), None, *args, channels_last)
            assert fake.shape == real.shape and fake.stride() == real.stride()
            assert real.is_contiguous(memory_format=fmt)


def test_convfuse_is_planned_on_cuda_for_cnns_with_conv_relu() -> None:
    from kiln.backends import compile as compile_backend
    from kiln.backends import eager as eager_backend
    from kiln.backends.common import Target
    from kiln.plan import make_target

    t = make_target(zoo.seeded(TinyResNet), device="cuda:0", low_precision=("fp16",))
    assert t.conv_relu == 1 + 3 * 3 and t.fused == ("convfuse",)
    assert "fp16+bnfold+channels_last+convfuse+cudagraphs" in [r.tag for r in compile_backend.variants(t)]
    assert "fp16+bnfold+channels_last+convfuse+cudagraphs" in [r.tag for r in eager_backend.variants(t)]
    assert make_target(zoo.seeded(TinyResNet), device="cpu").conv_relu == 0  # not traced for a CPU build
    assert Target(device="cuda:0", conv=3, halves=("fp16",)).fused == ()
    with pytest.raises(Skip, match="CUDA only"):
        from kiln.backends.eager import check_recipe

        check_recipe(Recipe("fp16", ("convfuse",)), "cpu")
