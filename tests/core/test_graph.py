import pytest
import torch
from torch import nn

from dfmpc_deploy.core.graph import GraphAnalysis, Role
from dfmpc_deploy.errors import DfmpcError
from dfmpc_deploy.zoo.models import load_model

# name -> (number of pairs, a pair that must be found (low, high), a layer that must stay high and unpaired)
EXPECTED = {
    "resnet20_cifar10_optA": (9, ("layer2.0.conv1", "layer2.0.conv2"), "conv1"),
    "resnet56_cifar10_optA": (27, ("layer3.8.conv1", "layer3.8.conv2"), "linear"),
    "resnet20_cifar10": (9, ("features.stage1.unit1.body.conv1.conv", "features.stage1.unit1.body.conv2.conv"),
                         "features.stage2.unit1.identity_conv.conv"),
    "resnet18": (8, ("features.stage4.unit2.body.conv1.conv", "features.stage4.unit2.body.conv2.conv"),
                 "features.init_block.conv.conv"),
    # bottleneck: 3x3 low, last 1x1 high, first 1x1 high and unpaired (Fig. 2b)
    "resnet50": (16, ("features.stage1.unit1.body.conv2.conv", "features.stage1.unit1.body.conv3.conv"),
                 "features.stage1.unit1.body.conv1.conv"),
    "resnet101": (33, ("features.stage3.unit20.body.conv2.conv", "features.stage3.unit20.body.conv3.conv"),
                  "features.stage3.unit20.body.conv1.conv"),
    # plain chain through max-pooling: pairs from the end, the stem stays high
    "vgg16": (6, ("features.stage5.unit2.conv", "features.stage5.unit3.conv"), "features.stage1.unit1.conv"),
    "densenet121": (58, ("features.stage1.unit1.conv1.conv", "features.stage1.unit1.conv2.conv"),
                    "features.stage2.trans2.conv.conv"),
    # depthwise low, projection high; pytorchcv's first block has a 1x1 conv before its depthwise one, which pairs
    # with the stem; the expansions after a linear bottleneck stay high and unpaired
    "mobilenetv2_w1": (19, ("features.stage2.unit2.conv2.conv", "features.stage2.unit2.conv3.conv"),
                       "features.stage2.unit1.conv1.conv"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_pairing_found_from_graph(name):
    n_pairs, pair, unpaired = EXPECTED[name]
    model = load_model(name, "random").module
    g = GraphAnalysis.of(model)
    roles, pairs = g.roles, g.pairs
    mods = dict(model.named_modules())
    assert len(pairs) == n_pairs
    assert any((p.low, p.high) == pair for p in pairs), f"{pair} not among {[(p.low, p.high) for p in pairs][:4]}"
    by = {r.fqn: r for r in roles}
    assert by[unpaired].role == Role.HIGH and by[unpaired].partner is None
    used = [p.low for p in pairs] + [p.high for p in pairs]
    assert len(used) == len(set(used)), "a layer is in two pairs"
    for p in pairs:
        assert mods[p.low].out_channels == mods[p.high].in_channels
        assert by[p.low].role == Role.LOW and by[p.high].role == Role.HIGH_COMPENSATING
        assert g.bn_after.get(p.low) == p.bn
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert len(roles) == n_layers


def test_mobilenetv2_relu6_is_not_homogeneous():
    links = GraphAnalysis.of(load_model("mobilenetv2_w1", "random").module).links
    assert any(lk.act == "relu6" and not lk.homogeneous for lk in links)


def test_residual_add_and_concat_end_chains():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))

        def forward(self, x):
            y = torch.relu(self.a(x))
            return self.c(torch.relu(self.b(y)) + y)  # a feeds b and the add: no link a->b

    assert [(lk.low, lk.high) for lk in GraphAnalysis.of(Net()).links] == []


def test_one_trace_serves_every_model_of_the_architecture():
    """The graph is structure only: run on another instance, it computes that instance's function."""
    a, b = load_model("resnet20_cifar10_optA", "random", seed=0).module, load_model("resnet20_cifar10_optA",
                                                                                     "random", seed=1).module
    g = GraphAnalysis.of(a)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(g.graph_module(b)(x), b(x)) and not torch.equal(b(x), a(x))


def test_untraceable_model_is_one_line_error():
    class Dyn(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.c(x) if x.sum() > 0 else x  # data-dependent control flow

    with pytest.raises(DfmpcError, match="cannot trace Dyn with torch.fx"):
        GraphAnalysis.of(Dyn())


def test_units_match_layer_bn_activation_once():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 8, 3), nn.Flatten())
    u = GraphAnalysis.of(net).units
    assert (u["0"].bn, u["0"].act, u["0"].out.target) == ("1", "relu6", "2")
    assert (u["3"].bn, u["3"].act) == (None, None)
