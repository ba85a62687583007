"""Supervised baseline with a mean teacher: the loop of every train_*.py with no unlabeled data.

    L = CE(f_θ(x_l), y_l)

The teacher g_φ (EMA of the student f_θ, α = 0.99) is what gets evaluated, as in the original, whose
baselines were its semi-supervised program run with consistency weight 0 (REFERENCE §1.1, G2).

Run:   python train_baseline.py --dataset cityscapes --n-labeled 372
Diff:  train_cutmix.py adds its blocks marked `# --- CutMix ---` to this loop (and predicts the labeled
       batch in one pass with the mixed images)
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import common


@dataclass
class Args(common.TrainArgs):
    @staticmethod
    def method_protocol(dataset):
        # The original ran its ISIC baselines with its std-aug program, whose SGD had Nesterov on (G8);
        # it only matters where the dataset selects SGD (ISIC)
        return dict(nesterov=True)


def main(args):
    run = common.Run(args, method="baseline")
    device = common.setup_device(args)
    data = common.load_dataset(args)
    student = common.build_net(args, data.num_classes).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
    teacher = common.make_teacher(student)
    optimizer = common.make_optimizer(student, args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    start = run.start(data, device, student=student, teacher=teacher, optimizer=optimizer, scaler=scaler)
    ema = common.ema_pairs(teacher, student)
    labeled = common.stream(data.train, data.labeled, args, stream_id=0, start=start)

    def batch(images, valid):
        return common.to_device(images, valid, device, data.mean, data.std, channels_last)

    for it in run.iterations():
        # 1. the labeled batch, and the student's supervised loss on it
        images, y_l, valid = next(labeled)
        x_l, _ = batch(images, valid)
        y_l = y_l.to(device, non_blocking=True).long()
        with common.autocast(args, device):
            logits_l = student(x_l)
        loss = loss_sup = F.cross_entropy(logits_l.float(), y_l, ignore_index=common.IGNORE)

        # 6. one backward pass and one optimizer step (under torchrun on the gradients averaged over
        #    processes), then the teacher follows the student by EMA
        scaler.scale(loss).backward()
        common.all_reduce_grads(student)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        common.ema_update(ema, args.teacher_alpha)
        # 7. log; every --eval-every iterations: evaluate the teacher (the student too at the end), checkpoint
        run.end_iteration(it, sup=loss_sup)
    return run.finish()


if __name__ == "__main__":
    main(common.parse_args(Args))
