"""Model configs: architecture vs scoring, validation, legacy combined dicts, the registry."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from resend_novelty.models import (
    ARCH_CLASSES,
    ARCHS,
    FORMAT,
    NORMALITIES,
    AggregationModule,
    RelationalConfig,
    RelationalModule,
    ScoringConfig,
    build_relational,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
    sdpa_attention,
    split_config,
)

_ARCH = dict(feature_dim=16, dim=32, depth=2, heads=4)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(normality="energy"), "normality must be one of"),
        (dict(neighbors=-1), "neighbors must be >= 0"),
        (dict(neighbor_weight=1.5), r"neighbor_weight must be in \[0, 1\]"),
        (dict(neighbor_weight=-0.1), r"neighbor_weight must be in \[0, 1\]"),
    ],
)
def test_scoring_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        ScoringConfig(**kw)


def test_scoring_defaults_dict_roundtrip_and_unknown_keys():
    assert ScoringConfig() == ScoringConfig("softmax", 0, 1.0)
    assert NORMALITIES == ("softmax", "max-logit")
    s = ScoringConfig(normality="max-logit", neighbors=10, neighbor_weight=0.5)
    assert ScoringConfig.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match=r"unknown scoring-config keys: \['dim'\]"):
        ScoringConfig.from_dict({"dim": 3})


def test_relational_config_has_no_scoring_fields():
    assert not {"normality", "neighbors", "neighbor_weight"} & set(RelationalConfig().to_dict())
    with pytest.raises(ValueError, match=r"unknown relational-config keys: \['normality'\]"):
        RelationalConfig.from_dict({"normality": "softmax"})


def test_split_config_routes_legacy_keys():
    arch, scoring = split_config({"normality": "max-logit", "dim": 64, "neighbors": 3})
    assert arch == RelationalConfig(dim=64)
    assert scoring == ScoringConfig(normality="max-logit", neighbors=3)
    assert split_config({}) == (RelationalConfig(), ScoringConfig())
    with pytest.raises(ValueError, match="unknown relational-config keys"):
        split_config({"wings": 2})
    with pytest.raises(ValueError, match="neighbor_weight"):
        split_config({"neighbor_weight": 2.0})


def test_modules_carry_a_scoring():
    assert RelationalModule(RelationalConfig(**_ARCH)).scoring == ScoringConfig()
    s = ScoringConfig(normality="max-logit")
    assert RelationalModule(RelationalConfig(**_ARCH), s).scoring is s
    # keyword arguments may mix architecture and scoring fields
    m = RelationalModule(**_ARCH, normality="max-logit", neighbors=4)
    assert m.config == RelationalConfig(**_ARCH)
    assert m.scoring == ScoringConfig(normality="max-logit", neighbors=4)
    with pytest.raises(TypeError, match="not both"):
        RelationalModule(scoring=s, **_ARCH, normality="softmax")
    agg = AggregationModule(**_ARCH, arch="max", neighbors=2)
    assert agg.scoring == ScoringConfig(neighbors=2)


def test_registry_builds_every_arch():
    assert tuple(ARCH_CLASSES) == ARCHS
    s = ScoringConfig(neighbors=1)
    for arch in ARCHS:
        m = build_relational(RelationalConfig(**_ARCH, arch=arch), s)
        assert type(m) is ARCH_CLASSES[arch] and m.scoring is s and m.config.arch == arch
    assert build_relational(RelationalConfig(**_ARCH)).scoring == ScoringConfig()
    with pytest.raises(ValueError, match="ablation model"):
        RelationalModule(RelationalConfig(**_ARCH, arch="sum"))


def test_checkpoint_stores_the_scoring_next_to_the_config(tmp_path):
    s = ScoringConfig(normality="max-logit", neighbors=5, neighbor_weight=0.25)
    m = RelationalModule(RelationalConfig(**_ARCH), s)
    path = tmp_path / "m.safetensors"
    save_checkpoint(m, path)
    meta = read_metadata(path)
    assert json.loads(meta["config"]) == m.config.to_dict()
    assert json.loads(meta["scoring"]) == s.to_dict()
    back = load_checkpoint(path)
    assert back.config == m.config and back.scoring == s


def test_legacy_checkpoint_with_scoring_inside_the_config(tmp_path):
    """Files whose "config" still holds normality / neighbors / neighbor_weight keep them."""
    torch.manual_seed(0)
    m = RelationalModule(RelationalConfig(**_ARCH))
    legacy = {**m.config.to_dict(), "normality": "max-logit", "neighbors": 10,
              "neighbor_weight": 0.5}
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path),
              metadata={"format": FORMAT, "config": json.dumps(legacy)})
    back = load_checkpoint(path)
    assert back.config == m.config
    assert back.scoring == ScoringConfig(normality="max-logit", neighbors=10, neighbor_weight=0.5)
    # no scoring anywhere: the defaults
    path2 = tmp_path / "older.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path2),
              metadata={"format": FORMAT, "config": json.dumps(m.config.to_dict())})
    assert load_checkpoint(path2).scoring == ScoringConfig()


def test_pairwise_logits_options_compute_the_same_function():
    torch.manual_seed(0)
    m = RelationalModule(RelationalConfig(**_ARCH)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        q, k = torch.randn(7, 16), torch.randn(3, 16)
        ref = m.pairwise_logits(q, k)
        torch.testing.assert_close(m.pairwise_logits(q, k, shared_work=False), ref,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.pairwise_logits(q, k, attention=sdpa_attention), ref,
                                   atol=1e-5, rtol=1e-5)
        m2 = RelationalModule(m.config, attention=sdpa_attention).eval()
        m2.load_state_dict(m.state_dict())
        torch.testing.assert_close(m2.pairwise_logits(q, k), ref, atol=1e-5, rtol=1e-5)
    assert ref.std() > 1e-2


def test_pairwise_logits_attention_option_is_used(monkeypatch):
    m = RelationalModule(RelationalConfig(**_ARCH)).eval()
    calls = []

    def spy(q, k, v, heads):
        calls.append(heads)
        return sdpa_attention(q, k, v, heads)

    with torch.no_grad():
        m.pairwise_logits(torch.randn(2, 16), torch.randn(2, 16), attention=spy)
        assert calls == [4, 4]  # one call per block
        m.pairwise_logits(torch.randn(2, 16), torch.randn(2, 16), attention=spy, shared_work=False)
    assert calls == [4, 4]  # the generic path does not use it
