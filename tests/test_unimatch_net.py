"""Today's protocol's network (UniMatch's DeepLabV3Plus on a deep-stem ResNet-101): parameter counts, key
names and shapes as UniMatch's, output stride 16, align_corners=True, and --backbone-weights' checks, on CPU
without any download."""
import pytest
import torch
import torch.nn as nn

from cutmixseg import nets
from cutmixseg.files import UserError

BLOCKS = (3, 4, 23, 3)  # ResNet-101


pytestmark = pytest.mark.xdist_group("unimatch_net")  # one worker builds the network once (module fixture)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return nets.DeepLabV3PlusDeepStem(num_classes=21).eval()


def bn(prefix):
    return [f"{prefix}.{name}" for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def unimatch_keys():
    """The state_dict keys of UniMatch's DeepLabV3Plus (model/semseg/deeplabv3plus.py, model/backbone/resnet.py)."""
    keys = ["backbone.conv1.0.weight", *bn("backbone.conv1.1"), "backbone.conv1.3.weight", *bn("backbone.conv1.4"),
            "backbone.conv1.6.weight", *bn("backbone.bn1")]
    for layer, blocks in enumerate(BLOCKS, 1):
        for b in range(blocks):
            p = f"backbone.layer{layer}.{b}"
            for i in (1, 2, 3):
                keys += [f"{p}.conv{i}.weight", *bn(f"{p}.bn{i}")]
            if b == 0:
                keys += [f"{p}.downsample.0.weight", *bn(f"{p}.downsample.1")]
    for branch in ("b0", "b1", "b2", "b3"):
        keys += [f"head.{branch}.0.weight", *bn(f"head.{branch}.1")]
    keys += ["head.b4.gap.1.weight", *bn("head.b4.gap.2"), "head.project.0.weight", *bn("head.project.1"),
             "reduce.0.weight", *bn("reduce.1"), "fuse.0.weight", *bn("fuse.1"), "fuse.3.weight", *bn("fuse.4"),
             "classifier.weight", "classifier.bias"]
    return keys


def test_parameter_counts_are_unimatchs_at_19_and_21_classes(net):
    with torch.device("meta"):  # no memory, no init: counting only
        net19 = nets.DeepLabV3PlusDeepStem(num_classes=19)
    assert sum(p.numel() for p in net19.parameters()) == 59_467_571
    assert sum(p.numel() for p in net.parameters()) == 59_468_085


def test_state_dict_keys_and_shapes_are_unimatchs(net):
    state = net.state_dict()
    assert list(state) == unimatch_keys()
    shapes = {"backbone.conv1.0.weight": (64, 3, 3, 3), "backbone.conv1.3.weight": (64, 64, 3, 3),
              "backbone.conv1.6.weight": (128, 64, 3, 3), "backbone.bn1.weight": (128,),
              "backbone.layer1.0.conv1.weight": (64, 128, 1, 1), "backbone.layer1.0.downsample.0.weight": (256, 128, 1, 1),
              "backbone.layer4.0.conv2.weight": (512, 512, 3, 3), "backbone.layer4.2.conv3.weight": (2048, 512, 1, 1),
              "head.b0.0.weight": (256, 2048, 1, 1), "head.b3.0.weight": (256, 2048, 3, 3),
              "head.b4.gap.1.weight": (256, 2048, 1, 1), "head.project.0.weight": (256, 1280, 1, 1),
              "reduce.0.weight": (48, 256, 1, 1), "fuse.0.weight": (256, 304, 3, 3), "fuse.3.weight": (256, 256, 3, 3),
              "classifier.weight": (21, 256, 1, 1), "classifier.bias": (21,)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes


def test_only_layer4_is_dilated_and_aspp_rates_are_6_12_18_without_dropout(net):
    r = net.backbone
    assert r.layer3[0].conv2.stride == (2, 2) and r.layer3[1].conv2.dilation == (1, 1)
    assert r.layer4[0].conv2.stride == (1, 1) and r.layer4[0].conv2.dilation == (1, 1)  # torchvision's scheme
    assert [b.conv2.dilation for b in r.layer4[1:]] == [(2, 2), (2, 2)]
    assert [getattr(net.head, b)[0].dilation for b in ("b1", "b2", "b3")] == [(6, 6), (12, 12), (18, 18)]
    assert not any(isinstance(m, (nn.Dropout, nn.Dropout2d)) for m in net.modules())
    assert net.backbone_modules() == [net.backbone]


def test_output_stride_16_and_no_ceil_mode_in_the_stem(net):
    with torch.no_grad():
        low, high = net.backbone(torch.randn(1, 3, 64, 64))
    assert low.shape == (1, 256, 16, 16) and high.shape == (1, 2048, 4, 4)  # ceil mode would give 17 and 5


def test_logits_have_the_input_size_and_upsampling_uses_align_corners(net):
    seen = {}
    hooks = [net.head.register_forward_hook(lambda m, i, o: seen.update(aspp=o)),
             net.fuse.register_forward_pre_hook(lambda m, i: seen.update(fuse_in=i[0])),
             net.classifier.register_forward_hook(lambda m, i, o: seen.update(low_res=o))]
    try:
        with torch.no_grad():
            out = net(torch.randn(1, 3, 65, 65))  # odd: 65 -> 17 at /4 -> 5 at /16
    finally:
        for h in hooks:
            h.remove()
    assert out.shape == (1, 21, 65, 65) and seen["low_res"].shape[2:] == (17, 17) and seen["aspp"].shape[2:] == (5, 5)
    # with align_corners=True, input pixel i lands exactly on output pixel i * (out - 1) / (in - 1), here 4 * i
    torch.testing.assert_close(out[..., ::4, ::4], seen["low_res"])
    torch.testing.assert_close(seen["fuse_in"][:, 48:, ::4, ::4], seen["aspp"])


def fake_backbone_file(path, net, drop=(), extra=None, fc=True):
    """A file with UniMatch's resnet101.pth key layout: the ResNet's keys plus ImageNet's fc.*; each tensor a
    distinct constant, stored as a stride-0 view (a few bytes on disk instead of 170 MB)."""
    state = {k: torch.full((), float(i), dtype=v.dtype).expand(v.shape)
             for i, (k, v) in enumerate(net.backbone.state_dict().items()) if k not in drop}
    if fc:
        state.update({"fc.weight": torch.zeros(()).expand(1000, 2048), "fc.bias": torch.zeros(()).expand(1000)})
    torch.save({**state, **(extra or {})}, path)
    return path


def test_backbone_weights_load_strictly_into_the_backbone_only(net, tmp_path):
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}  # the module's net is shared
    head_before = net.classifier.weight.clone()
    try:
        net.load_backbone(fake_backbone_file(tmp_path / "resnet101.pth", net))
        for i, (k, v) in enumerate(net.backbone.state_dict().items()):
            assert (v == i).all(), k
        assert torch.equal(net.classifier.weight, head_before)
        # a file saved before PyTorch 0.4.1 has no BN batch counters; they are not weights, so it loads too
        old = [k for k in net.backbone.state_dict() if k.endswith("num_batches_tracked")]
        net.load_backbone(fake_backbone_file(tmp_path / "old.pth", net, drop=old, fc=False))
    finally:
        net.backbone.load_state_dict(before)


def error(net, path):
    with pytest.raises(UserError) as e:
        net.load_backbone(path)
    message = str(e.value)
    assert "\n" not in message and "resnet101.pth" in message and "drive.google.com" in message
    return message


def test_a_missing_file_says_which_file_is_needed_and_where_it_is_linked(net, tmp_path):
    message = error(net, tmp_path / "pretrained" / "resnet101.pth")
    assert "no such file" in message and "Pretrained Backbone" in message and "README" in message


def test_a_file_that_is_not_torchs_says_so(net, tmp_path):
    (tmp_path / "notes.pth").write_text("not weights")
    assert "not a torch file" in error(net, tmp_path / "notes.pth")


def test_torchvisions_resnet_is_named_and_the_deep_stem_one_asked_for(net, tmp_path):
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64)}, tmp_path / "tv.pth")
    message = error(net, tmp_path / "tv.pth")
    assert "torchvision's standard-stem ResNet" in message and "deep-stem" in message


