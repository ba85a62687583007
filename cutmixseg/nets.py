"""The networks (what common.build_net builds): each takes any input size and returns logits of that size.

  DeepLabV2        ResNet-101, output stride 8, the paper's main network (Hung et al.'s AdvSemiSeg)
  DeepLabV3Plus    dilated ResNet-101, output stride 8, ASPP 12/24/36 (the paper's Table 5)
  DenseUNet161     U-Net on DenseNet-161 features (ISIC, Pascal Table 5)
  PSPNet101        pyramid pooling on a dilated ResNet-101 (Pascal Table 5)
  DeepLabV3PlusDeepStem  UniMatch's (today's protocol): deep-stem ResNet-101, output stride 16, ASPP 6/12/18
  UNetSmall        a small U-Net from scratch (demo, tests)
  sync_batchnorm   BatchNorm across torchrun processes (GlobalBatchNorm off CUDA)

Every network's forward(x, need_fp=True) returns (out, out_fp): UniMatch's feature perturbation, the features
that its classifier reads passed on twice, as they are and under Dropout2d(0.5) (fp_features; each docstring
names them).

Imports nothing of the kit but the bottom file (UserError)."""
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .files import UserError


def fp_features(*features):
    """UniMatch's feature perturbation: each (B, C, h, w) feature map batch-concatenated with itself under
    Dropout2d(0.5) -> (2B, C, h, w), the clean half first. The dropout is made afresh, as UniMatch's
    nn.Dropout2d(0.5) inside its forward, so it drops in eval mode too; the maps draw from torch's global RNG
    in the order given."""
    return [torch.cat((f, F.dropout2d(f, 0.5, training=True))) for f in features]

def check_fp_input(net, x, need_fp):
    """need_fp on an input smaller than the stride of the features it drops out (net.fp_stride): one line."""
    if need_fp and min(x.shape[2:]) < net.fp_stride:
        raise UserError(f"need_fp: a {x.shape[2]}x{x.shape[3]} input is smaller than the "
                        f"{net.fp_stride}-pixel stride of the features that {type(net).__name__} drops out; "
                        f"give crops of at least {net.fp_stride} pixels a side")

def fp_split(out, need_fp):
    """(out, out_fp) from a need_fp pass's (2B, ...) output; the output itself otherwise."""
    return tuple(out.chunk(2)) if need_fp else out

class Bottleneck(nn.Module):
    """Caffe-style ResNet bottleneck (stride on the first 1x1 conv), as DeepLab v2 / AdvSemiSeg."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn3(self.conv3(self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))

class DeepLabV2(nn.Module):
    """DeepLab v2 on ResNet-101, as the original (from Hung et al.'s AdvSemiSeg): output stride 8, ASPP
    rates 6/12/18/24, BatchNorm frozen. need_fp drops out layer4's features (2048 channels at /8), which its
    ASPP classifier reads."""
    fp_stride = 8

    def __init__(self, num_classes, aspp_all_branches=False):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.layer1 = self._layer(64, 3)
        self.layer2 = self._layer(128, 4, stride=2)
        self.layer3 = self._layer(256, 23, dilation=2)
        self.layer4 = self._layer(512, 3, dilation=4)
        self.aspp = nn.ModuleList(nn.Conv2d(2048, num_classes, 3, padding=r, dilation=r)
                                  for r in (6, 12, 18, 24))
        # The original (from AdvSemiSeg) returns inside its loop over the branches, so only the rate-6
        # and rate-12 branches are summed; 18 and 24 exist, sit in the optimizer, and are never used.
        self.n_branches = 4 if aspp_all_branches else 2
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, 0.01)
            elif isinstance(m, nn.BatchNorm2d):  # affine 1 and 0, never trained in the original
                m.weight.data.fill_(1)
                m.bias.data.zero_()
                m.requires_grad_(False)

    def _layer(self, planes, blocks, stride=1, dilation=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def backbone_modules(self):
        return [self.conv1, self.bn1, self.layer1, self.layer2, self.layer3, self.layer4]

    def head_logits(self, x, need_fp=False):
        """Stride-8 logits (321x321 in -> 41x41 out); need_fp: (2B, ...), the perturbed half second."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = fp_features(x)[0] if need_fp else x
        return sum(branch(x) for branch in self.aspp[:self.n_branches])

    def forward(self, x, need_fp=False):
        check_fp_input(self, x, need_fp)
        logits = self.head_logits(x, need_fp)
        # align_corners=True, as the original (from Hung et al., whose numbers the paper compares to)
        out = F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=True)
        return fp_split(out, need_fp)

    def load_imagenet(self):
        """Copy torchvision's ImageNet ResNet-101 (IMAGENET1K_V1) wherever name and shape match."""
        from torchvision.models import ResNet101_Weights
        state = load_torchvision_weights(ResNet101_Weights.IMAGENET1K_V1)
        own = self.state_dict()
        matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        self.load_state_dict(matched, strict=False)
        return matched

