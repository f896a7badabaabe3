"""MNI152 loader (files of the nilearn wheel, nilearn never imported) and the numpy CLAHE."""
import importlib.util
import sys

import numpy as np
import pytest
import torch

from medattn_kernels.data import mri

needs_nilearn = pytest.mark.skipif(importlib.util.find_spec("nilearn") is None or
                                   importlib.util.find_spec("nibabel") is None,
                                   reason="needs the nilearn wheel's data files and nibabel")


@pytest.fixture(scope="module")
def splits():
    return mri.load_mni_splits(64)


@needs_nilearn
def test_splits_shapes_labels_and_ranges(splits):
    train, val = splits
    assert "nilearn" not in sys.modules, "the loader must not import nilearn"
    for part in (train, val):
        assert part.image.shape == part.enhanced.shape == (len(part), 1, 64, 64)
        assert part.label.shape == (len(part), 64, 64) and part.label.dtype == torch.int64
        assert part.image.dtype == torch.float32
        assert 0 <= part.image.min() and part.image.max() <= 1
        assert 0 <= part.enhanced.min() and part.enhanced.max() <= 1
        assert set(part.label.unique().tolist()) == {0, 1, 2}
        # every kept slice has brain in it
        assert ((part.label > 0).flatten(1).float().mean(1) > 0.01).all()
    # every 5th brain slice held out, disjoint from training, roughly a fifth
    assert set(train.slice_index.tolist()).isdisjoint(val.slice_index.tolist())
    n = len(train) + len(val)
    assert abs(len(val) - n / 5) <= 1
    all_idx = torch.sort(torch.cat([train.slice_index, val.slice_index])).values
    held = torch.isin(all_idx, val.slice_index).nonzero().flatten()
    assert (held.diff() == 5).all()
    # tissue fractions plausible: GM and WM each a sizeable share of the slices
    fractions = train.class_fractions()
    assert 0.1 < fractions[1] < 0.4 and 0.05 < fractions[2] < 0.3


@needs_nilearn
def test_split_argument_matches_load_splits(splits):
    train, val = splits
    val_only = mri.load_mni_slices(64, split="val")
    assert torch.equal(val_only.slice_index, val.slice_index)
    assert torch.equal(val_only.label, val.label)
    assert torch.allclose(val_only.image, val.image)


@needs_nilearn
def test_labels_follow_the_probability_maps():
    """A pixel labelled WM has WM probability >= threshold in the resized maps, i.e. raising the
    threshold only removes tissue labels."""
    lo = mri.load_mni_slices(32, split="all", threshold=0.3)
    hi = mri.load_mni_slices(32, split="all", threshold=0.7)
    in_hi, in_lo = torch.isin(hi.slice_index, lo.slice_index), torch.isin(lo.slice_index, hi.slice_index)
    assert in_hi.sum() > 5
    tissue_hi, tissue_lo = hi.label[in_hi] > 0, lo.label[in_lo] > 0
    assert not (tissue_hi & ~tissue_lo).any()
    assert tissue_hi.sum() < tissue_lo.sum()


def test_clahe_range_monotone_and_contrast():
    rng = np.random.default_rng(0)
    # a low-contrast image: values squeezed into [0.4, 0.5] with a smooth gradient
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    img = (0.4 + 0.1 * (0.5 * yy + 0.5 * xx) + 0.005 * rng.standard_normal((64, 64))).clip(0, 1).astype(np.float32)
    out = mri.clahe(img, tiles=4, clip_limit=40.0)
    assert out.shape == img.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    assert out.std() > 5 * img.std(), "contrast is enhanced"
    # the clip limit bounds the enhancement: a low limit enhances less than a high one
    assert img.std() < mri.clahe(img, tiles=4, clip_limit=3.0).std() < out.std()
    # batched call equals per-image calls
    batch = np.stack([img, img[::-1].copy()])
    assert np.allclose(mri.clahe(batch, tiles=4, clip_limit=3.0)[1], mri.clahe(img[::-1].copy(), tiles=4, clip_limit=3.0))


def test_clahe_constant_image_stays_finite():
    out = mri.clahe(np.full((2, 33, 17), 0.3, dtype=np.float32), tiles=8)
    assert np.isfinite(out).all() and out.shape == (2, 33, 17)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        mri.load_mni_slices(64, split="test")
    with pytest.raises(ValueError, match="size"):
        mri.load_mni_slices(4)
