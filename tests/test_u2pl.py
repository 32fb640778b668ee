"""U2PL: the EMA teacher, entropy partition, reliable CE, negatives, queues, contrastive loss, a real step."""

import dataclasses
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from gloo import gloo_group
from torch import nn

from trainers import checkpoint as ckpt
from trainers import dist
from trainers.batch import LabeledBatch, UnlabeledBatch
from trainers.config import ConfigError, MethodConfig, from_dict, load_config
from trainers.entry import evaluate_checkpoint
from trainers.forward import Forwarder
from trainers.loop import fit
from trainers.methods import build_method
from trainers.methods.common import build_criterion
from trainers.methods.ema import Clock, EMATeacher, ema_update, warmup_decay
from trainers.methods.u2pl import (
    U2PL,
    Contrast,
    MemoryQueues,
    U2PLSettings,
    contrastive_loss,
    entropy,
    entropy_partition,
    negative_masks,
    percentile,
    reliable_ce,
    u2pl_box,
    unreliable_percent,
)
from trainers.model import DeepLabV3Plus
from trainers.network import build_network

IGNORE, SIZE = 255, 33
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_ema_update_moves_parameters_and_optionally_buffers():
    teacher, student = nn.BatchNorm1d(1), nn.BatchNorm1d(1)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(3.0)
    student.running_mean.fill_(2.0)
    student.num_batches_tracked.fill_(7)
    ema_update(teacher, student, 0.75)
    assert teacher.weight.item() == pytest.approx(1.5)  # 0.75·1 + 0.25·3
    assert teacher.running_mean.item() == 0.0 and teacher.num_batches_tracked.item() == 0
    ema_update(teacher, student, 0.5, buffers=True)
    assert teacher.weight.item() == pytest.approx(2.25)
    assert teacher.running_mean.item() == pytest.approx(1.0) and teacher.num_batches_tracked.item() == 7
    with pytest.raises(ValueError, match="decay"):
        ema_update(teacher, student, 1.5)


def test_warmup_decay_is_a_running_average_until_the_limit():
    assert [warmup_decay(s, 0.99) for s in (0, 1, 3)] == [0.0, 0.5, 0.75]
    assert warmup_decay(1000, 0.99) == 0.99


def test_percentile_matches_numpy_linear():
    values = torch.tensor([4.0, 1.0, 3.0, 2.0])
    for q in (0, 20, 50, 100):
        assert percentile(values, q).item() == pytest.approx(np.percentile(values.numpy(), q))
    assert percentile(values, 20).item() == pytest.approx(1.6)  # 1 + 0.6·(2 − 1)


def test_entropy_of_uniform_and_certain_pixels():
    prob = torch.tensor([[0.5, 1.0], [0.5, 0.0]]).view(1, 2, 1, 2)
    assert torch.allclose(entropy(prob), torch.tensor([[[math.log(2), 0.0]]]), atol=1e-6)


def test_unreliable_share_decays_linearly():
    assert unreliable_percent(20.0, 0, 80) == 20.0
    assert unreliable_percent(20.0, 40, 80) == 10.0


def test_entropy_partition_on_a_hand_case():
    ent = torch.tensor([[[0.1, 0.2, 0.3, 0.4, 0.5]]])
    valid = torch.tensor([[[True, True, True, True, False]]])
    reliable, unreliable = entropy_partition(ent, valid, 25.0)
    # Valid entropies 0.1..0.4: the 25th percentile is 0.175, the 75th 0.325; the padded 0.5 is neither.
    assert reliable.tolist() == [[[True, False, False, False, False]]]
    assert unreliable.tolist() == [[[False, False, False, True, False]]]


def test_reliable_ce_drops_high_entropy_pixels_and_rescales():
    pred = torch.zeros(1, 2, 1, 4)
    label = torch.tensor([[[0, 1, 0, 1]]])
    ent = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]])
    loss, kept = reliable_ce(pred, label, ent, torch.ones(1, 1, 4, dtype=torch.bool), 75.0)
    assert kept.tolist() == [[[True, True, True, False]]]  # entropy < 0.325
    assert loss.item() == pytest.approx(4 / 3 * math.log(2))  # all / kept × mean CE of the kept


def test_negative_masks_follow_the_paper_rule():
    # Pixel 0 (labeled, class 1) and pixel 1 (unlabeled) of a 1x2 map, four classes.
    prob = torch.tensor([[0.15, 0.4], [0.6, 0.3], [0.2, 0.2], [0.05, 0.1]]).view(1, 4, 1, 2)
    prob = torch.cat([prob[..., :1], prob[..., 1:]]).view(2, 4, 1, 1)
    label = torch.tensor([1, 0]).view(2, 1, 1)
    unreliable = torch.tensor([True, True]).view(2, 1, 1)
    neg = negative_masks(prob, label, unreliable, num_labeled=1, low_rank=2, high_rank=4)
    # Labeled: not its class, among the 2 most probable -> class 2. Unlabeled: ranks 2 and 3 -> classes 2, 3.
    assert neg[:, :, 0, 0].tolist() == [[False, False, True, False], [False, False, True, True]]
    calm = negative_masks(prob, label, torch.tensor([True, False]).view(2, 1, 1), 1, 2, 4)
    assert not calm[1].any()


