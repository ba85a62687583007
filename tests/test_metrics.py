"""Known values: confusion matrix, IoU, mIoU (pooled over the set; a class absent from truth and prediction
counts 0, as the original's evaluation.py)."""
import torch

import common


def test_confusion_matrix_counts_and_ignores_255():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    conf = common.confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert conf.sum() == 6  # the two ignored pixels are not counted


def test_iou_and_miou_on_hand_made_confusion():
    conf = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    iou = common.iou_from_confusion(conf)
    # rows = truth, columns = prediction; U_c = row_c + column_c - I_c
    # class 0: I=1, U=2+2-1=3; class 1: I=2, U=2+3-2=3; class 2: I=1, U=2+1-1=2
    assert torch.allclose(iou, torch.tensor([1 / 3, 2 / 3, 1 / 2], dtype=torch.float64))
    assert abs(iou.mean().item() - (1 / 3 + 2 / 3 + 1 / 2) / 3) < 1e-12


def test_absent_class_counts_zero_in_the_mean():
    conf = torch.tensor([[3, 0, 0], [0, 1, 0], [0, 0, 0]])  # class 2 neither predicted nor present
    iou = common.iou_from_confusion(conf)
    assert iou.tolist() == [1.0, 1.0, 0.0]
    assert abs(iou.mean().item() - 2 / 3) < 1e-12


def test_evaluate_pools_over_images_of_different_sizes():
    class Oracle(torch.nn.Module):  # predicts class 1 everywhere
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 2, *x.shape[2:])
            logits[:, 1] = 1
            return logits

    import numpy as np

    labels = [np.ones((4, 5), np.uint8), np.zeros((3, 3), np.uint8)]
    labels[1][0, 0] = 255
    split = common.Split(["a", "b"], lambda i: (np.zeros(labels[i].shape + (3,), np.uint8), labels[i]),
                         [l.shape for l in labels])
    miou, per_class, conf = common.evaluate(Oracle(), common.val_loader(split, batch_size=2), torch.device("cpu"),
                                            num_classes=2)
    # class 1: I = 20, U = 20 + 8 -> 20/28; class 0: I = 0, U = 8 -> 0
    assert conf.tolist() == [[0, 8], [0, 20]]
    assert abs(per_class[1] - 100 * 20 / 28) < 1e-9 and per_class[0] == 0
    assert abs(miou - 50 * 20 / 28) < 1e-9
