"""Timeouts from the config reach what waits: every DataLoader with worker processes, and the process group
Ray Train initialises (so a hung loader worker or a lost rank ends in an error, not an endless wait)."""

from __future__ import annotations

from typing import Any

import pytest
from semiseg import launch

from trainers import dist
from trainers.batch import ViewSpec
from trainers.config import ConfigError
from trainers.data import build_loaders
from trainers.datasets import resolve_split

pytestmark = pytest.mark.timeout(300)


def _loaders(cfg):
    views = ViewSpec(strong_views=1, mix_batch=True)
    return build_loaders(cfg, resolve_split(cfg.data), views, dist.context(use_gpu=False), 2)


def _every(loaders):
    return (loaders.labeled, loaders.unlabeled, loaders.mix, loaders.val)


def test_loaders_with_workers_time_out_as_configured(tiny_config):
    loaders = _loaders(tiny_config(data={"num_workers": 1, "loader_timeout_s": 7.5}))
    assert [loader.timeout for loader in _every(loaders)] == [7.5] * 4
    # Without worker processes nothing is waited for: torch would ignore a timeout, so none is set.
    assert {loader.timeout for loader in _every(_loaders(tiny_config()))} == {0}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": {"loader_timeout_s": -1}}, "data.loader_timeout_s: expected >= 0 (0 = no timeout), got -1"),
        ({"dist": {"timeout_s": 0}}, "dist.timeout_s: expected > 0, got 0"),
        ({"dist": {"timeout_s": 1.5}}, "dist.timeout_s: expected int, got 1.5"),
    ],
)
def test_bad_timeouts_name_their_key(tiny_config, change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(**change)


def test_the_process_group_times_out_as_configured(ray_cluster, tiny_config):
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    def probe(_: dict[str, Any]) -> dict[str, float]:
        # Local, so Ray pickles it by value: the workers cannot import this test module.
        return {"timeout_s": dist.collective_timeout().total_seconds()}

    cfg = tiny_config(dist={"timeout_s": 123})
    trainer = TorchTrainer(
        probe,
        torch_config=launch.torch_config(cfg, use_gpu=False),
        scaling_config=launch.scaling_config(1, use_gpu=False),
        run_config=RunConfig(name="probe", storage_path=cfg.out_dir),
    )
    assert trainer.fit().return_value == {"timeout_s": 123.0}
    assert dist.collective_timeout() is None  # this process has no group
