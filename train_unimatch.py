"""UniMatch: FixMatch with two strong views and a feature-perturbed view, as UniMatch's unimatch.py
(UniMatch: Yang et al., CVPR 2023; FixMatch: Sohn et al., NeurIPS 2020).

    L = ( CE(f_θ(x_l), y_l) + λ · (0.25 · L_s1 + 0.25 · L_s2 + 0.5 · L_fp) ) / 2
    L_s = Σ_pixels 1[c ≥ τ] · CE(f_θ(A_s(x)), ŷ) / #(pixels that are not padding),
          for each strong view s1, s2
    L_fp = the same for g(D(h(x_w))): the weak view's features h(x_w) under Dropout2d(0.5) (D),
           then the decoder g

    ŷ, c = argmax and max of softmax(f_θ(x_w)) (detached) on the weak view x_w of each unlabeled crop;
    A_s(x) = its strong view: colour jitter (p 0.8), grayscale (p 0.2), Gaussian blur (p 0.5), then a CutMix
    box (p 0.5) inside which the image, ŷ, c and the padding mask are a mix partner's (its strong view; its
    weak view predicted in eval mode); s1 and s2 are drawn independently, each with its own box. The weak view
    passes once, twice in the decoder (net(x, need_fp=True): clean and feature-perturbed, cutmixseg/nets.py);
    L_fp has no box. τ = 0.95 (Pascal and the default; Cityscapes 0, UniMatch's configs), λ = 1. f_θ is the
    one network: no teacher, the trained model is evaluated and reported (results.json "network": "student").

    The mix partners: today's protocol (--protocol unimatch), UniMatch's second pass over its one unlabeled
    loader, the same images in the same order under independent augmentation draws (so a box holds another
    crop of the same image); the paper's, an independent shuffle, as CutMix's second stream.

Run:   python train_unimatch.py --protocol unimatch --dataset pascal_aug --data-root VOC --n-labeled 92 \
           --backbone-weights pretrained/resnet101.pth
Diff:  train_fixmatch.py plus the blocks marked `# --- UniMatch ---`
       (diff train_fixmatch.py train_unimatch.py)
"""
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

import common
from common import arg


@dataclass
class Args(common.TrainArgs):
    cons_weight: float = arg(1.0, "λ, weight of the unlabeled loss (1 in UniMatch's code)")
    conf_thresh: float = arg(0.95, "τ, weak-view confidence from which a pseudo-label counts "
                                   "(Cityscapes: 0)")

    # --- no options ---
    reported_net: str = common.resolved("student")  # the one network (today's protocol: its best evaluation)
    # UniMatch's configs: 0.95 on Pascal (and here every other dataset), 0 on Cityscapes
    PER_DATASET: ClassVar[dict] = {"cityscapes": dict(conf_thresh=0.0)}


