"""DeepLab v2's structure (the original's deeplab2.py: duplicated backbone parameters, only the rate-6 and
rate-12 ASPP branches summed) and the small U-Net, without any download."""
import pytest
import torch
import torchvision

import common
from cutmixseg import nets


pytestmark = pytest.mark.xdist_group("networks")  # one worker builds the network once (module fixture)


@pytest.fixture(scope="module")
def deeplab():
    torch.manual_seed(0)
    return nets.DeepLabV2(num_classes=21).eval()


def test_deeplabv2_321_input_gives_41x41_head_and_full_size_logits(deeplab):
    x = torch.randn(1, 3, 321, 321)
    with torch.no_grad():
        assert deeplab.head_logits(x).shape == (1, 21, 41, 41)
        assert deeplab(x).shape == (1, 21, 321, 321)


def test_deeplabv2_odd_sizes(deeplab):
    with torch.no_grad():
        assert deeplab(torch.randn(1, 3, 37, 50)).shape == (1, 21, 37, 50)


def test_deeplabv2_aspp_sums_only_the_rate_6_and_12_branches(deeplab):
    features = torch.randn(1, 2048, 9, 9)
    torch.manual_seed(1)
    with torch.no_grad():
        for branch in deeplab.aspp:
            branch.bias.normal_()
        rates = [branch.dilation[0] for branch in deeplab.aspp]
        assert rates == [6, 12, 18, 24]
        expected = deeplab.aspp[0](features) + deeplab.aspp[1](features)
        assert deeplab.n_branches == 2
        got = sum(b(features) for b in deeplab.aspp[:deeplab.n_branches])
        assert torch.allclose(got, expected)
        fixed = nets.DeepLabV2(num_classes=21, aspp_all_branches=True)
        assert fixed.n_branches == 4


def test_every_torchvision_resnet101_key_loads(monkeypatch):
    reference = torchvision.models.resnet101(weights=None).state_dict()
    fake = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in reference.items()}
    monkeypatch.setattr(nets, "load_torchvision_weights", lambda weights: fake)
    net = nets.DeepLabV2(num_classes=19)
    matched = net.load_imagenet()
    assert set(matched) == {k for k in reference if not k.startswith("fc.")}
    assert torch.equal(net.layer3[5].conv2.weight, fake["layer3.5.conv2.weight"])
    assert torch.equal(net.bn1.running_var, fake["bn1.running_var"])


def test_missing_weights_give_one_clear_message(monkeypatch):
    from torchvision.models import ResNet101_Weights

    def offline(self, *a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(type(ResNet101_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(common.UserError) as err:
        nets.load_torchvision_weights(ResNet101_Weights.IMAGENET1K_V1)
    text = str(err.value)
    assert "resnet101-63fe2227.pth" in text and "--no-pretrained" in text and "checkpoints" in text


class A:
    arch, lr, backbone_lr_mult, dedupe_params, optimizer, weight_decay = "deeplabv2", 3e-5, 0.1, False, "adam", 0.0


def test_deeplabv2_parameter_groups_keep_the_originals_multiplicities(deeplab):
    groups = common.param_groups(deeplab, A)
    by_repeat = {g["repeat"]: g for g in groups if g["name"] != "head"}
    ids = lambda ps: {id(p) for p in ps}
    assert ids(by_repeat[1]["params"]) == {id(deeplab.conv1.weight)}  # the stem conv: once
    assert id(deeplab.layer2[1].conv2.weight) in ids(by_repeat[3]["params"])  # block convs: 3 times
    assert id(deeplab.layer3[0].downsample[0].weight) in ids(by_repeat[4]["params"])  # downsample: 4
    assert all(g["lr"] == pytest.approx(3e-6) for g in groups if g["name"] != "head")
    head = [g for g in groups if g["name"] == "head"][0]
    assert head["lr"] == 3e-5 and ids(head["params"]) == ids(deeplab.aspp.parameters())  # 8 tensors
    assert len(head["params"]) == 8
    # BN affine parameters are never trained
    assert not any(p.requires_grad for m in deeplab.modules() if isinstance(m, torch.nn.BatchNorm2d)
                   for p in m.parameters())


def test_dedupe_params_steps_every_weight_once(deeplab):
    class B(A):
        dedupe_params = True
    groups = common.param_groups(deeplab, B)
    assert {g["repeat"] for g in groups} == {1}
    everything = [p for g in groups for p in g["params"]]
    assert len(everything) == len({id(p) for p in everything})


@pytest.mark.parametrize("size", [(64, 64), (37, 50), (1, 1)])
def test_unet_small_any_size(size):
    net = nets.UNetSmall(num_classes=3)
    x = torch.randn(2, 3, *size)
    out = net(x)
    assert out.shape == (2, 3, *size)
    out.mean().backward()
