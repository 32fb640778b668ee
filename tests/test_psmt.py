"""PS-MT: ramp, assist mask, confidence-weighted CE, T-VAT, CutMix box, teacher schedule, a real step."""

import math
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from trainers import checkpoint as ckpt
from trainers.batch import LabeledBatch, UnlabeledBatch
from trainers.config import ConfigError, MethodConfig, from_dict, load_config
from trainers.entry import evaluate_checkpoint
from trainers.evaluate import predict
from trainers.forward import Forwarder
from trainers.loop import fit
from trainers.methods import build_method
from trainers.methods.common import build_criterion
from trainers.methods.ema import Clock, EMATeacher
from trainers.methods.projection import classify, fused
from trainers.methods.psmt import (
    PSMT,
    PSMTSettings,
    TeacherMean,
    assisted,
    confidence_weighted_ce,
    cosine_rampup,
    l2_normalize,
    psmt_box,
    tvat_perturbation,
)
from trainers.model import DeepLabV3Plus
from trainers.network import build_network

IGNORE, SIZE = 255, 33
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def make(**kwargs) -> PSMT:
    settings = PSMTSettings(**kwargs)
    return PSMT(build_criterion(MethodConfig(criterion="ce"), IGNORE), 0.6, IGNORE, settings)


def test_cosine_rampup():
    assert [cosine_rampup(t, 10) for t in (-1, 0, 5, 10, 20)] == pytest.approx([0, 0, 0.5, 1, 1])
    assert cosine_rampup(3, 0) == 1.0


def test_assist_mask_keeps_the_other_teachers_top_k():
    core = torch.tensor([7.0, 8.0, 9.0]).view(1, 3, 1, 1)
    assist = torch.tensor([1.0, 5.0, 2.0]).view(1, 3, 1, 1)
    assert assisted(core, assist, 1).flatten().tolist() == [7.0, 5.0, 9.0]
    assert assisted(core, assist, 2).flatten().tolist() == [7.0, 5.0, 2.0]
    assert torch.equal(assisted(core, assist, 7), assist)  # k beyond the class count keeps all


def test_confidence_weighted_ce_on_a_hand_case():
    # Pixel A: target class 0 with confidence 0.8; pixel B: confidence 0.5 (below 0.6); pixel C: padding.
    target = torch.tensor([[math.log(0.8), 0.0, 5.0], [math.log(0.2), 0.0, 0.0]]).view(1, 2, 1, 3)
    valid = torch.tensor([[[True, True, False]]])
    loss, kept = confidence_weighted_ce(torch.zeros(1, 2, 1, 3), target, valid, 0.6)
    assert kept.tolist() == [[[True, False, False]]]
    assert loss.item() == pytest.approx(0.8 * math.log(2))
    none, _ = confidence_weighted_ce(torch.zeros(1, 2, 1, 3), target, valid, 0.99)
    assert none.item() == 0.0


def test_l2_normalize_per_sample():
    d = torch.tensor([[3.0, 4.0], [0.0, 2.0]]).view(2, 2, 1, 1)
    assert l2_normalize(d).flatten().tolist() == pytest.approx([0.6, 0.8, 0.0, 1.0])


def test_tvat_perturbation_has_norm_eps_and_touches_no_teacher_gradient():
    torch.manual_seed(0)
    decoders = [nn.Conv2d(4, 3, 1).requires_grad_(False), nn.Conv2d(4, 3, 1).requires_grad_(False)]
    features = torch.randn(2, 4, 5, 5, requires_grad=True)
    r = tvat_perturbation(features, decoders, torch.Size([9, 9]), xi=1.0, eps=2.0)
    assert r.shape == features.shape and not r.requires_grad
    assert r.flatten(1).norm(dim=1).tolist() == pytest.approx([2.0, 2.0], rel=1e-4)
    assert features.grad is None and all(d.weight.grad is None for d in decoders)


def test_published_xi_leaves_almost_no_perturbation():
    # A quirk of the published settings: with xi = 1e-6 the KL gradient (~xi²) is far below the 1e-8
    # that the normalisation adds, so the "eps = 2" perturbation has a norm of about 1e-5.
    torch.manual_seed(0)
    net = DeepLabV3Plus("tiny", 21).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    features = fused(net, x)
    r = tvat_perturbation(features, [lambda f: classify(net, f)], x.shape[-2:], xi=1e-6, eps=2.0)
    assert r.norm().item() < 1e-3


