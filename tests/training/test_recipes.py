"""Named pretraining recipes: package data read through resend_novelty.training."""

from __future__ import annotations

import pytest

from resend_novelty.models import split_config
from resend_novelty.training import (TrainConfig, base_recipe, load_recipe, recipe_names,
                                     shipped_recipe)


def test_every_recipe_builds_a_train_config_and_its_model():
    names = recipe_names()
    assert names and len(set(names)) == len(names)
    for name in names:
        kw = load_recipe(name)
        cfg = TrainConfig(data="x", out="y", **kw)
        arch, _ = split_config({**cfg.model, "feature_dim": 16})
        assert arch.dim == kw["model"]["dim"]


def test_overrides_merge_the_model_dict_and_results_are_fresh():
    base = base_recipe()
    kw = load_recipe("l2 + input dropout 0.5", {"lr": 1e-3, "model": {"normality": "max-logit"}})
    assert kw["lr"] == 1e-3 and kw["steps"] == base["steps"]
    assert kw["model"] == {**base["model"], "input_dropout": 0.5, "normality": "max-logit"}
    kw["model"]["dim"] = -1  # a copy: the next read is unchanged
    assert load_recipe("l2 + input dropout 0.5")["model"]["dim"] == base["model"]["dim"]
    assert load_recipe("l2") == base


def test_unknown_recipe_is_named():
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        load_recipe("nope")


def test_shipped_recipe_names_a_recipe_and_valid_scoring():
    ch = shipped_recipe()
    assert ch["name"] in recipe_names()
    kw = load_recipe(ch["name"], ch["overrides"])
    _, scoring = split_config({**kw["model"], **ch["scoring"]})
    assert (scoring.normality, scoring.neighbors, scoring.neighbor_weight) == ("max-logit", 10, 0.5)
    assert ch["backbone"] == "efficientnet_lite0_ft+efficientnet_lite1_ft"
