"""Supervised baseline with a mean teacher: the loop of every train_*.py with no unlabeled data.

    L = CE(f_θ(x_l), y_l)

The teacher g_φ (EMA of the student f_θ, α = 0.99) is what gets evaluated, as in the original, whose
baselines were its semi-supervised program run with consistency weight 0 (the last evaluation is
reported, no early stopping).

Run:   python train_baseline.py --dataset cityscapes --n-labeled 372
Diff:  train_cutmix.py adds its blocks marked `# --- CutMix ---` to this loop (and predicts the labeled
       batch in one pass with the mixed images)
"""
from dataclasses import dataclass

import torch

import common


@dataclass
class Args(common.TrainArgs):
    # the original ran its ISIC baselines with its std-aug program, whose SGD has Nesterov momentum on
    nesterov: bool = common.resolved(True)
    # today's protocol: UniMatch's supervised.py, 16 labeled crops per iteration, its one network reported
    PER_PROTOCOL = {"unimatch": dict(batch_size=16, reported_net="student")}


def main(args):
    run = common.make_run(args, method="baseline", unlabeled=False)
    device = common.setup_device(args)
    data = run.load_data()
    student = common.build_net(args, data.num_classes, device)
    teacher = common.make_teacher(student)
    optimizer = common.make_optimizer(student, args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    run.start(data, device, student, teacher, optimizer, scaler)
    ema = common.ema_pairs(teacher, student)
    labeled = run.stream(data.train, data.labeled, stream_id=0)

    common.set_train_mode(student, args.freeze_bn)
    common.set_train_mode(teacher, args.freeze_bn)
    for it in run.iterations():
        common.set_lr(optimizer, args, it)
        # 1. the labeled batch
        x_l, y_l, _ = common.to_device(next(labeled), device)

        # 4. the student predicts the labeled batch
        with common.autocast(args.amp, device):
            logits_l = student(x_l)
        loss = loss_sup = common.supervised_loss(logits_l, y_l, args.ohem, args.loss_shares)

        # 6. step: one backward pass, gradients averaged over torchrun processes, the teacher follows by EMA
        scaler.scale(loss).backward()
        common.all_reduce_grads(student)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        common.ema_update(ema, args.teacher_alpha)
        # 7. log; every --eval-every iterations evaluate (the teacher; the student too at the end), checkpoint
        run.end_iteration(it, sup=loss_sup)
    return run.finish()


if __name__ == "__main__":
    main(common.parse_args(Args))
