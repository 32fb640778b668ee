"""PS-MT (Liu et al., CVPR 2022): perturbed and strict mean teachers.

Two EMA teachers, updated in alternate epochs, ensemble their predictions on the weak view; the
student learns a CutMix of the strong view through a decoder whose input features carry the
teachers' adversarial perturbation (T-VAT), with a confidence-weighted CE.
Source read: yyliu01/PS-MT, VocCode/train.py, Model/Deeplabv3_plus/*.py and Utils/losses.py.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from trainers import losses
from trainers.batch import LabeledBatch, UnlabeledBatch, ViewSpec
from trainers.config import MethodConfig, at_least, choice, positive, within
from trainers.forward import plain
from trainers.methods.base import Method, StepOutput
from trainers.methods.common import Criterion, build_criterion, detached
from trainers.methods.ema import Clock, EMATeacher, student_network
from trainers.methods.projection import classify, fused
from trainers.model import upsample


def cosine_rampup(current: float, length: float) -> float:
    """PS-MT's weight ramp: (1 − cos(π·t/length)) / 2 for t clipped to [0, length]; 1 when length is 0."""
    if length == 0:
        return 1.0
    t = min(max(current, 0.0), length)
    return (1 - math.cos(math.pi * t / length)) / 2


def assisted(core: torch.Tensor, assist: torch.Tensor, k: int) -> torch.Tensor:
    """`assist`'s logits on its top-k classes per pixel, `core`'s on the others (PS-MT's assist mask)."""
    top = assist.topk(min(k, assist.shape[1]), dim=1).indices
    keep = torch.zeros_like(assist, dtype=torch.bool).scatter_(1, top, True)
    return torch.where(keep, assist, core)


