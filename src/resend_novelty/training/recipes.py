"""Named pretraining recipes, read from the package data files next to this module.

``recipes.json`` holds the recipes of the pretraining ablation study
(``benchmarks/pretrain_ablation.py``): a ``base`` of :class:`~resend_novelty.training.TrainConfig`
overrides and, per recipe, the overrides on top of it (a ``model`` dict is merged into the
base's, not replaced). ``shipped_recipe.json`` records the recipe of the checkpoint shipped in
the package, the overrides applied to it, the scoring defaults and backbone chosen after
training, and how each choice was made (``tools/make_shipped_checkpoint.py`` regenerates the
checkpoint from it).

A recipe is a plain dict of TrainConfig keyword arguments without ``data`` and ``out``::

    cfg = TrainConfig(data="DATA/tiny_imagenet_200/train", out="runs/x", **load_recipe("l2"))
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from importlib import resources

__all__ = ["recipe_names", "load_recipe", "base_recipe", "shipped_recipe"]


@lru_cache(maxsize=None)
def _read(name: str) -> dict:
    return json.loads((resources.files(__package__) / name).read_text(encoding="utf-8"))


def _merged(recipe: dict, overrides: dict | None) -> dict:
    """``recipe`` updated with ``overrides``; their ``model`` dicts are merged."""
    out = copy.deepcopy(recipe)
    over = copy.deepcopy(overrides or {})
    out["model"] = {**out.get("model", {}), **over.pop("model", {})}
    out.update(over)
    return out


def recipe_names() -> list[str]:
    """The names of the recipes, in the order of the ablation study."""
    return list(_read("recipes.json")["recipes"])


def base_recipe(overrides: dict | None = None) -> dict:
    """The base of every recipe, with ``overrides`` applied (a ``model`` dict merged)."""
    return _merged(_read("recipes.json")["base"], overrides)


def load_recipe(name: str, overrides: dict | None = None) -> dict:
    """The TrainConfig keyword arguments of recipe ``name`` (a fresh dict), with ``overrides``
    applied on top (a ``model`` dict merged). Unknown names raise :class:`ValueError`."""
    recipes = _read("recipes.json")["recipes"]
    if name not in recipes:
        raise ValueError(f"unknown recipe {name!r}; known: {list(recipes)}")
    return _merged(base_recipe(recipes[name]["overrides"]), overrides)


def shipped_recipe() -> dict:
    """The record of the shipped checkpoint: ``name`` (a recipe), ``overrides`` (applied to it
    for training), ``scoring`` (the model's scoring defaults set after training), ``backbone``
    (the features it reads, chosen after training) and ``selection`` (how they were chosen)."""
    return copy.deepcopy(_read("shipped_recipe.json"))
