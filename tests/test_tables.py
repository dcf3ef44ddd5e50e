"""Entropy tables: bit-exact against the fixture's entropy_tables.npz, and the CDF builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.checkpoints import extract, load_state_dict_file
from export.models.lfgcm import EntropyBottleneck, get_scale_table
from export.tables import (
    TABLE_KEYS,
    build_bottleneck_tables,
    build_gaussian_tables,
    build_tables,
    load_tables,
    pmf_to_quantized_cdf,
    save_tables,
)


@pytest.fixture(scope="module")
def golden(fixture_dir: Path) -> dict[str, np.ndarray]:
    with np.load(fixture_dir / "entropy_tables.npz") as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="module")
def eb(fixture_dir: Path) -> EntropyBottleneck:
    state = extract(load_state_dict_file(fixture_dir / "lc.ckpt"), "lfgcm")
    prefix = "entropy_bottleneck."
    sub = {k[len(prefix):]: v for k, v in state.items()
           if k.startswith(prefix) and not k.startswith(prefix + "_offset")
           and not k.startswith(prefix + "_quantized_cdf") and not k.startswith(prefix + "_cdf_length")}
    module = EntropyBottleneck(state[prefix + "quantiles"].shape[0])
    module.load_state_dict(sub, strict=True)
    return module


def _assert_same(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], keys: list[str]) -> None:
    for k in keys:
        assert ours[k].dtype == ref[k].dtype, k
        assert ours[k].shape == ref[k].shape, k
        diff = int(np.count_nonzero(ours[k] != ref[k]))
        assert diff == 0, f"{k}: {diff} entries differ"


def test_gaussian_tables_exact(golden: dict[str, np.ndarray]) -> None:
    ours = build_gaussian_tables()
    _assert_same(ours, golden, [k for k in TABLE_KEYS if k.startswith("gc_")])
    assert ours["gc_scale_table"][0] == np.float32(0.11) and ours["gc_scale_table"][63] == 256.0
    assert ours["gc_quantized_cdf"].shape == (64, 3133)


def test_bottleneck_tables_exact(eb: EntropyBottleneck, golden: dict[str, np.ndarray]) -> None:
    ours = build_bottleneck_tables(eb)
    _assert_same(ours, golden, [k for k in TABLE_KEYS if k.startswith("eb_")])


def test_all_tables_and_roundtrip(eb: EntropyBottleneck, golden: dict[str, np.ndarray], tmp_path: Path) -> None:
    tables = build_tables(eb, get_scale_table())
    assert set(tables) == set(TABLE_KEYS) == set(golden)
    path = tmp_path / "tables.npz"
    save_tables(path, tables)
    _assert_same(load_tables(path), golden, list(TABLE_KEYS))


def test_cdf_rows_are_valid(golden: dict[str, np.ndarray]) -> None:
    # Every row: starts at 0, ends at 65536, strictly increasing over its length.
    for prefix in ("gc", "eb"):
        cdf, lengths = golden[f"{prefix}_quantized_cdf"], golden[f"{prefix}_cdf_length"]
        for row, n in zip(cdf, lengths):
            r = row[:n]
            assert r[0] == 0 and r[-1] == 65536
            assert np.all(np.diff(r) >= 1)


def test_pmf_to_quantized_cdf_simple() -> None:
    cdf = pmf_to_quantized_cdf(np.array([0.25, 0.5, 0.25, 0.0], dtype=np.float32))
    # The zero-mass tail steals 1 from the first smallest frequency > 1 (symbol 0).
    assert cdf.tolist() == [0, 16383, 49151, 65535, 65536]


def test_pmf_to_quantized_cdf_steal_after() -> None:
    # Zero bin before the donor (symbol 2, the smallest frequency > 1): the CDF entries
    # between are incremented.
    cdf = pmf_to_quantized_cdf(np.array([0.0, 0.75, 0.25], dtype=np.float32))
    assert cdf.tolist() == [0, 1, 49153, 65536]
    assert int(np.diff(cdf).min()) == 1


def test_pmf_to_quantized_cdf_rounding_half_away() -> None:
    # p * 65536 = 0.5 rounds to 1 and 2.5 to 3 (std::round, not half-even); total 65536.
    p = np.array([0.5 / 65536, 2.5 / 65536, 65532 / 65536], dtype=np.float32)
    assert pmf_to_quantized_cdf(p).tolist() == [0, 1, 4, 65536]


def test_pmf_to_quantized_cdf_rescale() -> None:
    # q = [1, 3, 65536], total 65540: floor(q * 65536 / 65540) = [0, 2, 65531], prefix
    # sums [0, 0, 2, 65533], last forced to 65536; symbol 0 then steals 1 from symbol 1.
    p = np.array([1 / 65536, 3 / 65536, 1.0], dtype=np.float32)
    assert pmf_to_quantized_cdf(p).tolist() == [0, 1, 2, 65536]


def test_pmf_to_quantized_cdf_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        pmf_to_quantized_cdf(np.array([0.5, -0.1], dtype=np.float32))
    with pytest.raises(ValueError):
        pmf_to_quantized_cdf(np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError):
        pmf_to_quantized_cdf(torch.tensor([float("nan"), 1.0]))