def load_torchvision_weights(weights):
    """torchvision weights from its cache (downloading if online), else one clear message."""
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return weights.get_state_dict(progress=True, check_hash=False)
    except Exception as e:
        raise UserError(f"cannot load the ImageNet weights {weights} ({type(e).__name__}): download "
                        f"{weights.url} to {file}, or run with --no-pretrained")

class UNetSmall(nn.Module):
    """A small U-Net trained from scratch (demo, tests, small images): 4 levels, 16..128 channels. need_fp
    drops out every encoder level's features (the skips and the bottom, which the decoder reads), as
    UniMatch's U-Net."""

    def __init__(self, num_classes, width=16, depth=3):
        super().__init__()
        chans = [width * 2 ** i for i in range(depth + 1)]

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.down = nn.ModuleList(block(ci, co) for ci, co in zip([3] + chans[:-1], chans))
        self.up = nn.ModuleList(block(chans[i + 1] + chans[i], chans[i]) for i in reversed(range(depth)))
        self.classifier = nn.Conv2d(chans[0], num_classes, 1)
        self.multiple = self.fp_stride = 2 ** depth

    def forward(self, x, need_fp=False):
        h, w = x.shape[2:]
        check_fp_input(self, x, need_fp)
        # zero = the mean colour; cropped off below
        x = F.pad(x, (0, -w % self.multiple, 0, -h % self.multiple))
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        if need_fp:
            skips = fp_features(*skips)
            x = skips[-1]
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = block(torch.cat([F.interpolate(x, size=skip.shape[2:], mode="nearest"), skip], 1))
        return fp_split(self.classifier(x)[:, :, :h, :w], need_fp)

def resnet101_dilated():
    """torchvision's ResNet-101 with layer3/layer4 dilated 2/4 (output stride 8, torchvision's scheme: each
    dilated layer's first block keeps the previous dilation), without its average pooling and fc."""
    from torchvision.models import resnet101
    net = resnet101(weights=None, replace_stride_with_dilation=[False, True, True])
    del net.avgpool, net.fc
    return net

def resnet_features(r, x):
    """(layer1 output: 256 channels at /4, layer4 output: 2048 channels at /8) of a dilated ResNet."""
    low = r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(x)))))
    return low, r.layer4(r.layer3(r.layer2(low)))

def load_resnet101(resnet):
    """torchvision's ImageNet ResNet-101 (IMAGENET1K_V1, as the original) into `resnet`:
    every key but fc's."""
    from torchvision.models import ResNet101_Weights
    state = {k: v for k, v in load_torchvision_weights(ResNet101_Weights.IMAGENET1K_V1).items()
             if not k.startswith("fc.")}
    resnet.load_state_dict(state)  # strict: a key that does not fit is an error, not a silent skip
    return state

def init_head(modules, bn_bias=0.0):
    """Kaiming-normal conv weights, BN weight 1 and bias `bn_bias`: the original's init of new layers."""
    for m in modules:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1.0)
            nn.init.constant_(m.bias, bn_bias)

