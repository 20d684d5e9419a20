import pytest
import torch
from torch import nn

from dfmpc_deploy.core.pairing import find_links, plan_roles
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
    "mobilenetv2_w1": (19, ("features.stage2.unit2.conv2.conv", "features.stage2.unit2.conv3.conv"),
                       "features.init_block.conv"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_pairing_found_from_graph(name):
    n_pairs, pair, unpaired = EXPECTED[name]
    model = load_model(name, "random").module
    roles, pairs = plan_roles(model)
    mods = dict(model.named_modules())
    assert len(pairs) == n_pairs
    assert any((p.low, p.high) == pair for p in pairs), f"{pair} not among {[(p.low, p.high) for p in pairs][:4]}"
    by = {r.fqn: r for r in roles}
    assert by[unpaired].role == "high" and by[unpaired].partner is None
    used = [p.low for p in pairs] + [p.high for p in pairs]
    assert len(used) == len(set(used)), "a layer is in two pairs"
    for p in pairs:
        assert mods[p.low].out_channels == mods[p.high].in_channels
        assert by[p.low].role == "low" and by[p.high].role == "high-compensating"
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert len(roles) == n_layers


def test_mobilenetv2_relu6_is_not_homogeneous():
    links = find_links(load_model("mobilenetv2_w1", "random").module)
    assert any(lk.act == "relu6" and not lk.homogeneous for lk in links)


def test_residual_add_and_concat_end_chains():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))

        def forward(self, x):
            y = torch.relu(self.a(x))
            return self.c(torch.relu(self.b(y)) + y)  # a feeds b and the add: no link a->b

    links = find_links(Net())
    assert [(lk.low, lk.high) for lk in links] == []
