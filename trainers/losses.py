"""Loss functions of the methods: pure tensor math, no process or device handling, no host syncs.

Shapes: logits (B, C, H, W); labels, pseudo-labels, confidences, ignore masks and boxes (B, H, W).
An unlabeled ignore mask holds `ignore_index` (255) where the crop was padded, 0 elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ce(pred: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean cross entropy over the pixels whose target is not `ignore_index`."""
    return F.cross_entropy(pred, target, ignore_index=ignore_index)


def ohem_ce(
    pred: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    thresh: float = 0.7,
    min_kept: int = 200_000,
) -> torch.Tensor:
    """UniMatch's ProbOhemCrossEntropy2d: mean CE over the hard pixels (low target-class probability).

    Fewer than `min_kept` valid pixels: all are kept. Otherwise the pixels whose probability is
    <= max(thresh, the min_kept-th smallest probability) are kept.
    """
    valid = target != ignore_index
    if min_kept <= 0 or min_kept > valid.numel():
        # The reference skips selection when min_kept is 0; more than numel can never be valid.
        return ce(pred, target, ignore_index)
    prob = pred.detach().softmax(dim=1)
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    target_prob = prob.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    # Invalid pixels count as certain (probability 1), as in the reference, so they sort last.
    target_prob = torch.where(valid, target_prob, torch.ones_like(target_prob))
    kth = target_prob.flatten().kthvalue(min_kept).values
    threshold = torch.clamp_min(kth, thresh)
    few_valid = valid.sum() < min_kept
    kept = valid & (few_valid | (target_prob <= threshold))
    return ce(pred, torch.where(kept, target, torch.full_like(target, ignore_index)), ignore_index)


def masked_ce(
    pred: torch.Tensor,
    pseudo: torch.Tensor,
    conf: torch.Tensor,
    ignore: torch.Tensor,
    conf_thresh: float,
    ignore_index: int,
) -> torch.Tensor:
    """CE against pseudo-labels where conf >= conf_thresh and the pixel is not padding.

    Summed and divided by the number of non-padding pixels (not by the kept count), as published.
    """
    valid = ignore != ignore_index
    kept = (conf >= conf_thresh) & valid
    per_pixel = F.cross_entropy(pred, pseudo, reduction="none")
    return (per_pixel * kept).sum() / valid.sum().clamp_min(1)


def mask_ratio(
    conf: torch.Tensor, ignore: torch.Tensor, conf_thresh: float, ignore_index: int
) -> torch.Tensor:
    """Share of non-padding pixels whose confidence reaches the threshold."""
    valid = ignore != ignore_index
    kept = (conf >= conf_thresh) & valid
    return kept.sum() / valid.sum().clamp_min(1)


def l1_consistency(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of two logit tensors of the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"l1_consistency: expected equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (a - b).abs().mean()


def pseudo_labels(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax confidence and argmax label of detached logits: (conf, label), each (B, H, W)."""
    conf, label = logits.detach().softmax(dim=1).max(dim=1)
    return conf, label


def cutmix_targets(
    pseudo: torch.Tensor,
    conf: torch.Tensor,
    ignore: torch.Tensor,
    box: torch.Tensor,
    mix_pseudo: torch.Tensor,
    mix_conf: torch.Tensor,
    mix_ignore: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """New (pseudo, conf, ignore) with u′'s values inside the CutMix box (box == 1)."""
    inside = box == 1
    return (
        torch.where(inside, mix_pseudo, pseudo),
        torch.where(inside, mix_conf, conf),
        torch.where(inside, mix_ignore, ignore),
    )


def paste(images: torch.Tensor, mix_images: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """New strong images with u′'s pixels inside the CutMix box (box == 1), all channels."""
    return torch.where((box == 1).unsqueeze(1), mix_images, images)