def confidence_weighted_ce(
    pred: torch.Tensor, target_logits: torch.Tensor, valid: torch.Tensor, thresh: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over confident valid pixels of conf·CE(pred, argmax target); conf = max softmax of the target.

    Returns the loss (0 when no pixel is confident) and the confident mask.
    """
    conf, label = target_logits.detach().softmax(dim=1).max(dim=1)
    kept = (conf >= thresh) & valid
    per_pixel = F.cross_entropy(pred, label, reduction="none") * conf
    return (per_pixel * kept).sum() / kept.sum().clamp_min(1), kept


def l2_normalize(d: torch.Tensor) -> torch.Tensor:
    """Each sample of `d` scaled to unit L2 norm (over all its elements)."""
    norm = d.flatten(1).norm(dim=1).view(-1, *([1] * (d.dim() - 1)))
    return d / (norm + 1e-8)


def tvat_perturbation(
    features: torch.Tensor,
    decoders: list[nn.Module],
    size: torch.Size,
    xi: float = 1e-6,
    eps: float = 2.0,
) -> torch.Tensor:
    """T-VAT: the direction (norm eps) of the features that most changes the teachers' ensemble.

    One power iteration from a random direction, KL(ensemble(f) ‖ ensemble(f + xi·d)) at input size.
    `decoders` map fused features to stride-4 logits and run in eval mode. The probe runs in fp32 with
    autocast off: under bf16 autocast a step of xi·d (each element far below bf16's resolution) is
    rounded away and the "direction" is noise or zero. The result has the features' dtype.
    """
    f = features.detach().float()

    def ensemble(x: torch.Tensor) -> torch.Tensor:
        return upsample(sum(decode(x) for decode in decoders) / len(decoders), size)

    with torch.autocast(f.device.type, enabled=False):
        with torch.no_grad():
            target = ensemble(f).softmax(dim=1)
        d = l2_normalize(torch.rand_like(f) - 0.5).requires_grad_(True)
        with torch.enable_grad():
            distance = F.kl_div(ensemble(f + xi * d).log_softmax(dim=1), target, reduction="batchmean")
            (grad,) = torch.autograd.grad(distance, d)
    return (eps * l2_normalize(grad)).to(features.dtype)


def psmt_box(height: int, width: int, lam: float) -> torch.Tensor:
    """PS-MT's CutMix box: sides √(1 − lam) of the image's, centre at ≥ 1/8 of each side, clipped."""
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = random.randrange(height // 8, height), random.randrange(width // 8, width)
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    out = torch.zeros(height, width, dtype=torch.int64)
    out[top:bottom, left:right] = 1
    return out


LABELED_VIEWS = ("strong", "weak")


class TeacherMean(nn.Module):
    """PS-MT's evaluated network: the mean of its two teachers' logits (VocCode/train.py:332-333)."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.teachers = nn.ModuleList([first, second])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(teacher 1 + teacher 2) / 2 of the logits at input size, as published (before any softmax)."""
        first, second = self.teachers
        return (first(x) + second(x)) / 2


@dataclass(frozen=True)
class PSMTSettings:
    """PS-MT's own `method:` keys; defaults from VocCode/configs/config_deeplab_v3+.json (Pascal)."""

    weight_u: float = 0.6
    """Final unlabeled weight (`unsupervised_w`): 0.06 for the 92-label split, 0.6 from 183, as published."""
    warmup_epochs: int = 5
    """Labeled-only epochs; then both teachers take the student's weights."""
    labeled_view: str = "strong"
    """The labeled image the student learns from: `strong` (jitter, grayscale, blur; PS-MT's
    VocCode/train.py:154 in warm-up and :206 after, Base/base_dataset.py:132-153), or `weak`."""
    rampup_epochs: float = 12.0
    """Epochs of the cosine ramp of weight_u after warm-up (0 = full weight at once)."""
    ema_keep: float = 0.996
    """EMA keep rate of the teacher updated in each epoch."""
    gamma: float = 0.5
    """Ensemble weight of teacher 1."""
    assist_topk: int = 7
    """Classes per pixel taken from the assisting teacher."""
    xi: float = 1e-6
    """T-VAT's probe step."""
    eps: float = 2.0
    """T-VAT's perturbation norm."""
    evaluate: str = "teachers"
    """The network validated and kept as best.pth: "teachers", the mean of the two teachers' logits, as
    published (VocCode/train.py:332-333), from the end of warm-up (ours trains only the student in it,
    then the teachers take its weights); "student", the protocol's."""

    def __post_init__(self) -> None:
        choice("method.evaluate", self.evaluate, dict.fromkeys(("teachers", "student")))
        at_least(self, "method", 0.0, "weight_u", "warmup_epochs", "rampup_epochs")
        within(self, "method", 0.0, 1.0, "ema_keep", "gamma")
        at_least(self, "method", 1, "assist_topk")
        positive(self, "method", "xi", "eps")
        choice("method.labeled_view", self.labeled_view, dict.fromkeys(LABELED_VIEWS))


@dataclass
class PSMT(Method):
    criterion_l: Criterion
    conf_thresh: float
    ignore_index: int
    settings: PSMTSettings = field(default_factory=PSMTSettings)
    settings_type: ClassVar[type] = PSMTSettings
    clock: Clock = field(default_factory=Clock)
    student: nn.Module | None = field(default=None, repr=False)
    teachers: list[EMATeacher] = field(default_factory=list, repr=False)

    @property
    def views(self) -> ViewSpec:
        return ViewSpec(strong_views=1, labeled_strong=self.settings.labeled_view == "strong")

    @classmethod
    def from_config(cls, cfg: MethodConfig, ignore_index: int) -> PSMT:
        return cls(build_criterion(cfg, ignore_index), cfg.conf_thresh, ignore_index, cfg.settings)

    def setup(self, net: nn.Module) -> None:
        """Two teachers, copies of the network; no extra trainable modules."""
        self.student = net
        self.teachers = [EMATeacher(net), EMATeacher(net)]

    def after_step(self, done: int, per_epoch: int, total: int) -> None:
        """Both teachers take the student's weights when warm-up ends; then the epoch's teacher follows it."""
        self.clock = Clock(done, per_epoch, total)
        semi_epoch = (done - 1) // per_epoch - self.settings.warmup_epochs
        if semi_epoch < 0:
            if done // per_epoch == self.settings.warmup_epochs:
                for teacher in self.teachers:
                    teacher.copy_from(self.student)
            return
        # PS-MT averages the whole state dict, BatchNorm statistics included.
        self.teachers[self._current(semi_epoch)].update(self.student, self.settings.ema_keep, buffers=True)

    def state_dict(self) -> dict[str, Any]:
        return {"teachers": [t.state_dict() for t in self.teachers], "clock": vars(self.clock)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for teacher, saved in zip(self.teachers, state["teachers"], strict=True):
            teacher.load_state_dict(saved)
        self.clock = Clock(**state["clock"])

    def eval_network(self, net: nn.Module) -> nn.Module:
        """The two teachers' mean once warm-up has given them the student's weights, unless `evaluate` is
        "student"; else `net`."""
        if self.settings.evaluate == "student" or self.clock.epoch < self.settings.warmup_epochs:
            return net
        return TeacherMean(*(teacher.net for teacher in self.teachers))

    def step(
        self,
        model: nn.Module,
        labeled: LabeledBatch,
        unlabeled: UnlabeledBatch | None,
        mix: UnlabeledBatch | None,
    ) -> StepOutput:
        """One PS-MT iteration (train.py's `_train_epoch` body, EntireModel.forward)."""
        if unlabeled is None or not unlabeled.strong:
            raise ValueError("psmt: needs the unlabeled batch with one strong view")
        if self.student is None:
            # Driven by hand (not by the loop): set up from the wrapped network.
            self.setup(student_network(model))
        semi_epoch = self.clock.epoch - self.settings.warmup_epochs
        image_l = labeled.strong if self.settings.labeled_view == "strong" else labeled.image
        if image_l is None:
            raise ValueError("psmt: labeled_view strong needs the labeled batch's strong view")
        if semi_epoch < 0:
            loss_x = self.criterion_l(model(plain, image_l), labeled.mask)
            zero = torch.zeros((), device=loss_x.device)
            terms = {"loss": loss_x, "loss_x": loss_x, "loss_u": zero, "weight_u": zero, "mask_ratio": zero}
            return StepOutput(loss_x, detached(terms))

        target = self._ensemble(unlabeled.weak, self._current(semi_epoch))
        image, target, ignore = self._cutmix(unlabeled.strong[0], target, unlabeled.ignore)
        pred_x = model(self._perturbed, image_l)
        pred_u = model(self._perturbed, image)
        valid = ignore != self.ignore_index
        loss_x = self.criterion_l(pred_x, labeled.mask)
        loss_u, kept = confidence_weighted_ce(pred_u, target, valid, self.conf_thresh)
        weight = self._weight_u()
        loss = loss_x + weight * loss_u
        terms = {
            "loss": loss,
            "loss_x": loss_x,
            "loss_u": loss_u,
            "weight_u": loss.new_tensor(weight),
            "mask_ratio": kept.sum() / valid.sum().clamp_min(1),
        }
        return StepOutput(loss, detached(terms))

    def _weight_u(self) -> float:
        """weight_u times the cosine ramp over the first `rampup_epochs` after warm-up."""
        if self.settings.rampup_epochs == 0:
            return self.settings.weight_u
        if not self.clock.per_epoch:
            return 0.0  # the first step: the loop has not reported the epoch length yet
        s = self.settings
        done = self.clock.done - s.warmup_epochs * self.clock.per_epoch
        return s.weight_u * cosine_rampup(done, s.rampup_epochs * self.clock.per_epoch)

    def _current(self, semi_epoch: int) -> int:
        """Index of the teacher updated in this epoch: 0 in PS-MT's odd (1-based) epochs, else 1."""
        return semi_epoch % 2

    def _ensemble(self, weak: torch.Tensor, current: int) -> torch.Tensor:
        """γ·t1 + (1 − γ)·t2 logits; the other teacher keeps only its top-k classes.

        The teachers run in train mode (batch statistics), as published.
        """
        with torch.no_grad():
            logits = [t.net.train()(weak) for t in self.teachers]
        other = 1 - current
        logits[other] = assisted(logits[current], logits[other], self.settings.assist_topk)
        return self.settings.gamma * logits[0] + (1 - self.settings.gamma) * logits[1]

    def _perturbed(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The student's logits with T-VAT noise added to its fused features."""
        features = fused(net, x)
        decoders = [lambda f, t=t.net: classify(t, f) for t in self.teachers]
        for teacher in self.teachers:
            teacher.net.eval()
        noise = tvat_perturbation(features, decoders, x.shape[-2:], self.settings.xi, self.settings.eps)
        return upsample(classify(net, features + noise), x.shape[-2:])

    def _cutmix(
        self, image: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Paste a random other image of the batch (and its target logits) into a PS-MT box per image."""
        h, w = image.shape[-2:]
        lam = random.betavariate(4, 4)
        box = torch.stack([psmt_box(h, w, lam) for _ in range(image.shape[0])]).to(image.device)
        order = torch.randperm(image.shape[0], device=image.device)
        inside = box == 1
        return (
            losses.paste(image, image[order], box),
            torch.where(inside.unsqueeze(1), target[order], target),
            torch.where(inside, ignore[order], ignore),
        )
