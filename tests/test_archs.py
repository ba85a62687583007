"""The paper's other networks (Table 4: DeepLab v3+, DenseUNet-161, PSPNet, as the original's architectures/):
built at random init (no download),
torchvision weights loaded key for key, logits at input size, protocol learning rates, BatchNorm handling.
Each ResNet-101 / DenseNet-161 is built once per module: they are slow on a CPU."""
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torchvision

import common
from cutmixseg import nets

pytestmark = pytest.mark.xdist_group("archs")  # one worker builds each network once (module fixture)
ARCHS = ["deeplabv3plus", "denseunet161", "pspnet101"]
BN = nn.modules.batchnorm._BatchNorm


def offline(weights):
    raise AssertionError(f"{weights} would be downloaded")


@pytest.fixture(scope="module", params=ARCHS)
def net(request):
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:  # --no-pretrained must never reach for the weights
        mp.setattr(nets, "load_torchvision_weights", offline)
        args = SimpleNamespace(arch=request.param, pretrained=False, aspp_all_branches=False)
        return common.build_net(args, num_classes=5, device=torch.device("cpu"))


def protocol(arch, dataset="pascal_aug", *extra):
    return common.parse_args(common.TrainArgs, ["--dataset", dataset, "--arch", arch, *extra])


def test_logits_at_input_size_for_odd_and_even_sizes(net):
    net.eval()
    with torch.no_grad():
        for size in [(33, 47), (64, 64)]:
            assert net(torch.randn(1, 3, *size)).shape == (1, 5, *size)


def test_one_training_step_moves_the_weights_and_freezes_only_the_backbone_bn(net):
    arch = {nets.DeepLabV3Plus: "deeplabv3plus", nets.DenseUNet161: "denseunet161",
            nets.PSPNet101: "pspnet101"}[type(net)]
    args = protocol(arch)
    assert args.freeze_bn
    optimizer = common.make_optimizer(net, args)
    common.set_train_mode(net, args.freeze_bn)
    frozen = {m for top in net.frozen_bn_modules() for m in top.modules() if isinstance(m, BN)}
    assert frozen and all(not m.training for m in frozen)
    head_bn = [m for m in net.modules() if isinstance(m, BN) and m not in frozen]
    assert head_bn and all(m.training for m in head_bn)  # the head's BN trains
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(2, 3, 33, 47), torch.randint(0, 5, (2, 33, 47))
    torch.nn.functional.cross_entropy(net(x), y).backward()
    optimizer.step()
    after = net.state_dict()
    name = {id(m): n for n, m in net.named_modules()}
    for m in frozen:  # frozen statistics stay, affine parameters may move (v3+: its backbone BN affine
        # trains, as the original's)
        assert torch.equal(after[name[id(m)] + ".running_mean"], before[name[id(m)] + ".running_mean"])
    assert not torch.equal(after[name[id(head_bn[0])] + ".running_mean"], before[name[id(head_bn[0])] + ".running_mean"])
    moved = [k for k, v in after.items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any("conv" in k for k in moved)
    net.zero_grad(set_to_none=True)


@pytest.mark.parametrize("arch, head_lr, backbone_lr", [("deeplabv3plus", 1e-5, None), ("denseunet161", 3e-4, 3e-5),
                                                        ("pspnet101", 1e-4, 1e-5)])
def test_parameter_groups_have_table_5_learning_rates(net, arch, head_lr, backbone_lr):
    if arch != {nets.DeepLabV3Plus: "deeplabv3plus", nets.DenseUNet161: "denseunet161",
                nets.PSPNet101: "pspnet101"}[type(net)]:
        pytest.skip("another arch")
    args = protocol(arch)
    assert args.optimizer == "adam" and args.lr == head_lr
    groups = common.param_groups(net, args)
    everything = [p for g in groups for p in g["params"]]
    assert len(everything) == len({id(p) for p in everything}) == len(list(net.parameters()))  # each once
    assert {g["repeat"] for g in groups} == {1}
    head = [g for g in groups if g["name"] == "head"][0]
    assert head["lr"] == pytest.approx(head_lr)
    if backbone_lr is None:  # DeepLab v3+: one group, all at 1e-5 (the original's wrapper had no pretraining tag)
        assert len(groups) == 1
    else:
        (backbone,) = [g for g in groups if g["name"] != "head"]
        assert backbone["lr"] == pytest.approx(backbone_lr)
        expected = {id(p) for m in net.backbone_modules() for p in m.parameters()}
        assert {id(p) for p in backbone["params"]} == expected


def test_isic_defaults_to_the_dense_unet_with_sgd_and_no_frozen_bn():
    args = common.parse_args(common.TrainArgs, ["--dataset", "isic2017"])
    assert (args.arch, args.optimizer, args.lr, args.backbone_lr_mult, args.freeze_bn) == \
        ("denseunet161", "sgd", 0.1, 0.1, False)


def test_a_net_without_frozen_bn_modules_freezes_every_bn():  # DeepLab v2's behaviour, unchanged
    unet = nets.UNetSmall(num_classes=3)
    common.set_train_mode(unet, freeze_bn=True)
    assert all(not m.training for m in unet.modules() if isinstance(m, BN))


def fake_state(model):
    """A random state dict with the shapes of `model`'s (positive running variances)."""
    state = model.state_dict()
    return {k: (torch.rand_like(v) + 0.5 if k.endswith("running_var") else torch.randn_like(v.float()).to(v.dtype))
            for k, v in state.items()}


@pytest.mark.parametrize("cls", [nets.DeepLabV3Plus, nets.PSPNet101])
def test_every_torchvision_resnet101_key_loads(cls, monkeypatch):
    fake = fake_state(torchvision.models.resnet101(weights=None))
    monkeypatch.setattr(nets, "load_torchvision_weights", lambda weights: fake)
    model = cls(num_classes=5)
    loaded = model.load_imagenet()
    assert set(loaded) == {k for k in fake if not k.startswith("fc.")}
    assert torch.equal(model.backbone.layer3[7].conv2.weight, fake["layer3.7.conv2.weight"])
    assert torch.equal(model.backbone.bn1.running_var, fake["bn1.running_var"])


def test_every_torchvision_densenet161_key_loads_with_the_files_old_names(monkeypatch):
    fake = fake_state(torchvision.models.densenet161(weights=None))
    # the downloaded file names a dense layer's parts "norm.1", "conv.2", ... (torchvision renames them)
    fake = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in fake.items()}
    assert "features.denseblock2.denselayer3.norm.1.weight" in fake
    monkeypatch.setattr(nets, "load_torchvision_weights", lambda weights: fake)
    model = nets.DenseUNet161(num_classes=2)
    loaded = model.load_imagenet()
    assert len(loaded) == len([k for k in fake if k.startswith("features.")])
    assert torch.equal(model.features.denseblock2.denselayer3.norm1.weight,
                       fake["features.denseblock2.denselayer3.norm.1.weight"])
    assert not hasattr(model, "classifier")  # the unused ImageNet classifier is dropped