@pytest.mark.parametrize("content", [
    {"backbone.conv1.0.weight": torch.zeros(1), "head.b0.0.weight": torch.zeros(1)},  # a DeepLabV3Plus state_dict
    {"model": {"module.backbone.conv1.0.weight": torch.zeros(1)}, "epoch": 3},  # UniMatch's best.pth (DDP)
    {"student": {"classifier.bias": torch.zeros(1)}, "teacher": {"classifier.bias": torch.zeros(1)}},  # the kit's
], ids=["state_dict", "unimatch_checkpoint", "kit_checkpoint"])
def test_a_whole_model_checkpoint_is_not_taken_for_backbone_weights(net, tmp_path, content):
    torch.save(content, tmp_path / "best.pth")
    assert "whole-model checkpoint" in error(net, tmp_path / "best.pth")


def test_any_other_mismatch_names_the_first_missing_and_unexpected_keys(net, tmp_path):
    path = fake_backbone_file(tmp_path / "r.pth", net, drop=("layer4.2.bn3.running_var",),
                              extra={"layer5.0.conv1.weight": torch.zeros(1)})
    message = error(net, path)
    assert "missing: layer4.2.bn3.running_var" in message and "unexpected: layer5.0.conv1.weight" in message
    path = fake_backbone_file(tmp_path / "s.pth", net, extra={"bn1.weight": torch.zeros(64)})
    assert "wrong shape: bn1.weight (64,) (expected (128,))" in error(net, path)
