"""BatchNorm folding and the deployed form reproduce the eval-mode original."""

import pytest
import torch
from torch import Tensor, nn

from common.backbones import build_backbone
from common.deploy import DeployedModel, DeployError, FoldedBatchNorm2d, deepcopy_module, deploy, fold_batchnorm
from common.precision import cpu_has_native_bf16


def _with_trained_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, as after training (init values fold trivially)."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
            module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
    return model.eval()


def _images(n: int = 4) -> Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name, pairs", [("resnet20", 19), ("resnet18", 20)])
def test_fold_matches_the_eval_mode_original_on_residual_nets(name, pairs):
    # resnet20: identity / zero-pad shortcuts; resnet18: residual blocks with conv + BN projection shortcuts.
    model = _with_trained_bn_stats(build_backbone(name, 10))
    x = _images()
    with torch.no_grad():
        expected = model(x)
    folded = fold_batchnorm(model, example=x)
    assert folded.deploy_info.folded == pairs and folded.deploy_info.pairing == "fx"
    assert not [m for m in folded.modules() if type(m) is nn.BatchNorm2d]
    with torch.no_grad():
        got = folded(x)
    assert (got - expected).abs().max() < 1e-4
    # The original is untouched: same BN class and still in its BN form.
    assert all(type(m) is nn.BatchNorm2d for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        assert torch.equal(model(x), expected)


class _Branchy(nn.Module):
    """Python control flow on tensor values (fx cannot trace it) and a hook closure on a BN."""

    def __init__(self, reuse_conv_output: bool = False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)
        self.reuse = reuse_conv_output
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.seen = []
        scale = self.scale

        def hook(module, inputs, output):  # a closure over a parameter of this model
            return output * scale

        self.bn2.register_forward_hook(hook)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        raw = self.conv2(out)
        out = self.bn2(raw)
        if self.reuse:
            out = out + raw
        if float(out.mean()) > -1e9:  # data-dependent branch: not fx-traceable
            out = torch.relu(out)
        return self.head(out.mean(dim=(2, 3)))


def test_untraceable_models_fold_through_the_probe_and_keep_their_hooks():
    model = _with_trained_bn_stats(_Branchy())
    x = _images()
    with torch.no_grad():
        expected = model(x)
    folded = fold_batchnorm(model, example=x)
    assert folded.deploy_info.pairing == "probe" and folded.deploy_info.folded == 2
    assert isinstance(folded.bn2, FoldedBatchNorm2d) and folded.bn2._forward_hooks
    with torch.no_grad():
        assert (folded(x) - expected).abs().max() < 1e-4
        # The copied hook reads the copy's parameter, not the original's.
        folded.scale.fill_(0.0)
        assert torch.equal(model(x), expected)
        assert not torch.allclose(folded(x), expected)


def test_a_fold_that_changes_the_function_raises_instead_of_failing_silently():
    # The conv output also feeds the residual sum: folding it into the BN would change the model.
    model = _with_trained_bn_stats(_Branchy(reuse_conv_output=True))
    with pytest.raises(DeployError, match="changed the logits"):
        fold_batchnorm(model, example=_images())


def test_deepcopy_module_rebinds_closures_over_modules():
    model = _Branchy()
    clone = deepcopy_module(model)
    hook = next(iter(clone.bn2._forward_hooks.values()))
    assert hook.__closure__[0].cell_contents is clone.scale


@pytest.mark.parametrize("compiler", [None, "jit"])
def test_deployed_fp32_form_equals_the_original(compiler):
    model = _with_trained_bn_stats(build_backbone("resnet20", 10))
    x = _images(6)
    with torch.no_grad():
        expected = model(x)
    deployed = deploy(model, example=x[:2], compile=compiler)
    assert isinstance(deployed, DeployedModel) and deployed.deploy_info.compiler == compiler
    assert deployed.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    got = deployed(x)
    assert got.dtype == torch.float32 and (got - expected).abs().max() < 1e-4
    with pytest.raises(RuntimeError, match="inference only"):
        deployed.train()


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_deployed_bf16_form_keeps_predictions_and_returns_fp32():
    model = _with_trained_bn_stats(build_backbone("resnet20", 10))
    x = _images(16)
    deployed = deploy(model, example=x, bf16=True)
    assert deployed.net.conv1.weight.dtype == torch.bfloat16
    got = deployed(x)
    with torch.no_grad():
        expected = model(x)
    assert got.dtype == torch.float32
    scale = expected.abs().max()
    assert (got - expected).abs().max() < 0.1 * scale
    assert deployed.deploy_info.dtype == "bf16"


def test_deploy_rejects_unknown_compilers():
    with pytest.raises(ValueError, match="compile must be None or one of"):
        deploy(build_backbone("resnet20", 10), compile="tvm")


def test_jit_is_skipped_with_a_note_for_hooked_models():
    model = _with_trained_bn_stats(_Branchy())
    deployed = deploy(model, example=_images(), compile="jit")
    assert deployed.deploy_info.compiler is None
    assert any("jit skipped" in note for note in deployed.deploy_info.notes)


class _PlainTensorHead(nn.Module):
    """Keeps an fp32 tensor that is neither a parameter nor a buffer: ``.to(bfloat16)`` leaves it fp32."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.projection = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)) @ self.projection


def test_bf16_falls_back_to_autocast_with_a_note_when_bf16_weights_break_the_model():
    model = _with_trained_bn_stats(_PlainTensorHead())
    x = _images()
    deployed = deploy(model, example=x, bf16=True, compile="jit")
    info = deployed.deploy_info
    assert info.dtype == "bf16 autocast" and any("bf16 weights failed" in note for note in info.notes)
    assert info.compiler is None  # jit does not trace autocast
    with torch.no_grad():
        assert (deployed(x) - model(x)).abs().max() < 0.05