class DeepLabV3Plus(nn.Module):
    """DeepLab v3+ on a dilated ResNet-101, as the original: ASPP rates 12/24/36 (its projection ends in
    Dropout 0.5), a 48-channel layer1 skip, two 3x3 conv-BN-ReLU blocks, bilinear upsampling
    (align_corners=False). need_fp drops out the low-level (layer1, /4) and the high-level (layer4, /8)
    features, as UniMatch's DeepLab v3+."""
    fp_stride = 8

    def __init__(self, num_classes):
        super().__init__()
        from torchvision.models.segmentation.deeplabv3 import ASPP
        self.backbone = resnet101_dilated()
        self.project = nn.Sequential(nn.Conv2d(256, 48, 1, bias=False), nn.BatchNorm2d(48),
                                     nn.ReLU(inplace=True))
        self.aspp = ASPP(2048, [12, 24, 36])
        self.classifier = nn.Sequential(
            nn.Conv2d(304, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, num_classes, 1))
        init_head([*self.project.modules(), *self.aspp.modules(), *self.classifier.modules()])

    def forward(self, x, need_fp=False):
        check_fp_input(self, x, need_fp)
        low, high = resnet_features(self.backbone, x)
        if need_fp:
            low, high = fp_features(low, high)
        low = self.project(low)  # (B, 48, H/4, W/4)
        high = F.interpolate(self.aspp(high), size=low.shape[2:], mode="bilinear", align_corners=False)
        logits = self.classifier(torch.cat([low, high], 1))
        out = F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)
        return fp_split(out, need_fp)

    def backbone_modules(self):
        return []  # the original's wrapper quirk: no pretrained group, all parameters at the head's rate

    def frozen_bn_modules(self):
        return [self.backbone]  # --freeze_bn: backbone BN statistics only; its affine parameters still train

    def load_imagenet(self):
        return load_resnet101(self.backbone)

def pad_centred(x, multiple):
    """(B, C, H, W) padded with zeros (the mean colour) to sizes divisible by `multiple`, centred as
    the original's collate (top ⌊pad/2⌋, bottom the rest; left, right alike), and the index
    cropping it back."""
    h, w = x.shape[2:]
    ph, pw = -h % multiple, -w % multiple  # padding per axis
    top, left = ph // 2, pw // 2
    return F.pad(x, (left, pw - left, top, ph - top)), (..., slice(top, top + h), slice(left, left + w))

class DenseUNet161(nn.Module):
    """U-Net on torchvision's DenseNet-161 features, as the original (after Li et al.):
    each decoder block upsamples x2 (nearest), *adds* the skip, then conv 3x3 + BN + ReLU. need_fp drops out
    the encoder's features that the decoder reads (the four skips and the bottom), as UniMatch's U-Net."""
    fp_stride = 32

    TAPS = ("pool0", "transition1", "transition2", "transition3")  # skips = the inputs of these layers

    def __init__(self, num_classes):
        super().__init__()
        from torchvision.models import densenet161
        # the encoder only: the original also kept DenseNet's ImageNet classifier, which no gradient reaches
        self.features = densenet161(weights=None).features
        self.line0 = nn.Conv2d(2112, 2208, 1)  # the /16 skip widened to the bottom's 2208 channels
        chans = [2208, 768, 384, 96, 96]  # decoder: /32 -> /16 -> /8 -> /4 -> /2; skips of 2208, 768, 384, 96
        self.decoder = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                          nn.ReLU(inplace=True))
            for cin, cout in zip(chans, chans[1:]))
        # note the order: conv, dropout, BN
        self.final = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(96, 64, 3, padding=1, bias=False),
                                   nn.Dropout(0.3), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                                   nn.Conv2d(64, num_classes, 1))

    def forward(self, x, need_fp=False):
        check_fp_input(self, x, need_fp)
        x, crop = pad_centred(x, 32)
        skips = []
        for name, layer in self.features.named_children():
            if name in self.TAPS:
                skips.append(x)
            x = layer(x)
        x = F.relu(x)  # (B, 2208, H/32, W/32): norm5, then ReLU
        if need_fp:
            *skips, x = fp_features(*skips, x)
        skips[-1] = self.line0(skips[-1])
        for block, skip in zip(self.decoder, reversed(skips)):
            x = block(F.interpolate(x, scale_factor=2, mode="nearest") + skip)
        return fp_split(self.final(x)[crop], need_fp)

    def backbone_modules(self):
        return [self.features]
    frozen_bn_modules = backbone_modules  # --freeze_bn: the pretrained encoder's BatchNorm

    def load_imagenet(self):
        """torchvision's ImageNet DenseNet-161 (IMAGENET1K_V1); old layer names (norm.1) renamed (norm1)."""
        from torchvision.models import DenseNet161_Weights
        state = load_torchvision_weights(DenseNet161_Weights.IMAGENET1K_V1)
        state = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.", r"\1\2.", k[len("features."):]): v
                 for k, v in state.items() if k.startswith("features.")}
        self.features.load_state_dict(state)
        return state