def test_memory_queue_keeps_the_newest_keys():
    queues = MemoryQueues([3, 1], 1, torch.device("cpu"))
    queues.push(0, torch.tensor([[1.0], [2.0]]))
    queues.push(0, torch.tensor([[3.0], [4.0]]))
    queues.push(1, torch.tensor([[5.0], [6.0]]))
    assert queues.keys[0].flatten().tolist() == [2.0, 3.0, 4.0]
    assert queues.keys[1].flatten().tolist() == [6.0]


def test_contrastive_loss_on_orthogonal_classes():
    # Class 0 features point along x, class 1 along y; each queue holds the other class's direction.
    label = torch.tensor([[[0, 1]]])
    rep = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2).requires_grad_(True)
    prob = torch.tensor([[0.9, 0.1], [0.1, 0.9]]).view(1, 2, 1, 2)
    mask = torch.ones(1, 1, 2, dtype=torch.bool)
    queues = MemoryQueues([10, 10], 2, torch.device("cpu"))
    queues.push(0, torch.tensor([[0.0, 1.0]]))
    queues.push(1, torch.tensor([[1.0, 0.0]]))
    cfg = Contrast(low_rank=1, num_queries=4, num_negatives=3, temperature=0.5)
    loss = contrastive_loss(rep, rep.detach(), prob, label, mask, mask, 1, queues, cfg, IGNORE)
    # Positive cosine 1, three negatives of cosine 0: CE = log(1 + 3·e^(−1/T)).
    assert loss.item() == pytest.approx(math.log(1 + 3 * math.exp(-2)), rel=1e-5)
    assert len(queues.keys[0]) == 1  # argmax = label everywhere: no new negatives
    loss.backward()
    assert rep.grad is not None
    single = contrastive_loss(
        rep, rep.detach(), prob, torch.zeros(1, 1, 2, dtype=torch.long), mask, mask, 1, queues, cfg, IGNORE
    )
    assert single.item() == 0.0 and single.requires_grad


def test_u2pl_box_covers_half_the_image():
    random.seed(0)
    for _ in range(20):
        box = u2pl_box(33, 33)
        rows, cols = box.any(dim=1).sum().item(), box.any(dim=0).sum().item()
        assert box.sum().item() == rows * cols and 17 <= cols <= 32
        assert abs(rows * cols - 33 * 33 / 2) <= cols  # height is area / width, rounded


def test_teacher_copies_the_student_through_the_supervised_epoch_then_averages():
    settings = U2PLSettings(sup_only_epochs=1)
    method = U2PL(build_criterion(MethodConfig(criterion="ce"), IGNORE), IGNORE, settings)
    method.student = nn.ModuleDict({"net": nn.Linear(1, 1, bias=False)})
    method.teacher = EMATeacher(method.student)
    weight, teacher = method.student["net"].weight, method.teacher.net["net"].weight
    initial, values = teacher.item(), {}
    for done in range(1, 6):  # two steps per epoch: epoch 0 supervised, epoch 1 copies, then EMA
        with torch.no_grad():
            weight.fill_(float(done))
        method.after_step(done, 2, 10)
        values[done] = teacher.item()
    assert values[1] == initial  # the next step is still supervised: the teacher is left alone
    assert (values[2], values[3], values[4]) == (2.0, 3.0, 4.0)
    assert values[5] == pytest.approx(2 / 3 * 4.0 + 1 / 3 * 5.0)  # decay 1 − 1/(4 − 2 + 1)
    assert method.clock == Clock(5, 2, 10) and method.clock.epoch == 2 and method.clock.epochs == 5


def batches(g: torch.Generator, batch: int = 2) -> tuple[LabeledBatch, UnlabeledBatch]:
    mask = torch.randint(0, 3, (batch, SIZE, SIZE), generator=g)
    mask[:, :2] = IGNORE
    ignore = torch.zeros(batch, SIZE, SIZE, dtype=torch.long)
    ignore[:, -3:] = IGNORE
    strong = [torch.randn(batch, 3, SIZE, SIZE, generator=g)]
    box = torch.zeros(batch, SIZE, SIZE, dtype=torch.long)
    unlabeled = UnlabeledBatch(torch.randn(batch, 3, SIZE, SIZE, generator=g), strong, [box], ignore)
    return LabeledBatch(torch.randn(batch, 3, SIZE, SIZE, generator=g), mask), unlabeled