def test_dense_unet_skips_and_channels_follow_reference_5_3(net):
    if not isinstance(net, nets.DenseUNet161):
        pytest.skip("Dense U-Net only")
    seen = {}
    hooks = [getattr(net.features, name).register_forward_pre_hook(
        lambda m, inp, name=name: seen.__setitem__(name, tuple(inp[0].shape[1:])))
        for name in nets.DenseUNet161.TAPS]
    hooks.append(net.features.norm5.register_forward_hook(lambda m, i, out: seen.__setitem__("norm5", out.shape[1:])))
    net.eval()
    with torch.no_grad():
        net(torch.randn(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    assert seen == {"pool0": (96, 32, 32), "transition1": (384, 16, 16), "transition2": (768, 8, 8),
                    "transition3": (2112, 4, 4), "norm5": (2208, 2, 2)}
    assert (net.line0.in_channels, net.line0.out_channels, net.line0.bias is not None) == (2112, 2208, True)
    convs = [(b[0].in_channels, b[0].out_channels) for b in net.decoder]
    assert convs == [(2208, 768), (768, 384), (384, 96), (96, 96)]
    kinds = [type(m) for m in net.final]  # upsample, conv 96->64, Dropout(0.3), BN, ReLU, 1x1 conv
    assert kinds == [nn.Upsample, nn.Conv2d, nn.Dropout, nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
    assert net.final[2].p == 0.3 and net.final[1].in_channels == 96 and net.final[1].out_channels == 64


def test_pspnet_pyramid_follows_reference_5_5(net):
    if not isinstance(net, nets.PSPNet101):
        pytest.skip("PSPNet only")
    assert [b[0].output_size for b in net.ppm] == [1, 2, 3, 6]
    for b in net.ppm:
        assert (b[1].in_channels, b[1].out_channels, b[1].bias) == (2048, 512, None)
    conv, _, _, drop, last = net.classifier
    assert (conv.in_channels, conv.kernel_size) == (2048 + 4 * 512, (3, 3))
    assert isinstance(drop, nn.Dropout2d) and drop.p == 0.1 and last.out_channels == 5
    assert not [n for n, _ in net.named_modules() if "aux" in n or "deepsup" in n]  # no auxiliary head
    assert net.backbone.layer4[1].conv2.dilation == (4, 4) and net.backbone.layer3[1].conv2.dilation == (2, 2)
    assert net.backbone.conv1.out_channels == 64  # torchvision's standard stem (MIT's deep stem: a deviation)
    fresh = nets.PSPNet101(num_classes=5)  # MIT's init of the new layers (the fixture has trained a step)
    assert all(torch.all(b[2].bias == 1e-4) and torch.all(b[2].weight == 1) for b in fresh.ppm)


def test_deeplabv3plus_head_follows_reference_5_2(net):
    if not isinstance(net, nets.DeepLabV3Plus):
        pytest.skip("DeepLab v3+ only")
    rates = [m.convs[i][0].dilation[0] for m in [net.aspp] for i in (1, 2, 3)]
    assert rates == [12, 24, 36]
    assert isinstance(net.aspp.project[3], nn.Dropout) and net.aspp.project[3].p == 0.5
    assert net.project[0].out_channels == 48 and net.classifier[0].in_channels == 304
    assert net.backbone_modules() == [] and net.frozen_bn_modules() == [net.backbone]
    with torch.no_grad():
        low, high = nets.resnet_features(net.backbone.eval(), torch.randn(1, 3, 64, 64))
    assert low.shape[1:] == (256, 16, 16) and high.shape[1:] == (2048, 8, 8)  # output stride 8