def test_tvat_direction_raises_the_teachers_divergence_more_than_a_random_one():
    torch.manual_seed(0)
    decoders = [nn.Conv2d(4, 3, 1).requires_grad_(False)]
    features = torch.randn(1, 4, 3, 3)
    target = decoders[0](features).softmax(dim=1)

    def kl(r):
        return torch.nn.functional.kl_div(decoders[0](features + r).log_softmax(1), target, reduction="sum")

    r = tvat_perturbation(features, decoders, torch.Size([3, 3]), xi=1e-2, eps=0.5)
    random_r = 0.5 * l2_normalize(torch.randn_like(features))
    assert kl(r) > kl(random_r)


def test_tvat_direction_under_bf16_autocast_is_the_fp32_direction():
    # The GPU default runs training steps under bf16 autocast; the probe must not (see tvat_perturbation).
    torch.manual_seed(0)
    decoders = [nn.Conv2d(8, 3, 1).requires_grad_(False), nn.Conv2d(8, 3, 1).requires_grad_(False)]
    features = torch.randn(2, 8, 6, 6)
    directions = []
    for bf16 in (False, True):
        torch.manual_seed(1)  # the same random start
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            directions.append(tvat_perturbation(features, decoders, torch.Size([12, 12]), xi=1e-2, eps=1.0))
    fp32, bf16 = directions
    norms = bf16.flatten(1).norm(dim=1)
    assert norms.min() > 0.9 and norms.tolist() == pytest.approx(
        fp32.flatten(1).norm(dim=1).tolist(), rel=1e-3
    )
    assert torch.nn.functional.cosine_similarity(fp32.flatten(1), bf16.flatten(1)).min() >= 0.99


def test_psmt_box_size_and_position():
    random.seed(0)
    for lam in (0.2, 0.5, 0.8):
        box = psmt_box(32, 32, lam)
        rows, cols = box.any(dim=1).sum().item(), box.any(dim=0).sum().item()
        side = int(32 * math.sqrt(1 - lam))
        assert box.sum().item() == rows * cols and rows <= side and cols <= side


def test_teachers_start_from_the_student_then_alternate():
    method = make(warmup_epochs=1)
    method.student = nn.Linear(1, 1, bias=False)
    method.teachers = [EMATeacher(method.student), EMATeacher(method.student)]
    student, (t1, t2) = method.student.weight, (t.net.weight for t in method.teachers)
    seen = []
    for done in range(1, 7):  # two steps per epoch: warm-up, then teacher 1's epoch, then teacher 2's
        with torch.no_grad():
            student.fill_(float(done))
        method.after_step(done, 2, 12)
        seen.append((t1.item(), t2.item()))
    assert seen[1] == (2.0, 2.0)  # warm-up over: both take the student
    assert seen[2] == pytest.approx((0.996 * 2 + 0.004 * 3, 2.0))
    assert seen[4][1] == pytest.approx(0.996 * 2 + 0.004 * 5) and seen[4][0] == seen[3][0]
    assert method.clock == Clock(6, 2, 12)


def batches(g: torch.Generator, batch: int = 2) -> tuple[LabeledBatch, UnlabeledBatch]:
    mask = torch.randint(0, 3, (batch, SIZE, SIZE), generator=g)
    ignore = torch.zeros(batch, SIZE, SIZE, dtype=torch.long)
    ignore[:, -3:] = IGNORE
    box = torch.zeros(batch, SIZE, SIZE, dtype=torch.long)
    strong = [torch.randn(batch, 3, SIZE, SIZE, generator=g)]
    unlabeled = UnlabeledBatch(torch.randn(batch, 3, SIZE, SIZE, generator=g), strong, [box], ignore)
    image_l, strong_l = torch.randn(2, batch, 3, SIZE, SIZE, generator=g)
    return LabeledBatch(image_l, mask, strong_l), unlabeled