def main(args):
    run = common.make_run(args, method="unimatch")
    device = common.setup_device(args)
    data = run.load_data()
    model = common.build_net(args, data.num_classes, device)  # the one network: trained, evaluated, reported
    # --- UniMatch ---: the dropped features hold the crop
    common.check_fp_crop(model, args.crop_size, args.arch)
    optimizer = common.make_optimizer(model, args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    run.start(data, device, model, None, optimizer, scaler)  # no teacher: the run reports the model itself
    labeled = run.stream(data.train, data.labeled, stream_id=0)
    # --- FixMatch ---: each unlabeled crop's weak and strong views (their draws fixed by the stream position)
    # and the mix partners' (today's protocol: the same images, other draws; the paper's: another shuffle)
    everything = np.arange(len(data.unlabeled))
    today = args.protocol == "unimatch"
    views = common.StrongViewSet(data.unlabeled, args.crop_size, args.aug, n_strong=2)  # --- UniMatch ---
    partner_views = common.StrongViewSet(data.unlabeled, args.crop_size, args.aug, n_strong=2, partner=today)
    unlabeled = run.stream(data.unlabeled, everything, stream_id=1, dataset=views)
    partners = run.stream(data.unlabeled, everything, stream_id=1 if today else 2, dataset=partner_views)
    unlabeled_loss = common.pseudo_label_share(args.conf_thresh)  # (loss, pixels) of some rows, for per_share

    common.set_train_mode(model, args.freeze_bn)
    for it in run.iterations():
        common.set_lr(optimizer, args, it)
        # 1. the labeled batch
        x_l, y_l, _ = common.to_device(next(labeled), device)

        # --- FixMatch ---
        # 2. the model predicts the partners' weak views, in eval mode and without gradients
        images_w_m, images_s1_m, images_s2_m, valid_m, _, _ = next(partners)
        x_w_m, v_m = common.to_device((images_w_m, valid_m), device)  # (B, 3, H, W), (B, 1, H, W)
        x_s1_m, _ = common.to_device((images_s1_m, valid_m), device)
        x_s2_m, _ = common.to_device((images_s2_m, valid_m), device)  # --- UniMatch ---
        with common.inference(model), common.autocast(args.amp, device):
            logits_m = model(x_w_m)
        conf_m, pseudo_m = logits_m.float().softmax(1).max(1)  # (B, H, W) confidence and pseudo-label
        # 3. each strong view gets its partner's strong view inside its box
        images_w, images_s1, images_s2, valid, box1, box2 = next(unlabeled)
        x_w, v = common.to_device((images_w, valid), device)
        x_s1, _ = common.to_device((images_s1, valid), device)
        in_box1 = box1.to(device, non_blocking=True) > 0  # (B, H, W), True = the partner's pixel
        x_s1 = torch.where(in_box1[:, None], x_s1_m, x_s1)
        # --- UniMatch ---: the second strong view, its own box
        x_s2, _ = common.to_device((images_s2, valid), device)
        in_box2 = box2.to(device, non_blocking=True) > 0
        x_s2 = torch.where(in_box2[:, None], x_s2_m, x_s2)
        # 4. the model predicts the labeled batch and the weak views in one pass, then the strong views
        #    --- UniMatch ---: with the weak views' feature-perturbed predictions (the labeled half's unused)
        with common.autocast(args.amp, device):
            logits, logits_fp = model(torch.cat([x_l, x_w]), need_fp=True)
            logits_l, logits_w = logits.split([len(x_l), len(x_w)])
            logits_fp = logits_fp[len(x_l):]
            logits_s1, logits_s2 = model(torch.cat([x_s1, x_s2])).chunk(2)
        loss_sup = common.supervised_loss(logits_l, y_l, args.ohem, args.loss_shares)
        # 5. pseudo-labels from the weak views (detached); inside the box label, confidence and
        #    padding are the partner's; cross-entropy where the confidence reaches τ,
        #    over the pixels that are not padding
        conf_w, pseudo_w = logits_w.detach().float().softmax(1).max(1)
        ignore_w = common.padding_as_ignore(v)  # (B, H, W), 255 = padding
        ignore_m = common.padding_as_ignore(v_m)
        pseudo1 = torch.where(in_box1, pseudo_m, pseudo_w)
        conf1 = torch.where(in_box1, conf_m, conf_w)
        ignore1 = torch.where(in_box1, ignore_m, ignore_w)
        loss_s1 = common.per_share(unlabeled_loss, args.loss_shares, logits_s1, pseudo1, conf1, ignore1)
        # --- UniMatch ---: the second strong view against its own box's labels; the perturbed features
        # against the weak view's own pseudo-labels (no box)
        pseudo2 = torch.where(in_box2, pseudo_m, pseudo_w)
        conf2 = torch.where(in_box2, conf_m, conf_w)
        ignore2 = torch.where(in_box2, ignore_m, ignore_w)
        loss_s2 = common.per_share(unlabeled_loss, args.loss_shares, logits_s2, pseudo2, conf2, ignore2)
        loss_fp = common.per_share(unlabeled_loss, args.loss_shares, logits_fp, pseudo_w, conf_w, ignore_w)
        loss_s = (loss_s1 + loss_s2) / 2  # logged, as UniMatch's loss_s
        loss = (loss_sup + args.cons_weight * (0.25 * loss_s1 + 0.25 * loss_s2 + 0.5 * loss_fp)) / 2
        # logged, as UniMatch's mask ratio
        conf_share = common.confident_share(conf_w, ignore_w, args.conf_thresh)
        # --- end FixMatch ---

        # 6. step: one backward pass, gradients averaged over torchrun processes
        scaler.scale(loss).backward()
        common.all_reduce_grads(model)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        # 7. log; every --eval-every iterations evaluate (the model: there is no teacher), checkpoint
        run.end_iteration(it, sup=loss_sup, cons=loss_s, fp=loss_fp, conf=conf_share)
    return run.finish()


if __name__ == "__main__":
    main(common.parse_args(Args))
