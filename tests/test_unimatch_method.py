"""UniMatch (train_unimatch.py): every network's feature perturbation (need_fp), deeplabv3plus_deepstem's against a
hand re-implementation of UniMatch's forward; one step on tiny data under both protocols; an exact resume; a crop
too small for the perturbed features; the diff from train_fixmatch.py."""
import difflib
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from conftest import ROOT, refused
from cutmixseg import nets
from test_fixmatch import TINY, one_step
from test_unimatch_protocol import UNIMATCH, split_file

NETS = {"unet_small": (nets.UNetSmall, 16), "deeplabv2": (nets.DeepLabV2, 33),
        "deeplabv3plus": (nets.DeepLabV3Plus, 33), "pspnet101": (nets.PSPNet101, 33),
        "denseunet161": (nets.DenseUNet161, 64), "deeplabv3plus_deepstem": (nets.DeepLabV3PlusDeepStem, 33)}


@pytest.mark.parametrize("arch", NETS)
def test_need_fp_returns_the_clean_output_and_a_perturbed_one(arch):
    """(out, out_fp): out is the plain forward's output (eval mode: no batch statistics join the two halves);
    out_fp differs, and is the same again from the same global torch RNG state."""
    cls, size = NETS[arch]
    torch.manual_seed(0)
    net = cls(3).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.manual_seed(1)
        out, out_fp = net(x, need_fp=True)
        torch.manual_seed(1)
        again = net(x, need_fp=True)[1]
        plain = net(x)
    assert out.shape == out_fp.shape == (2, 3, size, size)
    assert torch.allclose(out, plain, atol=1e-5) and torch.equal(out_fp, again)
    assert (out_fp - out).abs().max() > 1e-3 * out.abs().max()  # DeepLab v2 starts with tiny outputs
    assert "need_fp drops out" in " ".join(cls.__doc__.split())  # the docstring names the perturbed features


def unimatch_forward(net, x):
    """UniMatch's DeepLabV3Plus.forward(x, need_fp=True), written out by hand from its model/semseg/deeplabv3plus.py
    on the kit's modules: ASPP with its pooled branch upsampled by interpolation, nn.Dropout2d(0.5) made inside the
    forward (in train mode, whatever the net's), low-level features first."""
    h, w = x.shape[-2:]
    c1, c4 = net.backbone(x)

    def aspp(f):
        head = net.head
        pool = F.interpolate(head.b4.gap(f), f.shape[-2:], mode="bilinear", align_corners=True)
        return head.project(torch.cat((head.b0(f), head.b1(f), head.b2(f), head.b3(f), pool), 1))

    def decode(c1, c4):
        c4 = F.interpolate(aspp(c4), size=c1.shape[-2:], mode="bilinear", align_corners=True)
        return net.classifier(net.fuse(torch.cat([net.reduce(c1), c4], 1)))

    outs = decode(torch.cat((c1, nn.Dropout2d(0.5)(c1))), torch.cat((c4, nn.Dropout2d(0.5)(c4))))
    return F.interpolate(outs, size=(h, w), mode="bilinear", align_corners=True).chunk(2)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_deepstem_need_fp_equals_unimatchs_forward(mode):
    torch.manual_seed(0)
    net = nets.DeepLabV3PlusDeepStem(5).train(mode == "train")
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        torch.manual_seed(7)
        ours = net(x, need_fp=True)
        after = torch.get_rng_state()
        torch.manual_seed(7)
        theirs = unimatch_forward(net, x)
    assert torch.equal(after, torch.get_rng_state())  # the same draws, in the same order
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_a_crop_too_small_for_the_perturbed_features_is_one_line():
    with pytest.raises(common.UserError) as error:
        nets.DeepLabV3PlusDeepStem(3)(torch.randn(2, 3, 12, 40), need_fp=True)
    assert str(error.value) == ("need_fp: a 12x40 input is smaller than the 16-pixel stride of the features that "
                                "DeepLabV3PlusDeepStem drops out; give crops of at least 16 pixels a side")
    assert refused("train_unimatch.py", *TINY, "--crop-size", "6,32") == (
        "error: --crop-size 6,32: unet_small's feature perturbation drops out features at 1/8 of the crop; give a "
        "crop of at least 8 pixels a side")


def test_one_step_under_the_papers_protocol(tmp_path):
    results = one_step("train_unimatch.py", tmp_path, "--crop-size", 32)
    assert results["method"] == "unimatch"
    logged = [line for line in (tmp_path / "run" / "log.txt").read_text().splitlines() if line.startswith("it 1/")]
    assert "| fp " in logged[0] and "| cons " in logged[0]


def test_one_step_under_todays_protocol(official, tmp_path):
    root = official["cityscapes"]
    chosen = split_file(tmp_path / "labeled.txt", common.cityscapes_full_dataset(root)[0].names[:2])
    one_step("train_unimatch.py", tmp_path, *UNIMATCH, "--dataset", "cityscapes", "--data-root", root,
             "--split-file", chosen, "--crop-size", 40, "--cache-dir", tmp_path / "cache")


def test_the_diff_from_fixmatch_is_unimatchs_additions():
    """Below the docstrings, train_unimatch.py is train_fixmatch.py with a few dozen lines added or changed, its
    blocks marked `# --- UniMatch ---`."""
    fixmatch, unimatch = ((ROOT / f"train_{m}.py").read_text().split('"""', 2)[2].splitlines()
                          for m in ("fixmatch", "unimatch"))
    added = [line for line in difflib.unified_diff(fixmatch, unimatch, n=0, lineterm="")
             if line.startswith("+") and not line.startswith("+++")]
    assert sum("--- UniMatch ---" in line for line in added) >= 5
    assert len(added) < 40  # the additions fit on a screen


def test_summary_puts_a_run_without_teacher_beside_unimatchs_published_row(tmp_path):
    """Under today's protocol a FixMatch or UniMatch run scores its one network: a student row, no teacher row;
    UniMatch's README numbers stand beside its own method's row."""
    from tools import paper
    folder = tmp_path / "run"
    folder.mkdir()
    results = dict(miou=70.0, best_miou=71.0, best_student_miou=71.0, network="student", dataset="pascal_aug",
                   arch="deeplabv3plus_deepstem", method="unimatch", n_labeled=92)
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "args.json").write_text(json.dumps(dict(protocol="unimatch", dataset="pascal_aug", crop_size=[321, 321])))
    arch = f"deeplabv3plus_deepstem, {paper.TODAY}"
    assert paper.collect_results([folder / "results.json"]) == {("pascal_aug", arch, "unimatch, student", 92): [71.0]}
    assert paper.paper_value("pascal_aug", arch, "unimatch, student", 92) == "75.2"
    assert paper.paper_value("cityscapes", arch, "unimatch, student", 186) == "76.6"