def test_one_real_step_in_each_phase_reaches_backbone_head_and_representation():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    cfg = Contrast(num_queries=8, num_negatives=4)
    settings = U2PLSettings(rep_dim=8, contrast=cfg)
    method = U2PL(build_criterion(MethodConfig(criterion="ce"), IGNORE), IGNORE, settings)
    net = DeepLabV3Plus("tiny", 3)
    head = method.setup(net)
    model = Forwarder(net).train()
    model.extra = head
    for done, phase in ((0, "supervised"), (2, "semi"), (3, "semi")):
        if done:
            method.after_step(done, 2, 8)
        model.zero_grad()
        out = method.step(model, *batches(g), None)
        assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.terms.values())
        out.loss.backward()
        assert next(net.backbone.parameters()).grad.abs().sum() > 0
        assert net.classifier.weight.grad.abs().sum() > 0
        assert head[0].weight.grad is not None
        assert (out.terms["loss_contrast"] == 0) == (phase == "supervised")
    assert head[0].weight.grad.abs().sum() > 0 and method.queues is not None

    state = method.state_dict()
    other = U2PL(build_criterion(MethodConfig(criterion="ce"), IGNORE), IGNORE, settings)
    other.setup(DeepLabV3Plus("tiny", 3))
    other.load_state_dict(state)
    assert other.clock == method.clock
    for a, b in zip(other.teacher.net.parameters(), method.teacher.net.parameters(), strict=True):
        assert torch.equal(a, b)


def test_trains_and_resumes_in_the_loop(tiny_config):
    cfg = tiny_config(method={"name": "u2pl"}, optim={"epochs": 2, "batch_size": 2, "max_iters_per_epoch": 2})
    first = fit(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, epochs=1)), progress=False)
    state = torch.load(first.out_dir / "latest.pth", weights_only=True)
    assert state["method"]["clock"] == {"done": 2, "per_epoch": 2, "total": 2}
    assert {k.split(".")[0] for k in state["method"]["teacher"]} == {"net", "head"}
    second = fit(cfg, resume_state=state, progress=False)
    assert second.epochs_run == [1]
    latest = torch.load(first.out_dir / "latest.pth", weights_only=True)
    assert latest["method"]["clock"]["done"] == 4
    # The head trains with the network: the optimizer holds its parameters.
    assert not torch.equal(latest["method"]["head"]["0.weight"], state["method"]["head"]["0.weight"])


@pytest.mark.parametrize("evaluate", ["teacher", "student"])
def test_validation_and_best_pth_score_the_network_evaluate_names(evaluate, learn_config, val_miou):
    cfg = learn_config(name="u2pl", evaluate=evaluate)
    seen: list[float] = []
    fit(cfg, report=lambda metrics, path: seen.append(metrics["miou"]), progress=False)
    state = torch.load(Path(cfg.out_dir) / ckpt.LATEST, weights_only=True)
    teacher = {
        k.removeprefix("net."): v for k, v in state["method"]["teacher"].items() if k.startswith("net.")
    }
    scores = {}
    for name, weights in (("student", state["model"]), ("teacher", teacher)):
        net = build_network(cfg)
        net.load_state_dict(weights)
        scores[name] = val_miou(cfg, net)
    assert scores["teacher"] != scores["student"]  # the run tells the two apart
    assert seen[-1] == scores[evaluate]  # epoch 1 follows the labeled-only epoch: the teacher's turn
    assert evaluate_checkpoint(Path(cfg.out_dir) / ckpt.BEST).result.miou == max(seen)


def test_an_unknown_evaluated_network_is_one_error_naming_the_key():
    with pytest.raises(
        ConfigError, match=r"^method\.evaluate: expected one of \['student', 'teacher'\], got 'foo'$"
    ):
        from_dict(MethodConfig, {"name": "u2pl", "evaluate": "foo"})


def test_pascal_config_has_the_published_settings():
    cfg = load_config(REPO / "configs" / "pascal_u2pl.yaml")
    method = build_method(cfg.method, IGNORE)
    assert (cfg.data.crop_size, cfg.optim.epochs, cfg.optim.lr, cfg.optim.reference_global_batch) == (
        513,
        80,
        0.001,
        16,
    )
    s = method.settings
    assert (s.ema_decay, s.drop_percent, s.alpha_0, s.sup_only_epochs) == (
        0.99,
        80.0,
        20.0,
        1,
    )
    assert (s.contrast.num_queries, s.contrast.num_negatives, s.contrast.temperature) == (
        256,
        50,
        0.5,
    )


