"""The table of shipped backbone weights agrees with the files and the backbones that load them."""

from __future__ import annotations

import json
import os

from resend_novelty import backbones
from resend_novelty.backbones import BACKBONES, SHIPPED_WEIGHTS, ShippedWeights
from resend_novelty.integrity import sha256_file


def test_table_matches_the_recorded_hashes_and_files():
    assert set(SHIPPED_WEIGHTS) == {"efficientnet_lite0_ft", "efficientnet_lite1_ft"}
    for name, entry in SHIPPED_WEIGHTS.items():
        assert isinstance(entry, ShippedWeights)
        assert os.path.isfile(entry.path) and entry.path.endswith(entry.file)
        recorded = json.loads(open(entry.path + ".json").read())["sha256"]
        assert entry.sha256 == recorded == sha256_file(entry.path)
        assert entry.verified_path() == entry.path
        assert entry.recipe and entry.trained_on
        # the registered backbone of that name loads this file
        assert BACKBONES[name].shipped_weights == name


def test_registry_is_one_dict_object():
    from resend_novelty.backbones import registry

    assert backbones.BACKBONES is registry.BACKBONES
