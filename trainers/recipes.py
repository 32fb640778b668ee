"""The two protocols a grid runs its methods under: `unified`, every method on the grid's one recipe; and
`published`, each method on its own paper's recipe (trainers/published_recipes/<dataset>.yaml).

A recipe holds only the `data`, `model` and `optim` keys in which a method's published training differs
from the unified protocol (schedule, crop, batch, lr, output stride and ASPP, optimizer groups, what an
epoch passes over). What a method is (losses, weights, thresholds, which network it scores, its views,
its pseudo-labelling) is its settings' business under either protocol (trainers/methods/).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from trainers.config import ConfigError, TrainConfig, from_dict, load_yaml, merge

PROTOCOLS = ("unified", "published")
RECIPES = Path(__file__).parent / "published_recipes"
SECTIONS = ("data", "model", "optim")
"""The sections a published recipe may set."""


def datasets_with_recipes() -> list[str]:
    """The datasets whose methods' published recipes ship in trainers/published_recipes/."""
    return sorted(path.stem for path in RECIPES.glob("*.yaml"))


@cache
def recipes(dataset: str) -> dict[str, dict[str, Any] | None]:
    """Method name -> its published recipe on `dataset`, None where it publishes none (see `read_recipes`)."""
    path = RECIPES / f"{dataset}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"protocol: published: no published recipes for dataset {dataset!r} "
            f"(trainers/published_recipes/ has {datasets_with_recipes()})"
        )
    return read_recipes(path)


def read_recipes(path: Path) -> dict[str, dict[str, Any] | None]:
    """A recipe file, every method's entry checked; one ConfigError naming the file and the key (a method
    missing, a section a recipe may not set, a value its TrainConfig key refuses). Every method must be
    present; `null` says its repository publishes no recipe for the dataset."""
    from trainers.methods import METHODS

    table = load_yaml(path)
    for method in METHODS:
        if method not in table:
            raise ConfigError(
                f"{path}: {method}: missing (a mapping of data/model/optim keys, or null where the "
                f"method publishes no recipe for this dataset)"
            )
        recipe = table[method]
        if recipe is None:
            continue
        if not isinstance(recipe, dict):
            raise ConfigError(
                f"{path}: {method}: expected a mapping of data/model/optim keys, got {recipe!r}"
            )
        for section in recipe:
            if section not in SECTIONS:
                raise ConfigError(f"{path}: {method}.{section}: a recipe sets only {list(SECTIONS)}")
        try:
            from_dict(TrainConfig, merge(recipe, {"method": {"name": method}}))
        except ConfigError as exc:
            raise ConfigError(f"{path}: {method}.{exc}") from None
    return table


def apply(protocol: str, base: dict[str, Any], dataset: str, method: str) -> dict[str, Any]:
    """`base` (a partial TrainConfig) with `method`'s recipe on `dataset` merged in under `published`,
    unchanged under `unified`; one ConfigError under `published` where the method publishes no recipe
    for `dataset`."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol: expected one of {list(PROTOCOLS)}, got {protocol!r}")
    if protocol == "unified":
        return base
    recipe = recipes(dataset)[method]
    if recipe is None:
        raise ConfigError(
            f"protocol: published: {method} publishes no {dataset} recipe "
            f"(trainers/published_recipes/{dataset}.yaml)"
        )
    return merge(base, recipe)