def orthogonal_loss(tilt: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, rep): class 0's pixel at (1, tilt), class 1's at (0, 1); each queue holds the other's axis.

    The teacher is sure of the labels, so the batch adds no negatives.
    """
    label = torch.tensor([[[0, 1]]])
    rep = torch.tensor([[1.0, 0.0], [tilt, 1.0]]).view(1, 2, 1, 2).requires_grad_(True)
    prob = torch.tensor([[0.9, 0.1], [0.1, 0.9]]).view(1, 2, 1, 2)
    mask = torch.ones(1, 1, 2, dtype=torch.bool)
    queues = MemoryQueues([10, 10], 2, torch.device("cpu"))
    # Set, not pushed: under DDP a push would gather both ranks' copies.
    queues.keys = [torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])]
    cfg = Contrast(low_rank=1, num_queries=4, num_negatives=3, temperature=0.5)
    return contrastive_loss(rep, rep.detach(), prob, label, mask, mask, 1, queues, cfg, IGNORE), rep


def ddp_worker(rank: int, world: int, folder: str) -> None:
    """Queues, contrastive loss and one real semi-supervised step on rank-specific data."""
    with gloo_group(rank, world, folder):
        queues = MemoryQueues([10, 3], 1, torch.device("cpu"))
        queues.push(0, torch.arange(3.0 if rank == 0 else 1.0).view(-1, 1) + 10 * rank)
        queues.push(1, torch.arange(1.0 if rank == 0 else 3.0).view(-1, 1) + 10 * rank)
        loss, rep = orthogonal_loss(tilt=rank / 2)
        loss.backward()
        step = ddp_step(rank)
    result = {"queues": queues.keys, "loss": loss.detach(), "grad": rep.grad, **step}
    torch.save(result, Path(folder) / f"{rank}.pt")


def ddp_step(rank: int) -> dict[str, object]:
    """One U2PL semi-supervised step under DDP (same weights, rank-specific batches): its queues and term."""
    torch.manual_seed(0)
    random.seed(rank)
    settings = U2PLSettings(rep_dim=8, contrast=Contrast(num_queries=8, num_negatives=4))
    method = U2PL(build_criterion(MethodConfig(criterion="ce"), IGNORE), IGNORE, settings)
    net = DeepLabV3Plus("tiny", 3)
    forwarder = Forwarder(net).train()
    forwarder.extra = method.setup(net)
    model = dist.wrap(forwarder, dist.context(use_gpu=False))
    method.after_step(2, 2, 8)  # epoch 1: past the supervised epoch
    out = method.step(model, *batches(torch.Generator().manual_seed(rank + 1)), None)
    out.loss.backward()
    return {"step_queues": method.queues.keys, "loss_contrast": out.terms["loss_contrast"]}


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What each of 2 gloo ranks computed (ddp_worker), by rank."""
    folder = tmp_path_factory.mktemp("u2pl_ddp")
    mp.spawn(ddp_worker, args=(2, str(folder)), nprocs=2)
    return [torch.load(folder / f"{rank}.pt") for rank in range(2)]


def test_ddp_queues_hold_every_ranks_keys_in_rank_order(ddp_results):
    # Class 0: rank 0 pushed [0, 1, 2], rank 1 [10]; class 1 (size 3): [0] then [10, 11, 12].
    for rank, result in enumerate(ddp_results):
        assert result["queues"][0].flatten().tolist() == [0.0, 1.0, 2.0, 10.0], f"rank {rank}"
        assert result["queues"][1].flatten().tolist() == [10.0, 11.0, 12.0], f"rank {rank}"


def test_ddp_contrastive_loss_is_the_mean_over_ranks_with_the_own_gradient_halved(ddp_results):
    alone = [orthogonal_loss(tilt=rank / 2) for rank in range(2)]
    assert alone[0][0].item() != pytest.approx(alone[1][0].item())  # the ranks' losses differ
    mean = (alone[0][0].item() + alone[1][0].item()) / 2
    for rank, (loss, rep) in enumerate(alone):
        assert ddp_results[rank]["loss"].item() == pytest.approx(mean, rel=1e-6)
        loss.backward()
        # As published: all_reduce then / world size, the all_reduce passing the own gradient through.
        torch.testing.assert_close(ddp_results[rank]["grad"], rep.grad / 2)


def test_a_ddp_step_logs_one_contrastive_loss_and_keeps_one_queue(ddp_results):
    first, second = ddp_results
    assert first["loss_contrast"].item() != 0.0
    assert torch.equal(first["loss_contrast"], second["loss_contrast"])
    assert sum(len(keys) for keys in first["step_queues"]) > 0
    for a, b in zip(first["step_queues"], second["step_queues"], strict=True):
        assert torch.equal(a, b)
