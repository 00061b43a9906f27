"""Small models with hand-labelled scale-invariant weights, for the tests of psi_geoopt.convert.

Every builder returns ``(model, example_inputs, truth)`` where ``truth`` maps each weight that is
positively scale invariant in training mode to its finest group axis (PSI_GEOMETRY.md §6); every
other parameter is not. Sizes are tiny so a probe of each takes well under a second on a CPU.
The tests reach them through the fixtures at the end of this module.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn


def _inputs(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def vgg_bn():
    """VGG with BN: Conv (with bias, as torchvision's) → BN → ReLU, pools, a dropout MLP head."""

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    model = nn.Sequential(
        *block(3, 4),
        *block(4, 4),
        nn.MaxPool2d(2),
        *block(4, 8),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.ReLU(True),
        nn.Dropout(0.5),
        nn.Linear(16, 10),
    )
    truth = {"0.weight": 0, "3.weight": 0, "7.weight": 0}
    return model, _inputs(6, 3, 8, 8), truth


class BasicBlock(nn.Module):
    """Post-activation residual block (He et al., 2016): the add comes after bn2."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """ResNet-18 layout (stem, 4 stages of 2 basic blocks, pool, fc) with narrow channels."""

    def __init__(self, widths=(4, 4, 8, 8), num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], widths[0]
        for stage, width in enumerate(widths):
            stride = 1 if stage == 0 else 2
            layers.append(
                nn.Sequential(BasicBlock(cin, width, stride), BasicBlock(width, width, 1))
            )
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18():
    model = ResNet18()
    truth = {name: 0 for name, p in model.named_parameters() if p.dim() == 4}
    return model, _inputs(4, 3, 16, 16), truth


class PreActBlock(nn.Module):
    """Pre-activation block (He et al., 2016b): BN → ReLU → Conv twice, conv2 + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.layer1 = PreActBlock(4, 4, 1)
        self.layer2 = PreActBlock(4, 8, 2)
        self.layer3 = PreActBlock(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.fc(x.mean((2, 3)))


def preact_resnet():
    """Only the convolutions that feed bn2 inside a block are PSI.

    The stem's output is also the identity shortcut of layer1; every conv2 and the projection
    shortcut are added to a value not scaled with them.
    """
    truth = {"layer1.conv1.weight": 0, "layer2.conv1.weight": 0, "layer3.conv1.weight": 0}
    return PreActResNet(), _inputs(4, 3, 8, 8), truth


def mlp_bn():
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(12, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 16, bias=False),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(16, 5),
    )
    return model, _inputs(8, 3, 4), {"1.weight": 0, "4.weight": 0}


class Mixed(nn.Module):
    """Positive and negative cases of PSI_GEOMETRY.md §6, one branch each, on a tuple input."""

    def __init__(self):
        super().__init__()
        c = 4
        bn = nn.BatchNorm2d
        self.conv_bias_bn = nn.Conv2d(3, c, 3, padding=1)  # ✓ BN removes the bias
        self.bn_a = bn(c)
        self.conv_bias_relu_bn = nn.Conv2d(3, c, 3, padding=1)  # ✗ ReLU(cz + b)
        self.bn_b = bn(c)
        self.conv_relu_bn = nn.Conv2d(3, c, 3, padding=1, bias=False)  # ✓
        self.bn_c = bn(c)
        self.conv_sigmoid_bn = nn.Conv2d(3, c, 3, padding=1, bias=False)  # ✗
        self.bn_d = bn(c)
        self.conv_leaky_pool_dropout = nn.Conv2d(3, c, 3, padding=1, bias=False)  # ✓
        self.bn_e = bn(c)
        self.depthwise = nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False)  # ✓
        self.bn_f = bn(3)
        self.grouped = nn.Conv2d(4, 4, 1, groups=2, bias=False)  # ✓ per channel
        self.bn_grouped = bn(4)
        self.conv_groupnorm = nn.Conv2d(3, c, 1, bias=False)  # ✓ whole tensor only
        self.gn = nn.GroupNorm(2, c)
        self.conv_groupnorm_1 = nn.Conv2d(3, c, 1, bias=False)  # ✓ one channel per group
        self.gn_1 = nn.GroupNorm(c, c)
        self.conv_instancenorm = nn.Conv2d(3, c, 3)  # ✓ IN removes the bias
        self.inorm = nn.InstanceNorm2d(c)
        self.linear_layernorm = nn.Linear(3 * 8 * 8, 6, bias=False)  # ✓ whole tensor only
        self.ln = nn.LayerNorm(6)
        self.linear_bias_layernorm = nn.Linear(3 * 8 * 8, 6)  # ✗ the bias varies along LN
        self.ln_b = nn.LayerNorm(6)
        self.transposed = nn.ConvTranspose2d(3, c, 2, stride=2, bias=False)  # ✓ dim=1
        self.bn_t = bn(c)
        self.transposed_grouped = nn.ConvTranspose2d(4, 4, 2, groups=2, bias=False)  # ✓ None
        self.bn_tg = bn(4)
        self.sliced = nn.Conv2d(3, c, 1, bias=False)  # ✓ some channels sliced away
        self.bn_slice = bn(c - 1)
        self.shared = nn.Conv2d(3, 3, 3, padding=1, bias=False)  # used twice in parallel ✓
        self.bn_s1 = bn(3)
        self.bn_s2 = bn(3)
        self.twice = nn.Conv2d(3, 3, 1, bias=False)  # applied to its own output: c² → None
        self.bn_twice = bn(3)
        self.concat = nn.Conv2d(3, c, 1, bias=False)  # ✓ cat with the input, then BN
        self.bn_cat = bn(3 + c)
        self.concat_ln = nn.Conv2d(3, c, 1, bias=False)  # ✗ cat, then LayerNorm over all
        self.ln_cat = nn.LayerNorm([3 + c, 8, 8])
        self.residual = nn.Conv2d(3, 3, 3, padding=1, bias=False)  # ✗ + input before BN
        self.bn_r = bn(3)
        self.sync = nn.Conv2d(3, c, 1, bias=False)  # ✓
        self.sync_bn = nn.SyncBatchNorm(c)
        self.no_effect = nn.Conv2d(3, c, 1, bias=False)  # ✗ multiplied by 0
        self.bn_z = bn(c)
        self.functional = nn.Parameter(torch.randn(c, 3, 3, 3))  # ✓ F.conv2d → F.batch_norm
        self.conv1d = nn.Conv1d(2, c, 3, bias=False)  # ✓
        self.bn1d = nn.BatchNorm1d(c)
        self.conv3d = nn.Conv3d(1, c, 3, padding=1)  # ✓
        self.bn3d = nn.BatchNorm3d(c)
        self.rms = nn.Linear(6, 5, bias=False)  # ✓ RMSNorm removes the whole scale
        self.rms_norm = nn.RMSNorm(5)
        self.transposed1d = nn.ConvTranspose1d(2, c, 3, bias=False)  # ✓ dim=1
        self.bn_t1d = nn.BatchNorm1d(c)
        self.chunked = nn.Conv2d(3, c, 1, bias=False)  # ✓ chunk, each half normalized
        self.bn_chunk = bn(c // 2)
        self.viewed = nn.Conv2d(3, 2, 1, bias=False)  # ✓ view(size(0), -1), BN per feature
        self.bn_view = nn.BatchNorm1d(2 * 8 * 8)
        self.modules_between = nn.Sequential(  # ✓ module forms between the weight and BN
            nn.Conv2d(3, c, 3, padding=1, bias=False),
            nn.LeakyReLU(0.2),
            nn.MaxPool2d(2),
            nn.Dropout2d(0.3),
            bn(c),
        )
        self.bias_leaky = nn.Sequential(nn.Linear(6, 5), nn.LeakyReLU(0.2), nn.BatchNorm1d(5))  # ✗
        self.clipped = nn.Sequential(nn.Conv2d(3, c, 1, bias=False), nn.ReLU6(), bn(c))  # ✗
        self.padded_average = nn.Sequential(  # ✗ the bias is averaged with the zero padding
            nn.Conv2d(3, c, 1), nn.AvgPool2d(3, 1, padding=1), bn(c)
        )
        self.frozen = nn.Conv2d(3, c, 1, bias=False)  # ✗ BN with running statistics
        self.register_buffer("frozen_mean", torch.zeros(c))
        self.register_buffer("frozen_var", torch.ones(c))
        self.head = nn.Linear(c, 2)  # ✗ classifier

    def forward(self, image, sequence, volume):
        x = image
        pooled = F.leaky_relu(self.conv_leaky_pool_dropout(x), 0.1)
        pooled = F.dropout(F.avg_pool2d(pooled, 2), 0.3, self.training)
        cat = torch.cat([x, self.concat(x)], dim=1)
        cat_ln = torch.cat([x, self.concat_ln(x)], dim=1)
        depthwise = self.bn_f(self.depthwise(x))
        flat = x.flatten(1)
        features = self.ln(self.linear_layernorm(flat))
        outputs = [
            self.bn_a(self.conv_bias_bn(x)),
            self.bn_b(F.relu(self.conv_bias_relu_bn(x))),
            self.bn_c(torch.relu(self.conv_relu_bn(x))),
            self.bn_d(torch.sigmoid(self.conv_sigmoid_bn(x))),
            self.bn_e(pooled),
            depthwise,
            self.bn_grouped(self.grouped(torch.cat([depthwise, x[:, :1]], dim=1))),
            self.gn(self.conv_groupnorm(x)),
            self.gn_1(self.conv_groupnorm_1(x)),
            self.inorm(self.conv_instancenorm(x)),
            features,
            self.ln_b(self.linear_bias_layernorm(flat)),
            self.bn_t(self.transposed(x)),
            self.bn_tg(self.transposed_grouped(torch.cat([x, x[:, :1]], dim=1))),
            self.bn_slice(self.sliced(x)[:, 1:]),
            self.bn_s1(self.shared(x)),
            self.bn_s2(self.shared(x.flip(2))),
            self.bn_twice(self.twice(self.twice(x))),
            self.bn_cat(cat),
            self.ln_cat(cat_ln),
            self.bn_r(self.residual(x) + x),
            self.sync_bn(self.sync(x)),
            self.bn_z(self.no_effect(x) * 0.0),
            F.batch_norm(F.conv2d(x, self.functional), None, None, training=True),
            self.bn1d(self.conv1d(sequence)),
            self.bn3d(self.conv3d(volume)),
            self.rms_norm(self.rms(features)),
        ]
        first, second = self.chunked(x).chunk(2, dim=1)
        viewed = self.viewed(x)
        outputs += [
            self.bn1d(self.transposed1d(sequence)[..., :7]),
            self.bn_chunk(first),
            self.bn_chunk(F.relu(second)),
            self.bn_view(viewed.view(viewed.size(0), -1)),
            self.modules_between(x),
            self.bias_leaky(features),
            self.clipped(x),
            self.padded_average(x),
            F.batch_norm(self.frozen(x), self.frozen_mean, self.frozen_var, training=False),
        ]
        head = self.head(outputs[0].mean((2, 3)))
        return head, outputs


def mixed():
    truth = {
        "conv_bias_bn.weight": 0,
        "conv_relu_bn.weight": 0,
        "conv_leaky_pool_dropout.weight": 0,
        "depthwise.weight": 0,
        "grouped.weight": 0,
        "conv_groupnorm.weight": None,
        "conv_groupnorm_1.weight": 0,
        "conv_instancenorm.weight": 0,
        "linear_layernorm.weight": None,
        "transposed.weight": 1,
        "transposed_grouped.weight": None,
        "sliced.weight": 0,
        "shared.weight": 0,
        "twice.weight": None,
        "concat.weight": 0,
        "sync.weight": 0,
        "functional": 0,
        "conv1d.weight": 0,
        "conv3d.weight": 0,
        "rms.weight": None,
        "transposed1d.weight": 1,
        "chunked.weight": 0,
        "viewed.weight": 0,
        "modules_between.0.weight": 0,
    }
    inputs = (_inputs(6, 3, 8, 8), _inputs(6, 2, 7, seed=1), _inputs(6, 1, 4, 4, 4, seed=2))
    return Mixed(), inputs, truth


class InitSpecial(nn.Module):
    """Parameters whose values at initialization would hide the truth (PSI_GEOMETRY.md §6).

    A ConvNeXt stem (Conv with a bias, LayerNorm over channels), a Conv with a bias into a
    GroupNorm of two channels per group, one into a GroupNorm of one channel per group, a
    residual branch ending in a BatchNorm whose scale starts at zero, and one ending in a
    layer scale that starts at 1e-6.
    """

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)  # ✗ its bias is not removed by the LayerNorm
        self.stem_norm = nn.LayerNorm(c)
        self.grouped = nn.Conv2d(c, c, 1)  # ✗ nor by a GroupNorm of two channels per group
        self.gn = nn.GroupNorm(c // 2, c)
        self.per_channel = nn.Conv2d(c, c, 1)  # ✓ one channel per group removes it
        self.gn_1 = nn.GroupNorm(c, c)
        self.branch = nn.Conv2d(c, c, 3, padding=1, bias=False)  # ✓ BN(γ = 0 at first)
        self.branch_bn = nn.BatchNorm2d(c)
        self.scaled = nn.Conv2d(c, c, 1, bias=False)  # ✓ BN, then a layer scale of 1e-6
        self.scaled_bn = nn.BatchNorm2d(c)
        self.layer_scale = nn.Parameter(torch.full((c,), 1e-6))
        self.head = nn.Linear(c, 3)  # ✗
        for conv in (self.stem, self.grouped, self.per_channel):
            nn.init.zeros_(conv.bias)  # as ConvNeXt and many others initialize them
        nn.init.zeros_(self.branch_bn.weight)  # as zero_init_last in timm's ResNets

    def forward(self, x):
        x = self.stem_norm(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x + self.gn(self.grouped(x))
        x = x + self.gn_1(self.per_channel(x))
        x = F.relu(x + self.branch_bn(self.branch(x)))
        x = x + self.layer_scale.view(-1, 1, 1) * self.scaled_bn(self.scaled(x))
        return self.head(x.mean((2, 3)))


def init_special():
    truth = {"per_channel.weight": 0, "branch.weight": 0, "scaled.weight": 0}
    return InitSpecial(), _inputs(4, 3, 8, 8), truth


class StdConv2d(nn.Conv2d):
    """Weight standardization as timm's ``StdConv2d`` writes it: BatchNorm of the weight."""

    def __init__(self, *args, eps: float = 1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            training=True,
            momentum=0.0,
            eps=self.eps,
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """timm's ``ScaledStdConv2d`` (NFNets): the standardized weight times a gain per channel."""

    def __init__(self, *args, eps: float = 1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))
        self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x):
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            weight=(self.gain * self.scale).view(-1),
            training=True,
            momentum=0.0,
            eps=self.eps,
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdMeanConv2d(nn.Conv2d):
    """The form of timm's earlier ``StdConv2d``: ``(w - mean) / (std + eps)``."""

    def __init__(self, *args, eps: float = 1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x):
        std, mean = torch.std_mean(self.weight, dim=[1, 2, 3], keepdim=True, unbiased=False)
        weight = (self.weight - mean) / (std + self.eps)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Standardized(nn.Module):
    """Weight-standardized convolutions, PSI per output channel whatever follows them."""

    def __init__(self):
        super().__init__()
        self.batch_norm_form = StdConv2d(3, 4, 3, padding=1)  # ✓ dim=0
        self.scaled = ScaledStdConv2d(4, 4, 3, padding=1)  # ✓ dim=0 (the gain is not PSI)
        self.std_mean_form = StdMeanConv2d(4, 6, 1, bias=True)  # ✓ dim=0
        self.in_forward = nn.Parameter(torch.randn(5, 3, 3, 3))  # ✓ dim=0
        self.across = nn.Parameter(torch.randn(5, 3, 1, 1))  # ✓ None: standardized across dim 0
        self.head = nn.Linear(16, 2)  # ✗

    def forward(self, x):
        y = F.silu(self.std_mean_form(torch.tanh(self.scaled(F.gelu(self.batch_norm_form(x))))))
        w = self.in_forward
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        z = torch.sigmoid(F.conv2d(x, (w - mean) / torch.sqrt(var + 1e-5), padding=1))
        v = self.across
        u = F.conv2d(x, (v - v.mean()) * torch.rsqrt(v.var() + 1e-5))
        return self.head(torch.cat([y, z, u], 1).mean((2, 3)))


def standardized():
    truth = {
        "batch_norm_form.weight": 0,
        "scaled.weight": 0,
        "std_mean_form.weight": 0,
        "in_forward": 0,
        "across": None,
    }
    return Standardized(), _inputs(4, 3, 6, 6), truth


MODELS = {
    "vgg_bn": vgg_bn,
    "resnet18": resnet18,
    "preact_resnet": preact_resnet,
    "mlp_bn": mlp_bn,
    "mixed": mixed,
    "init_special": init_special,
    "standardized": standardized,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The probes run many tiny kernels: one thread avoids contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def build():
    """``build(name, seed=0)``: the model ``name`` of ``MODELS``, built with ``seed``."""

    def make(name: str, seed: int = 0):
        torch.manual_seed(seed)
        return MODELS[name]()

    return make


@pytest.fixture(params=list(MODELS))
def labelled(request, build):
    """Every hand-labelled model in turn: ``(model, example_inputs, truth)``."""
    return build(request.param)


@pytest.fixture
def untraceable():
    """A class whose models torch.fx cannot trace: data-dependent control flow."""

    class Untraceable(nn.Module):
        """Two standardized convolutions (✓ dim=0), one unused, one zero, a head (✗)."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.dead = nn.Conv2d(3, 4, 1, bias=False)
            self.zero = nn.Conv2d(3, 4, 1, bias=False)
            self.bn_zero = nn.BatchNorm2d(4)
            self.standardized = StdConv2d(4, 4, 3, padding=1)
            self.std_mean_form = StdMeanConv2d(4, 4, 1)
            self.head = nn.Linear(4, 2)
            with torch.no_grad():
                self.zero.weight.zero_()

        def forward(self, x):
            if x.sum() > -1e9:
                x = self.bn(self.conv(x)) + self.bn_zero(self.zero(x))
                x = F.gelu(self.std_mean_form(torch.tanh(self.standardized(x))))
            return self.head(x.mean((2, 3)))

    return Untraceable
