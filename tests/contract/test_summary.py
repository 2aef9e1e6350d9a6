"""The summary type: output table, validation of raw encoder outputs, batch indexing and concatenation."""

from __future__ import annotations

import numpy as np
import pytest

from tokenline import manifest as mf
from tokenline.summary import Layout, Summary, SummaryError, output_names, output_shapes

OLD = "informativity"  # the summary of models exported before the slic head: sizes and centroids as outputs


def _lay(k: int = 4, d: int = 8) -> Layout:
    return Layout(k=k, dim=d, token_dim=d)


def _raw(b: int, k: int = 4, d: int = 8):
    rng = np.random.default_rng(b)
    return [rng.normal(size=s).astype(np.float64) for _, s in output_shapes(OLD, _lay(k, d), b)]


def test_output_shapes_follow_k_and_d():
    assert output_shapes(OLD, _lay(4, 8)) == [("global_embedding", (8,)), ("summary_tokens", (4, 8)),
                                              ("summary_sizes", (4,)), ("summary_centroids", (4, 2))]
    assert [s for _, s in output_shapes(OLD, _lay(3, 5), 2)] == [(2, 5), (2, 3, 5), (2, 3), (2, 3, 2)]
    specs = mf.output_specs(OLD, _lay(4, 8), None)
    assert [t.name for t in specs] == list(output_names(OLD))
    assert specs[1].shape == (-1, 4, 8)
    with pytest.raises(SummaryError, match="unknown summary method"):
        output_names("nope")


def test_from_outputs_checks_and_converts():
    s = Summary.from_outputs(_raw(2), OLD, _lay(), 2)
    assert s.batched and len(s) == 2 and s.k == 4 and s.dim == 8 and s.footprint is None
    assert all(a.dtype == np.float32 for a in s.arrays().values())
    one = s[1]
    assert not one.batched and one.tokens.shape == (4, 8) and one.centroids.shape == (4, 2)
    with pytest.raises(TypeError):
        len(one)


@pytest.mark.parametrize("bad", ["count", "shape", "nan"])
def test_from_outputs_names_the_bad_tensor(bad):
    raw = _raw(2)
    if bad == "count":
        raw = raw[:3]
    elif bad == "shape":
        raw[2] = raw[2][:, :3]
    else:
        raw[1][0, 0, 0] = np.nan
    with pytest.raises(SummaryError) as exc:
        Summary.from_outputs(raw, OLD, _lay(), 2)
    assert {"count": "expected 4", "shape": "summary_sizes", "nan": "summary_tokens"}[bad] in str(exc.value)


def test_concat_drops_padding():
    a, b = Summary.from_outputs(_raw(2), OLD, _lay(), 2), Summary.from_outputs(_raw(3), OLD, _lay(), 3)
    c = Summary.concat([a, b], 4)
    assert len(c) == 4
    np.testing.assert_array_equal(c.tokens[2], b.tokens[0])
    with pytest.raises(SummaryError):
        Summary.concat([])
