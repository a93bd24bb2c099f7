"""Relational module: symmetry, shapes, pairwise == loop, chunking, config validation."""

from __future__ import annotations

import pytest
import torch

from resend_novelty.models import RelationalConfig, RelationalModule


def _model(seed=0, **kw) -> RelationalModule:
    torch.manual_seed(seed)
    cfg = dict(feature_dim=16, dim=32, depth=2, heads=4)
    cfg.update(kw)
    m = RelationalModule(RelationalConfig(**cfg))
    # the default init (std 0.02) makes every output almost equal; spread the weights so that
    # a broken symmetry or a wrong pairing would show up
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m.eval()


def test_output_is_symmetric_in_i_j():
    m = _model()
    a, b = torch.randn(64, 16), torch.randn(64, 16)
    ab, ba = m(a, b), m(b, a)
    assert ab.std() > 1e-2, "outputs should vary with the pair"
    torch.testing.assert_close(ab, ba, atol=1e-5, rtol=0)
    # also for the un-normalised variant
    m2 = _model(input_norm="none")
    torch.testing.assert_close(m2(a, b), m2(b, a), atol=1e-5, rtol=0)


def test_shapes():
    m = _model()
    f = torch.randn(5, 16)
    z = m.encode(f)
    assert z.shape == (5, 32)
    assert m.relate(z, z.flip(0)).shape == (5,)
    assert m(f, f).shape == (5,)
    assert m.pairwise_logits(f, torch.randn(3, 16)).shape == (5, 3)
    assert m.pairwise_logits(f, torch.randn(3, 16)).dtype == torch.float32


@pytest.mark.parametrize("mode", ["eval", "train"])  # eval may take a shared-work fast path
@pytest.mark.parametrize("depth", [1, 3])
def test_pairwise_logits_equals_looping_forward(mode, depth):
    m = _model(depth=depth)
    m.train(mode == "train")  # (dropout 0: train mode computes the same function)
    q, k = torch.randn(5, 16), torch.randn(3, 16)
    with torch.no_grad():
        pw = m.pairwise_logits(q, k)
        loop = torch.stack([torch.stack([m(q[i : i + 1], k[j : j + 1])[0] for j in range(3)])
                            for i in range(5)])
    torch.testing.assert_close(pw, loop, atol=1e-5, rtol=1e-5)
    assert pw.std() > 1e-2


def test_pairwise_logits_with_no_queries():
    m = _model()
    assert m.pairwise_logits(torch.randn(0, 16), torch.randn(3, 16)).shape == (0, 3)
    with pytest.raises(ValueError, match="expects 16"):
        m.pairwise_logits(torch.randn(0, 8), torch.randn(3, 16))


@pytest.mark.parametrize("chunk", [1, 3, 4, 5, 27, 10**6])
def test_chunking_gives_the_same_result(chunk):
    m = _model()
    q, k = torch.randn(9, 16), torch.randn(4, 16)
    with torch.no_grad():
        ref = m.pairwise_logits(q, k)
        got = m.pairwise_logits(q, k, chunk_pairs=chunk)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_l2_input_norm_makes_scale_irrelevant():
    m = _model()
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    torch.testing.assert_close(m(3.0 * a, 0.5 * b), m(a, b), atol=1e-5, rtol=1e-5)
    m2 = _model(input_norm="none")
    assert not torch.allclose(m2(3.0 * a, b), m2(a, b), atol=1e-3)


def test_eval_is_deterministic_with_dropout_configured():
    m = _model(dropout=0.5, input_dropout=0.5)
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    torch.testing.assert_close(m(a, b), m(a, b))
    m.train()
    assert not torch.allclose(m(a, b), m(a, b))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(input_norm="l1"), "input_norm must be"),
        (dict(dim=30, heads=4), r"dim \(30\) must be divisible by heads \(4\)"),
        (dict(feature_dim=0), "feature_dim must be positive"),
        (dict(depth=-1), "depth must be positive"),
        (dict(heads=0), "heads must be positive, got 0"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        RelationalConfig(**kw)


def test_config_dict_roundtrip_and_unknown_keys():
    cfg = RelationalConfig(feature_dim=16, dim=32, heads=2, depth=1, backbone="x")
    assert RelationalConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown relational-config keys: \['bogus'\]"):
        RelationalConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(TypeError, match="either a config or keyword"):
        RelationalModule(cfg, dim=64)
    m = RelationalModule(feature_dim=16, dim=32, heads=2, depth=1)
    assert m.config.dim == 32 and len(m.blocks) == 1


def test_feature_dimension_mismatch_is_a_clear_error():
    m = _model()
    with pytest.raises(ValueError, match=r"dimension 12, the relational module expects 16"):
        m(torch.randn(2, 12), torch.randn(2, 12))
    with pytest.raises(ValueError, match="expects 16"):
        m.pairwise_logits(torch.randn(2, 16), torch.randn(3, 20))