@pytest.mark.parametrize("view", ["strong", "weak"])
def test_the_labeled_loss_is_on_the_configured_view(view):
    # PS-MT's student learns the strongly augmented labeled image (VocCode/train.py:154, 206).
    g = torch.Generator().manual_seed(1)
    method = make(warmup_epochs=1, labeled_view=view)
    net = DeepLabV3Plus("tiny", 3)
    method.setup(net)
    labeled, unlabeled = batches(g)
    out = method.step(Forwarder(net).train(), labeled, unlabeled, None)
    image = labeled.strong if view == "strong" else labeled.image
    expected = method.criterion_l(net(image), labeled.mask)
    assert out.terms["loss_x"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert method.views.labeled_strong == (view == "strong")
    with pytest.raises(ValueError, match="labeled_view strong needs the labeled batch's strong view"):
        make(labeled_view="strong").step(
            Forwarder(net).train(), LabeledBatch(image, labeled.mask), unlabeled, None
        )


def test_one_real_step_in_warmup_and_semi_phases():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    method = make(warmup_epochs=1, rampup_epochs=0, weight_u=0.5)
    method.conf_thresh = 0.0
    net = DeepLabV3Plus("tiny", 3)
    assert method.setup(net) is None
    model = Forwarder(net).train()
    for done in (0, 2):
        if done:
            method.after_step(done, 2, 8)
        model.zero_grad()
        out = method.step(model, *batches(g), None)
        assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.terms.values())
        out.loss.backward()
        assert next(net.backbone.parameters()).grad.abs().sum() > 0
        assert net.classifier.weight.grad.abs().sum() > 0
    assert out.terms["loss"].item() == pytest.approx(
        out.terms["loss_x"].item() + 0.5 * out.terms["loss_u"].item()
    )
    assert out.terms["mask_ratio"].item() == 1.0
    assert all(p.grad is None for t in method.teachers for p in t.net.parameters())

    other = make()
    other.setup(DeepLabV3Plus("tiny", 3))
    other.load_state_dict(method.state_dict())
    assert other.clock == method.clock
    assert torch.equal(next(other.teachers[1].net.parameters()), next(method.teachers[1].net.parameters()))


def test_teacher_mean_is_the_mean_of_the_two_teachers_logits():
    torch.manual_seed(0)
    first, second = DeepLabV3Plus("tiny", 3).eval(), DeepLabV3Plus("tiny", 3).eval()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(TeacherMean(first, second).eval()(x), (first(x) + second(x)) / 2)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as validation runs it on a GPU
            scores = predict(TeacherMean(first, second).eval(), x, "sliding_window", 24, 3)
    assert scores.shape == (2, 3, SIZE, SIZE) and torch.isfinite(scores).all()


@pytest.mark.parametrize("evaluate", ["teachers", "student"])
def test_validation_and_best_pth_score_the_network_evaluate_names(evaluate, learn_config, val_miou):
    cfg = learn_config(name="psmt", evaluate=evaluate, warmup_epochs=1, rampup_epochs=0)
    seen: list[float] = []
    fit(cfg, report=lambda metrics, path: seen.append(metrics["miou"]), progress=False)
    state = torch.load(Path(cfg.out_dir) / ckpt.LATEST, weights_only=True)
    nets = []
    for weights in (state["model"], *state["method"]["teachers"]):
        nets.append(build_network(cfg))
        nets[-1].load_state_dict(weights)
    scores = {"student": val_miou(cfg, nets[0]), "teachers": val_miou(cfg, TeacherMean(*nets[1:]))}
    assert scores["teachers"] != scores["student"]  # the run tells the two apart
    assert seen[-1] == scores[evaluate]  # epoch 1 follows warm-up: the teachers' turn
    assert evaluate_checkpoint(Path(cfg.out_dir) / ckpt.BEST).result.miou == max(seen)


def test_an_unknown_evaluated_network_is_one_error_naming_the_key():
    with pytest.raises(
        ConfigError, match=r"^method\.evaluate: expected one of \['student', 'teachers'\], got 'foo'$"
    ):
        from_dict(MethodConfig, {"name": "psmt", "evaluate": "foo"})


def test_pascal_config_has_the_published_settings():
    cfg = load_config(REPO / "configs" / "pascal_psmt.yaml")
    method = build_method(cfg.method, IGNORE)
    assert (cfg.data.crop_size, cfg.optim.epochs, cfg.optim.lr, cfg.optim.lr_multi) == (512, 85, 0.0025, 1.0)
    s = method.settings
    assert (method.conf_thresh, s.weight_u, s.warmup_epochs, s.rampup_epochs) == (
        0.6,
        0.06,
        5,
        12.0,
    )
    assert (s.ema_keep, s.xi, s.eps, s.assist_topk) == (0.996, 1e-6, 2.0, 7)
