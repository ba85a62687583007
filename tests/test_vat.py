"""VAT's perturbation: the adaptive radius, the direction's norm, and that the direction is adversarial."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import train_vat as V


def tiny_net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 4, 3, padding=1)).double().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def kl_per_image(net, x, p, r):
    with torch.no_grad():
        return F.kl_div(F.log_softmax(net(x + r), 1), p, reduction="none").flatten(1).sum(1)


def test_adaptive_radius_of_ramps():
    # x = a·column + b·row: central differences are 2a and 2b everywhere
    C, H, W, a, b = 3, 10, 14, 0.3, -0.7
    rows, cols = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64),
                                indexing="ij")
    x = (a * cols + b * rows).expand(2, C, H, W)
    expected = 0.5 * math.sqrt(C * H * (W - 2) * (2 * a) ** 2 + C * (H - 2) * W * (2 * b) ** 2)
    assert torch.allclose(V.adaptive_radius(x), torch.full((2, 1, 1, 1), expected, dtype=torch.float64))
    assert V.adaptive_radius(torch.ones(1, 3, 5, 5)).item() == 0  # a flat image gets no perturbation


def test_perturbation_norm_is_the_radius_per_image():
    net = tiny_net()
    x = torch.randn(3, 3, 12, 16, dtype=torch.float64)
    x[1] *= 3  # a higher-contrast image gets a larger radius
    with torch.no_grad():
        p = net(x).softmax(1)
    g = torch.Generator().manual_seed(0)
    r = V.vat_perturbation(net, x, p, 1.0, True, torch.randn(x.shape, generator=g, dtype=x.dtype))
    assert r.shape == x.shape and not r.requires_grad
    # rtol: the gradient here is a few 1e-9 in norm, so the 1e-12 guarding its normalisation shows at 1e-4
    assert torch.allclose(r.flatten(1).norm(dim=1), V.adaptive_radius(x).flatten(), rtol=1e-3)
    fixed = V.vat_perturbation(net, x, p, 0.5, False, torch.randn(x.shape, generator=g, dtype=x.dtype))
    assert torch.allclose(fixed.flatten(1).norm(dim=1), torch.full((3,), 0.5 * math.sqrt(3 * 12 * 16),
                                                                   dtype=torch.float64), rtol=1e-3)
    assert all(q.grad is None for q in net.parameters())


def test_adversarial_direction_raises_the_divergence_more_than_random_directions():
    # float64: the probe d has norm ξ = 1e-6·H·W/1000 (~1e-9 per input here), below float32 resolution
    net = tiny_net(1)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        p = net(x).softmax(1)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    r_adv = V.vat_perturbation(net, x, p, 0.05, False, noise)
    radius = r_adv.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    adversarial = kl_per_image(net, x, p, r_adv)
    g = torch.Generator().manual_seed(2)
    random = torch.stack([kl_per_image(net, x, p, radius * V.unit_per_image(
        torch.randn(x.shape, generator=g, dtype=x.dtype))) for _ in range(30)])  # (30, 4)
    assert torch.all(adversarial > random.max(0).values)
    assert torch.all(adversarial > 3 * random.mean(0))


def test_kl_consistency_known_value_and_masking():
    p_t = torch.tensor([[[[0.98, 0.6]], [[0.02, 0.4]]]])  # pixel 0 confident, pixel 1 not
    logits_s = torch.zeros(1, 2, 1, 2)  # uniform student
    mask = torch.tensor([[[[1.0, 1.0]]]])
    loss, conf = V.consistency_loss(logits_s, p_t, mask, 0.97)
    kl = [sum(q * math.log(q / 0.5) for q in pair) for pair in ((0.98, 0.02), (0.6, 0.4))]
    assert conf.item() == 0.5 and math.isclose(loss.item(), 0.5 * sum(kl) / 2, rel_tol=1e-5)
    loss_masked, _ = V.consistency_loss(logits_s, p_t, torch.tensor([[[[1.0, 0.0]]]]), 0.97)
    assert math.isclose(loss_masked.item(), 0.5 * kl[0] / 2, rel_tol=1e-5)


def test_direction_runs_in_full_fp32_under_autocast():
    net = nn.Conv2d(3, 2, 1)
    x = torch.randn(1, 3, 4, 4)
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x).dtype == torch.bfloat16
        with V.exact_fp32(torch.device("cpu")):
            assert net(x).dtype == torch.float32
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before  # restored


def test_defaults_per_dataset_are_the_bmvc_ones():
    for dataset, weight in (("pascal_aug", 0.1), ("isic2017", 0.001), ("cityscapes", 0.1), ("folder", 0.1)):
        args = common.parse_args(V.Args, ["--dataset", dataset])
        assert (args.cons_weight, args.nesterov) == (weight, True)
    assert common.parse_args(V.Args, ["--dataset", "isic2017", "--cons-weight", "0.1"]).cons_weight == 0.1
    args = common.parse_args(V.Args, ["--dataset", "isic2017"])
    assert args.cons_weight == 0.001 and args.nesterov and args.vat_radius == 1.0 and not args.vat_fixed_radius
