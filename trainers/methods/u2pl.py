"""U2PL (Wang et al., CVPR 2022): reliable pseudo-labels for CE, unreliable pixels as contrastive negatives.

A mean teacher pseudo-labels the weak view; the student learns a CutMix of it on the reliable
(low-entropy) pixels, and a representation head is pulled towards class prototypes and away from
per-class memory queues of negative features drawn from unreliable pixels.
Source read: Haochen-Wang409/U2PL, train_semi.py and u2pl/utils/loss_helper.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from trainers import dist, losses
from trainers.batch import LabeledBatch, UnlabeledBatch, ViewSpec
from trainers.config import ConfigError, MethodConfig, at_least, choice, positive, within
from trainers.methods.base import Method, StepOutput
from trainers.methods.common import Criterion, build_criterion, detached
from trainers.methods.ema import Clock, EMATeacher, ema_update, student_network, warmup_decay
from trainers.methods.projection import RepresentationHead, classify, fused, fused_channels
from trainers.model import upsample


def entropy(prob: torch.Tensor) -> torch.Tensor:
    """Per-pixel entropy −Σ p·log(p + 1e-10) of class probabilities (B, C, H, W) -> (B, H, W)."""
    return -(prob * torch.log(prob + 1e-10)).sum(dim=1)


def percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """NumPy's default (linear) percentile of a 1-D tensor, q in [0, 100]."""
    if values.numel() == 0:
        raise ValueError("percentile: no values (every pixel is padding)")
    ordered = values.flatten().sort().values
    position = q / 100 * (ordered.numel() - 1)
    low = int(position)
    high = min(low + 1, ordered.numel() - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def unreliable_percent(alpha_0: float, epoch: int, epochs: int) -> float:
    """The paper's α_t = α_0·(1 − epoch/epochs): the share (%) of pixels treated as unreliable."""
    return alpha_0 * (1 - epoch / epochs)


def entropy_partition(
    ent: torch.Tensor, valid: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(reliable, unreliable) masks: valid pixels with entropy ≤ the α-th / ≥ the (100 − α)-th percentile."""
    values = ent[valid]
    return (ent <= percentile(values, alpha)) & valid, (ent >= percentile(values, 100 - alpha)) & valid


def reliable_ce(
    pred: torch.Tensor, label: torch.Tensor, ent: torch.Tensor, valid: torch.Tensor, keep_percent: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """U2PL's unsupervised loss and kept mask: CE on valid pixels below the keep_percent-th entropy.

    As published, the mean CE over kept pixels is scaled by all pixels / kept pixels.
    """
    kept = (ent < percentile(ent[valid], keep_percent)) & valid
    count = kept.sum().clamp_min(1)
    per_pixel = F.cross_entropy(pred, label, reduction="none")
    return kept.numel() / count * (per_pixel * kept).sum() / count, kept


def u2pl_box(height: int, width: int) -> torch.Tensor:
    """U2PL's CutMix box: half the image area, width U{W/2+1, …, W−1}, anywhere inside; 1 inside."""
    box_w = random.randint(width // 2 + 1, width - 1)
    box_h = min(round(height * width / 2 / box_w), height)
    top, left = random.randint(0, height - box_h), random.randint(0, width - box_w)
    out = torch.zeros(height, width, dtype=torch.int64)
    out[top : top + box_h, left : left + box_w] = 1
    return out


def class_ranks(prob: torch.Tensor) -> torch.Tensor:
    """Rank of every class at every pixel, 0 = most probable: (B, C, h, w) int64."""
    return prob.argsort(dim=1, descending=True).argsort(dim=1)


def negative_masks(
    prob: torch.Tensor,
    label: torch.Tensor,
    unreliable: torch.Tensor,
    num_labeled: int,
    low_rank: int,
    high_rank: int,
) -> torch.Tensor:
    """(B, C, h, w) negatives of each class c, the paper's rule (Sec. 3.3).

    Labeled pixel: valid, label ≠ c, c among the `low_rank` most probable classes.
    Unlabeled pixel: unreliable, c ranked in [low_rank, high_rank).
    `unreliable` holds the valid mask for labeled images (as published).
    """
    rank = class_ranks(prob)
    classes = torch.arange(prob.shape[1], device=prob.device).view(1, -1, 1, 1)
    labeled = torch.arange(prob.shape[0], device=prob.device).view(-1, 1, 1, 1) < num_labeled
    rule_l = (label.unsqueeze(1) != classes) & (rank < low_rank)
    rule_u = (rank >= low_rank) & (rank < high_rank)
    return unreliable.unsqueeze(1) & torch.where(labeled, rule_l, rule_u)


class MemoryQueues:
    """One FIFO queue of (n, dim) negative features per class, keeping the newest `sizes[c]`.

    Under DDP every process pushes every process's keys (rank order), so the queues stay equal.
    """

    def __init__(self, sizes: list[int], dim: int, device: torch.device) -> None:
        self.sizes = sizes
        self.keys = [torch.zeros(0, dim, device=device) for _ in sizes]

    def push(self, c: int, keys: torch.Tensor) -> None:
        """Append every process's `keys` to class c's queue and drop the oldest beyond its size.

        Every process must push every class, in the same order: the keys are all-gathered as
        published (u2pl/utils/utils.py:28-33).
        """
        size = self.sizes[c]
        # No more than the newest `size` of one process's keys can survive the trim: send no more.
        gathered = dist.all_gather_cat(keys.detach()[-size:])
        self.keys[c] = torch.cat([self.keys[c], gathered])[-size:]


@dataclass(frozen=True)
class Contrast:
    """The contrastive loss's hyperparameters (U2PL's `contrastive` config block; `method.contrast`)."""

    anchor_thresh: float = 0.3
    """δ_p: an anchor's teacher probability of its class must exceed this."""
    low_rank: int = 3
    """Negatives of a labeled pixel are the classes ranked in [low_rank, high_rank) by the teacher."""
    high_rank: int = 20
    num_queries: int = 256
    """Anchors sampled per class."""
    num_negatives: int = 50
    """Negatives per anchor."""
    temperature: float = 0.5

    def __post_init__(self) -> None:
        within(self, "method.contrast", 0.0, 1.0, "anchor_thresh")
        positive(self, "method.contrast", "low_rank", "num_queries", "num_negatives", "temperature")
        if self.high_rank <= self.low_rank:
            raise ConfigError(
                f"method.contrast.high_rank: expected > low_rank ({self.low_rank}), got {self.high_rank}"
            )


def contrastive_loss(
    rep: torch.Tensor,
    rep_t: torch.Tensor,
    prob_t: torch.Tensor,
    label: torch.Tensor,
    reliable: torch.Tensor,
    unreliable: torch.Tensor,
    num_labeled: int,
    queues: MemoryQueues,
    cfg: Contrast,
    ignore_index: int,
) -> torch.Tensor:
    """U2PL's InfoNCE on the representation head; enqueues this batch's negatives first.

    Shapes at feature resolution: rep/rep_t (B, D, h, w), prob_t (B, C, h, w), label and the
    masks (B, h, w). Per class c with reliable pixels: `num_queries` anchors (reliable, label c,
    p_t(c) > δ_p) against the mean teacher feature of those pixels and `num_negatives` keys each
    from c's queue; averaged over those classes. Fewer than two such classes: zero.
    Under DDP, as published (train_semi.py:514-519): the mean over processes, whose gradient is
    this process's own / world size.
    """
    classes = torch.arange(prob_t.shape[1], device=rep.device).view(1, -1, 1, 1)
    is_class = (label.unsqueeze(1) == classes) & (label.unsqueeze(1) != ignore_index)
    positive = is_class & reliable.unsqueeze(1)
    anchor = positive & (prob_t > cfg.anchor_thresh)
    negative = negative_masks(prob_t, label, unreliable, num_labeled, cfg.low_rank, cfg.high_rank)
    feats, feats_t = rep.permute(0, 2, 3, 1), rep_t.detach().permute(0, 2, 3, 1)
    for c in range(prob_t.shape[1]):
        queues.push(c, feats_t[negative[:, c]])
    # A collective: every process reduces, also one whose loss is zero (fewer than two classes).
    return dist.all_reduce_mean_own_grad(_class_infonce(feats, feats_t, positive, anchor, queues, cfg))


def _class_infonce(
    feats: torch.Tensor,
    feats_t: torch.Tensor,
    positive: torch.Tensor,
    anchor: torch.Tensor,
    queues: MemoryQueues,
    cfg: Contrast,
) -> torch.Tensor:
    """This process's contrastive loss: the mean InfoNCE over the classes with positives (B, C, h, w)."""
    present = [c for c in range(positive.shape[1]) if positive[:, c].any()]
    zero, device = 0.0 * feats.sum(), feats.device
    if len(present) <= 1:
        return zero
    total = zero
    for c in present:
        anchors, keys = feats[anchor[:, c]], queues.keys[c]
        if len(anchors) == 0 or len(keys) == 0:
            continue
        query = anchors[torch.randint(len(anchors), (cfg.num_queries,), device=device)]
        negatives = keys[torch.randint(len(keys), (cfg.num_queries * cfg.num_negatives,), device=device)]
        prototype = feats_t[positive[:, c]].mean(dim=0)
        candidates = torch.cat(
            [
                prototype.expand(cfg.num_queries, 1, -1),
                negatives.view(cfg.num_queries, cfg.num_negatives, -1),
            ],
            dim=1,
        )
        logits = F.cosine_similarity(query.unsqueeze(1), candidates, dim=2) / cfg.temperature
        total = total + F.cross_entropy(logits, torch.zeros(cfg.num_queries, dtype=torch.long, device=device))
    return total / len(present)


def downsample(mask: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Nearest-neighbour resize of a (B, H, W) integer or boolean map to `size`."""
    out = F.interpolate(mask.unsqueeze(1).float(), size=tuple(size), mode="nearest").squeeze(1)
    return out.bool() if mask.dtype == torch.bool else out.long()


@dataclass(frozen=True)
class U2PLSettings:
    """U2PL's own `method:` keys; defaults from experiments/pascal/*/ours/config.yaml."""

    sup_only_epochs: int = 1
    """Epochs of labeled-only training before the teacher takes the student's weights (U2PL's default)."""
    ema_decay: float = 0.99
    drop_percent: float = 80.0
    """At epoch 0 the CE keeps the drop_percent % lowest-entropy pixels; the rest decays to 0."""
    alpha_0: float = 20.0
    """`low_entropy_threshold`: α_0 (%) of pixels are reliable anchors / unreliable negatives at epoch 0."""
    cutmix_p: float = 0.5
    weight_u: float = 1.0
    weight_contrast: float = 1.0
    rep_dim: int = 256
    queue_size: int = 30_000
    background_queue_size: int = 50_000
    """Class 0's queue, as published."""
    contrast: Contrast = field(default_factory=Contrast)
    evaluate: str = "teacher"
    """The network validated and kept as best.pth: "teacher", the EMA teacher once the labeled-only epochs
    are over (the student during them), as published (train_semi.py:205-208); "student", the protocol's."""

    def __post_init__(self) -> None:
        choice("method.evaluate", self.evaluate, dict.fromkeys(("teacher", "student")))
        at_least(self, "method", 0, "sup_only_epochs", "weight_u", "weight_contrast")
        within(self, "method", 0.0, 1.0, "ema_decay", "cutmix_p")
        within(self, "method", 0.0, 100.0, "drop_percent", "alpha_0")
        positive(self, "method", "rep_dim", "queue_size", "background_queue_size")


@dataclass
class U2PL(Method):
    criterion_l: Criterion
    ignore_index: int
    settings: U2PLSettings = field(default_factory=U2PLSettings)
    settings_type: ClassVar[type] = U2PLSettings
    views: ViewSpec = field(default_factory=lambda: ViewSpec(strong_views=1))
    """Only the weak view is used; one strong view is declared so the unlabeled loader exists."""
    clock: Clock = field(default_factory=Clock)
    student: nn.ModuleDict | None = field(default=None, repr=False)
    teacher: EMATeacher | None = field(default=None, repr=False)
    queues: MemoryQueues | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, cfg: MethodConfig, ignore_index: int) -> U2PL:
        return cls(build_criterion(cfg, ignore_index), ignore_index, cfg.settings)

    def setup(self, net: nn.Module) -> nn.Module:
        """Build the representation head and the teacher (net + head); returns the head to train."""
        device = next(net.parameters()).device
        dim = self.settings.rep_dim
        head = RepresentationHead(fused_channels(net), dim, dim).to(device)
        self.student = nn.ModuleDict({"net": net, "head": head})
        self.teacher = EMATeacher(self.student)
        return head

    def after_step(self, done: int, per_epoch: int, total: int) -> None:
        """The teacher is the student through epoch `sup_only_epochs`, then its EMA (as published)."""
        self.clock = Clock(done, per_epoch, total)
        step, next_epoch = done - 1, done // per_epoch
        if next_epoch < self.settings.sup_only_epochs:
            return
        # Parameters only: the teacher's BatchNorm statistics come from its own train-mode passes.
        if step // per_epoch <= self.settings.sup_only_epochs:
            ema_update(self.teacher.net, self.student, 0.0)
            return
        decay = warmup_decay(step - per_epoch * self.settings.sup_only_epochs, self.settings.ema_decay)
        ema_update(self.teacher.net, self.student, decay)

    def state_dict(self) -> dict[str, Any]:
        """Teacher, head and clock; the queues are not saved (as published, they refill in a few steps)."""
        return {
            "teacher": self.teacher.state_dict(),
            "head": self.student["head"].state_dict(),
            "clock": vars(self.clock),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.student["head"].load_state_dict(state["head"])
        self.clock = Clock(**state["clock"])

    def eval_network(self, net: nn.Module) -> nn.Module:
        """The teacher's network after the labeled-only epochs unless `evaluate` is "student"; else `net`."""
        trained = self.clock.epoch - 1  # validation follows the last step of this epoch
        if self.settings.evaluate == "student" or trained < self.settings.sup_only_epochs:
            return net
        return self.teacher.net["net"]

    def step(
        self,
        model: nn.Module,
        labeled: LabeledBatch,
        unlabeled: UnlabeledBatch | None,
        mix: UnlabeledBatch | None,
    ) -> StepOutput:
        """One U2PL iteration (train_semi.py's `train` loop body)."""
        if unlabeled is None:
            raise ValueError("u2pl: needs the unlabeled batch, got None")
        if self.student is None:
            # Driven by hand (not by the loop): set up from the wrapped network; the head is untrained.
            self.setup(student_network(model))
        if self.clock.epoch < self.settings.sup_only_epochs:
            return self._supervised(model, labeled)
        return self._semi(model, labeled, unlabeled)

    def _forward(
        self, net: nn.Module, x: torch.Tensor, head: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stride-4 logits and representations; the student's head unless `head` is given."""
        features = fused(net, x)
        return classify(net, features), (self.student["head"] if head is None else head)(features)

    @torch.no_grad()
    def _teacher_train_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        teacher = self.teacher.net.train()
        return self._forward(teacher["net"], x, teacher["head"])

    def _supervised(self, model: nn.Module, labeled: LabeledBatch) -> StepOutput:
        logits, rep = model(self._forward, labeled.image)
        loss_x = self.criterion_l(upsample(logits, labeled.image.shape[-2:]), labeled.mask)
        # As published: the teacher's BatchNorm statistics keep moving during the labeled-only epochs.
        self._teacher_train_forward(labeled.image)
        zero = 0.0 * rep.sum()
        loss = loss_x + zero
        terms = {"loss": loss, "loss_x": loss_x, "loss_u": zero, "loss_contrast": zero, "mask_ratio": zero}
        return StepOutput(loss, detached(terms))

    def _semi(self, model: nn.Module, labeled: LabeledBatch, unlabeled: UnlabeledBatch) -> StepOutput:
        size, num_x = labeled.image.shape[-2:], labeled.image.shape[0]
        teacher = self.teacher.net
        with torch.no_grad():
            _, label = losses.pseudo_labels(teacher.eval()["net"](unlabeled.weak))
        image_u, label, ignore = self._cutmix(unlabeled.weak, label, unlabeled.ignore)
        images = torch.cat([labeled.image, image_u])

        logits, rep = model(self._forward, images)
        pred = upsample(logits, size)
        loss_x = self.criterion_l(pred[:num_x], labeled.mask)
        logits_t, rep_t = self._teacher_train_forward(images)
        prob_t = logits_t.softmax(dim=1)
        ent = entropy(upsample(logits_t[num_x:], size).softmax(dim=1))

        valid = ignore != self.ignore_index
        epoch, epochs = self.clock.epoch, self.clock.epochs
        keep = 100 - unreliable_percent(100 - self.settings.drop_percent, epoch, epochs)
        loss_u, kept = reliable_ce(pred[num_x:], label, ent, valid, keep)
        alpha = unreliable_percent(self.settings.alpha_0, epoch, epochs)
        reliable, unreliable = entropy_partition(ent, valid, alpha)

        labeled_valid = labeled.mask != self.ignore_index
        small = logits.shape[-2:]
        loss_c = contrastive_loss(
            rep,
            rep_t,
            prob_t,
            downsample(torch.cat([labeled.mask, torch.where(valid, label, self.ignore_index)]), small),
            downsample(torch.cat([labeled_valid, reliable]), small),
            downsample(torch.cat([labeled_valid, unreliable]), small),
            num_x,
            self._queues(prob_t.shape[1], rep.shape[1], rep.device),
            self.settings.contrast,
            self.ignore_index,
        )
        loss = loss_x + self.settings.weight_u * loss_u + self.settings.weight_contrast * loss_c
        ratio = kept.sum() / valid.sum().clamp_min(1)
        terms = {
            "loss": loss,
            "loss_x": loss_x,
            "loss_u": loss_u,
            "loss_contrast": loss_c,
            "mask_ratio": ratio,
        }
        return StepOutput(loss, detached(terms))

    def _cutmix(
        self, image: torch.Tensor, label: torch.Tensor, ignore: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """With probability cutmix_p, paste the next image of the batch (and its labels) into a U2PL box."""
        if random.random() >= self.settings.cutmix_p:
            return image, label, ignore
        h, w = image.shape[-2:]
        box = torch.stack([u2pl_box(h, w) for _ in range(image.shape[0])]).to(image.device)
        inside = box == 1
        label = torch.where(inside, label.roll(-1, 0), label)
        ignore = torch.where(inside, ignore.roll(-1, 0), ignore)
        return losses.paste(image, image.roll(-1, 0), box), label, ignore

    def _sizes(self, num_classes: int) -> list[int]:
        return [self.settings.background_queue_size] + [self.settings.queue_size] * (num_classes - 1)

    def _queues(self, num_classes: int, dim: int, device: torch.device) -> MemoryQueues:
        if self.queues is None:
            self.queues = MemoryQueues(self._sizes(num_classes), dim, device)
        return self.queues
