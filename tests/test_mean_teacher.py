"""Known values of the mean teacher's parts: EMA, the original's optimizer, the supervised loss (CutMix's own
parts: tests/test_cutmix.py)."""
import pytest
import torch

import common


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_ema_alpha_zero_copies_the_student_bn_buffers_too():
    student = Tiny()
    teacher = common.make_teacher(student)
    student.train()(torch.randn(8, 3, 5, 5))  # moves the student's BN running statistics
    with torch.no_grad():
        student.conv.weight.add_(1.0)
    common.ema_update(common.ema_pairs(teacher, student), 0.0)
    for (k, t), s in zip(teacher.state_dict().items(), student.state_dict().values()):
        if t.is_floating_point():
            assert torch.equal(t, s), k
    assert not any(p.requires_grad for p in teacher.parameters())


def test_ema_k_steps_closed_form_and_integer_buffers_untouched():
    student = Tiny()
    teacher = common.make_teacher(student)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        student.conv.weight.mul_(3.0)
        student.bn.running_var.fill_(4.0)
        student.bn.num_batches_tracked.fill_(7)
    pairs = common.ema_pairs(teacher, student)
    for _ in range(5):
        common.ema_update(pairs, 0.99)
    s = student.state_dict()
    for key in ("conv.weight", "bn.running_var"):
        expected = s[key] + 0.99 ** 5 * (t0[key] - s[key])
        assert torch.allclose(teacher.state_dict()[key], expected, atol=1e-6), key
    assert teacher.state_dict()["bn.num_batches_tracked"].item() == 0


def test_repeat_adam_equals_pytorch_adam_with_duplicated_parameters():
    torch.manual_seed(0)
    w1, w2 = torch.randn(5), torch.randn(3)
    grads = [(torch.randn(5), torch.randn(3)) for _ in range(4)]

    def run(make):
        a, b = torch.nn.Parameter(w1.clone()), torch.nn.Parameter(w2.clone())
        opt = make(a, b)
        for ga, gb in grads:
            a.grad, b.grad = ga.clone(), gb.clone()
            opt.step()
        return a.detach(), b.detach()

    with pytest.warns(UserWarning, match="duplicate"):
        ref = run(lambda a, b: torch.optim.Adam([{"params": [a, a, a, b], "lr": 0.1}], foreach=False))
    ours = run(lambda a, b: common.RepeatAdam([{"params": [a], "repeat": 3, "lr": 0.1},
                                               {"params": [b], "repeat": 1, "lr": 0.1}]))
    assert torch.allclose(ref[0], ours[0], atol=1e-6) and torch.allclose(ref[1], ours[1], atol=1e-6)


def test_supervised_loss_is_todays_mean_and_zero_on_a_batch_without_labels():
    import torch.nn.functional as F
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    labels = torch.randint(0, 3, (2, 8, 8))
    labels[0, :4] = 255
    loss = common.supervised_loss(logits, labels)
    want = F.cross_entropy(logits, labels, ignore_index=255)
    assert torch.equal(loss, want)  # bit for bit: runs with labeled pixels do not move
    grad, = torch.autograd.grad(loss, logits)
    assert torch.equal(grad, torch.autograd.grad(want, logits)[0])
    none = torch.full_like(labels, 255)
    loss = common.supervised_loss(logits, none)
    grad, = torch.autograd.grad(loss, logits)
    assert loss.item() == 0 and torch.equal(grad, torch.zeros_like(grad))