class PSPNet101(nn.Module):
    """PSPNet on a dilated ResNet-101: pyramid pooling 1/2/3/6, no auxiliary loss. The original used MIT
    CSAIL's deep-stem `resnet101dilated` and weights; torchvision has only the standard stem (README). need_fp
    drops out layer4's features (/8), which the pyramid pooling reads, as UniMatch's PSPNet."""
    fp_stride = 8

    def __init__(self, num_classes, scales=(1, 2, 3, 6)):
        super().__init__()
        self.backbone = resnet101_dilated()
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), nn.Conv2d(2048, 512, 1, bias=False), nn.BatchNorm2d(512),
                          nn.ReLU(inplace=True)) for s in scales)
        self.classifier = nn.Sequential(
            nn.Conv2d(2048 + 512 * len(scales), 512, 3, padding=1, bias=False), nn.BatchNorm2d(512),
            nn.ReLU(inplace=True), nn.Dropout2d(0.1), nn.Conv2d(512, num_classes, 1))
        init_head([*self.ppm.modules(), *self.classifier.modules()], bn_bias=1e-4)  # MIT's weights_init

    def forward(self, x, need_fp=False):
        check_fp_input(self, x, need_fp)
        _, f = resnet_features(self.backbone, x)  # (B, 2048, H/8, W/8)
        if need_fp:
            f = fp_features(f)[0]
        pyramid = [f] + [F.interpolate(branch(f), size=f.shape[2:], mode="bilinear", align_corners=False)
                         for branch in self.ppm]
        logits = self.classifier(torch.cat(pyramid, 1))
        out = F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)
        return fp_split(out, need_fp)

    def backbone_modules(self):
        return [self.backbone]
    frozen_bn_modules = backbone_modules  # --freeze_bn: the pretrained backbone's BatchNorm

    def load_imagenet(self):
        return load_resnet101(self.backbone)

# --- today's protocol (UniMatch, Yang et al. CVPR 2023): DeepLab v3+ on a deep-stem ResNet-101 --------------
UNIMATCH_RESNET101 = ("UniMatch's deep-stem ImageNet ResNet-101, pretrained/resnet101.pth "
                      "(the 'ResNet-101' link under 'Pretrained Backbone' in UniMatch's README: "
                      "https://drive.google.com/file/d/1Rx0legsMolCWENpfvE2jUScT3ogalMO8/view?usp=sharing)")

