"""ICT's mixing: Beta(α, α) weights per image, one weight for images, probabilities and confidences."""
import math

import numpy as np
import torch

import common
import train_ict as I


def test_mixing_weights_follow_beta_alpha_alpha():
    lam = I.mixing_weights(40000, 0.1, np.random.default_rng(0))
    assert lam.shape == (40000, 1, 1, 1) and lam.dtype == torch.float32
    assert 0 <= lam.min() and lam.max() <= 1
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); for a = 0.1 most weights lie near 0 or 1
    assert abs(lam.mean().item() - 0.5) < 0.01
    assert abs(lam.var().item() - 1 / (4 * 1.2)) < 0.005
    assert ((lam < 0.1) | (lam > 0.9)).float().mean() > 0.6
    uniform = I.mixing_weights(40000, 1.0, np.random.default_rng(1))  # Beta(1, 1) = U(0, 1)
    assert abs(uniform.var().item() - 1 / 12) < 0.003


def test_weights_depend_only_on_seed_and_iteration():
    # the loop draws with default_rng([seed, MIX_STREAM, it]): a resumed run gets the same weights
    draw = lambda seed, it: I.mixing_weights(8, 0.1, np.random.default_rng([seed, I.MIX_STREAM, it]))
    assert torch.equal(draw(1, 5), draw(1, 5))
    assert not torch.equal(draw(1, 5), draw(1, 6)) and not torch.equal(draw(1, 5), draw(2, 5))


def test_mix_known_values():
    a, b = torch.zeros(3, 2, 4, 4), torch.ones(3, 2, 4, 4)
    lam = torch.tensor([0.0, 0.25, 1.0]).view(3, 1, 1, 1)
    mixed = I.ict_mix(a, b, lam)
    assert torch.equal(mixed[0], a[0]) and torch.equal(mixed[2], b[2]) and torch.allclose(mixed[1], b[1] * 0.25)
    assert torch.equal(I.ict_mix(a + 3, a + 3, lam), a + 3)  # mixing an image with itself changes nothing


def test_confidence_mixes_the_confidences_not_the_probabilities():
    # two confident teachers that disagree, mixed half and half: the mixed probabilities are flat
    # (max 0.5), but the mixed confidence is 1, so the pixel counts as confident (the original's ICT program
    # mixes the confidences)
    p_0 = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    p_1 = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    lam = torch.full((1, 1, 1, 1), 0.5)
    p_teacher = I.ict_mix(p_0, p_1, lam)
    conf_teacher = I.ict_mix(p_0.amax(1, keepdim=True), p_1.amax(1, keepdim=True), lam)
    assert p_teacher.amax().item() == 0.5 and conf_teacher.item() == 1.0
    p_student = torch.tensor([0.8, 0.2]).view(1, 2, 1, 1)
    loss, conf = I.consistency_loss(p_student, p_teacher, conf_teacher, torch.ones(1, 1, 1, 1), 0.97)
    assert conf.item() == 1.0 and math.isclose(loss.item(), 0.3 ** 2 * 2, rel_tol=1e-6)


def test_soft_valid_mask_weights_the_loss():
    p_s, p_t = torch.tensor([0.8, 0.2]).view(1, 2, 1, 1), torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    loss, _ = I.consistency_loss(p_s, p_t, torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 0.25), 0.97)
    assert math.isclose(loss.item(), 0.25 * (0.2 ** 2 * 2), rel_tol=1e-6)


def test_defaults_per_dataset_are_the_bmvc_ones():
    for dataset, weight in (("pascal_aug", 0.01), ("isic2017", 0.0003), ("cityscapes", 0.01), ("demo", 0.01)):
        args = common.parse_args(I.Args, ["--dataset", dataset])
        assert (args.cons_weight, args.nesterov) == (weight, True)
    assert common.parse_args(I.Args, ["--dataset", "isic2017", "--cons-weight", "0.5"]).cons_weight == 0.5
    args = common.parse_args(I.Args, ["--dataset", "pascal_aug", "--ict-alpha", "0.5"])
    assert args.cons_weight == 0.01 and args.ict_alpha == 0.5 and args.optimizer == "adam"
