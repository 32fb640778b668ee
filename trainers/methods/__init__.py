"""Training methods: small objects that turn model outputs into named losses; one loop runs them all.

A method subclasses `trainers.methods.base.Method`: it declares the unlabeled views it needs (`views`),
computes one iteration's losses (`step`) and overrides the hooks it needs. Adding a method is adding a
file and a line in METHODS.
"""

from __future__ import annotations

from trainers.config import MethodConfig, choice
from trainers.methods.base import Method
from trainers.methods.fixmatch import FixMatch
from trainers.methods.mspl import MSPL
from trainers.methods.psmt import PSMT
from trainers.methods.stpp import STPP
from trainers.methods.supervised import Supervised
from trainers.methods.u2pl import U2PL
from trainers.methods.unimatch import UniMatch

METHODS: dict[str, type[Method]] = {
    "supervised": Supervised,
    "fixmatch": FixMatch,
    "unimatch": UniMatch,
    "mspl": MSPL,
    "u2pl": U2PL,
    "stpp": STPP,
    "psmt": PSMT,
}


def method_class(cfg: MethodConfig) -> type[Method]:
    """The class `cfg.name` names (ConfigError listing the choices otherwise)."""
    return choice("method.name", cfg.name, METHODS)


def build_method(cfg: MethodConfig, ignore_index: int) -> Method:
    """The method named by `cfg.name`, configured."""
    return method_class(cfg).from_config(cfg, ignore_index)