def conv_bn_relu(cin, cout, k=1, dilation=1, stride=1):
    """Conv (no bias) + BN + ReLU, keys .0/.1 as UniMatch's blocks."""
    conv = nn.Conv2d(cin, cout, k, stride, padding=dilation * (k // 2), dilation=dilation, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

class DeepStemResNet101(nn.Module):
    """UniMatch's ResNet-101 (after PyTorch-Encoding's resnet101s): a deep stem of three 3x3 convs
    64-64-128, torchvision's bottleneck (stride on the 3x3 conv), layer4 dilated 2 (output stride 16);
    no avgpool, no fc."""

    def __init__(self):
        super().__init__()
        # keys conv1.0, .1, .3, .4, .6
        self.conv1 = nn.Sequential(*conv_bn_relu(3, 64, 3, stride=2), *conv_bn_relu(64, 64, 3),
                                   nn.Conv2d(64, 128, 3, padding=1, bias=False))
        self.bn1 = nn.BatchNorm2d(128)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.inplanes = 128
        self.layer1 = self._layer(64, 3)
        self.layer2 = self._layer(128, 4, stride=2)
        self.layer3 = self._layer(256, 23, stride=2)
        self.layer4 = self._layer(512, 3, dilation=2)  # replace_stride_with_dilation [False, False, True]
        for m in self.modules():  # UniMatch's (and torchvision's) init; BN already starts at weight 1, bias 0
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _layer(self, planes, blocks, stride=1, dilation=1):
        # UniMatch's block: same arithmetic and keys
        from torchvision.models.resnet import Bottleneck as Block
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        # the dilated layer's first block keeps dilation 1, as torchvision's (and UniMatch's) _make_layer
        layers = [Block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [Block(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        """(layer1 output: 256 channels at /4, layer4 output: 2048 channels at /16)."""
        low = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        return low, self.layer4(self.layer3(self.layer2(low)))

class UniMatchASPP(nn.Module):
    """ASPP as UniMatch's: 1x1 branch b0, 3x3 branches b1-b3 at the given rates, image pooling b4, 1x1
    projection to 256 channels, and no dropout (unlike DeepLab v3+'s original 0.5)."""

    def __init__(self, cin=2048, rates=(6, 12, 18), cout=256):
        super().__init__()
        self.b0, self.b1, self.b2, self.b3 = [conv_bn_relu(cin, cout, k, r)
                                              for k, r in zip((1, 3, 3, 3), (1, *rates))]
        self.b4 = nn.Module()  # a bare holder: UniMatch's pooling branch sits at head.b4.gap.*
        # keys b4.gap.1, b4.gap.2
        self.b4.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(cin, cout))
        self.project = conv_bn_relu(5 * cout, cout)

    def forward(self, x):
        pooled = self.b4.gap(x).expand(-1, -1, *x.shape[2:])  # a 1x1 map upsampled is its value everywhere
        return self.project(torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(x), pooled], 1))

class DeepLabV3PlusDeepStem(nn.Module):
    """DeepLab v3+ as UniMatch's DeepLabV3Plus (today's protocol): deep-stem ResNet-101 at output stride 16,
    ASPP 6/12/18 without dropout, a 48-channel layer1 skip, two 3x3 fuse convs, a 1x1 classifier, bilinear
    upsampling with align_corners=True. Same state_dict keys, so a UniMatch checkpoint loads strictly. New
    layers keep PyTorch's default init, as UniMatch's. need_fp drops out the low-level (layer1, /4) and the
    high-level (layer4, /16) features, as UniMatch's: the same outputs given the same torch RNG state."""
    fp_stride = 16

    def __init__(self, num_classes):
        super().__init__()
        self.backbone = DeepStemResNet101()
        self.head = UniMatchASPP()
        self.reduce = conv_bn_relu(256, 48)
        self.fuse = nn.Sequential(*conv_bn_relu(256 + 48, 256, 3), *conv_bn_relu(256, 256, 3))
        self.classifier = nn.Conv2d(256, num_classes, 1)

    def forward(self, x, need_fp=False):
        check_fp_input(self, x, need_fp)
        low, high = self.backbone(x)  # (B, 256, H/4, W/4), (B, 2048, H/16, W/16)
        if need_fp:
            low, high = fp_features(low, high)  # (2B, ...): low's dropout draws first, as UniMatch's
        high = F.interpolate(self.head(high), size=low.shape[2:], mode="bilinear", align_corners=True)
        logits = self.classifier(self.fuse(torch.cat([self.reduce(low), high], 1)))  # (B, K, H/4, W/4)
        return fp_split(F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=True), need_fp)

    def backbone_modules(self):
        return [self.backbone]  # UniMatch's base-lr group; everything else runs at lr x lr_multi

    def load_backbone(self, path):
        """Strictly load UNIMATCH_RESNET101 into the backbone; its ImageNet classifier (fc.*) is
        dropped (UniMatch loads with strict=False, which drops it too, but would also let any wrong
        file through silently)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"--backbone-weights {path}: no such file; download {UNIMATCH_RESNET101}")
        try:  # weights_only: no code from a downloaded file runs
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"--backbone-weights {path} is not a torch file of plain tensors "
                            f"(torch.load with weights_only=True: {type(e).__name__}); "
                            f"expected {UNIMATCH_RESNET101}") from None
        tensors = isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
        wrapped = isinstance(state, dict) and any(isinstance(state.get(k), dict)
                                                  for k in ("student", "teacher", "model", "state_dict"))
        model_keys = tensors and any(k.removeprefix("module.").startswith(("backbone.", "head."))
                                     for k in state)  # a whole network's state_dict
        if wrapped or model_keys:
            raise UserError(f"--backbone-weights {path} is a whole-model checkpoint "
                            f"(segmentation network, not backbone weights); expected {UNIMATCH_RESNET101}")
        if not tensors:
            raise UserError(f"--backbone-weights {path} holds a {type(state).__name__}, "
                            f"not a dict of tensors; expected {UNIMATCH_RESNET101}")
        if getattr(state.get("conv1.weight"), "shape", None) == (64, 3, 7, 7):
            raise UserError(f"--backbone-weights {path} is torchvision's standard-stem ResNet "
                            f"(one 7x7 conv1); this network needs {UNIMATCH_RESNET101}")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        own = self.backbone.state_dict()
        # BN's batch counter is absent from files saved before PyTorch 0.4.1; torch fills it in on loading
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in own]
        wrong = [f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})" for k, v in state.items()
                 if k in own and v.shape != own[k].shape]
        if missing or unexpected or wrong:
            problems = [f"{what}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}" for what, keys in
                        (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
            raise UserError(f"--backbone-weights {path} does not fit the deep-stem ResNet-101 "
                            f"({'; '.join(problems)}); expected {UNIMATCH_RESNET101}")
        self.backbone.load_state_dict(state)  # strict
        return state

class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d with the global batch's statistics across torchrun processes on any device (SyncBatchNorm,
    used on CUDA, needs a GPU); the gradient flows through the other processes' share of them too."""

    def forward(self, x):
        if not (self.training and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_gather  # all_gather with a gradient
        xf = x.float()
        C = x.shape[1]
        local_mean = xf.mean((0, 2, 3))
        local_m2 = (xf - local_mean.view(1, C, 1, 1)).pow(2).sum((0, 2, 3))  # squared deviations, summed
        n = xf.new_full((1,), xf.numel() / C)
        # every process's (mean, squared deviations, count), combined as SyncBatchNorm does (Chan et al.):
        # sums of squares less the squared mean would cancel where a channel is nearly constant (padding)
        with warnings.catch_warnings():  # torch calls it deprecated for a private successor: it stays
            warnings.simplefilter("ignore", FutureWarning)
            stats = torch.stack(all_gather(torch.cat([local_mean, local_m2, n])))  # (processes, 2C + 1)
        counts = stats[:, -1:]
        count = counts.sum()
        mean = (stats[:, :C] * counts).sum(0) / count
        var = (stats[:, C:2 * C].sum(0) + ((stats[:, :C] - mean).pow(2) * counts).sum(0)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked.item()
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * count / (count - 1).clamp(min=1), momentum)
        y = (xf - mean.view(1, C, 1, 1)) * torch.rsqrt(var + self.eps).view(1, C, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, C, 1, 1) + self.bias.view(1, C, 1, 1)
        return y.to(x.dtype)

def sync_batchnorm(net, device):
    """Under torchrun, BatchNorm layers normalise with the global batch's statistics where they train
    (frozen ones stay in eval mode and never communicate)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(net)
    for m in list(net.modules()):
        for child_name, child in list(m.named_children()):
            if type(child) is nn.BatchNorm2d:
                sync = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats).train(child.training)
                sync.load_state_dict(child.state_dict())
                for p, q in zip(sync.parameters(), child.parameters()):
                    p.requires_grad_(q.requires_grad)
                setattr(m, child_name, sync)
    return net
