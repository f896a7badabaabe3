"""Real brain MRI with tissue labels, without network access: the MNI152 2009c (sym, 1 mm) T1 template
and its grey / white matter probability maps, which ship as data files inside the `nilearn` wheel.

nilearn itself is never imported (it pulls scikit-learn, pandas...): the files are located through
`importlib.util.find_spec("nilearn").submodule_search_locations` and read with nibabel.

What `load_mni_slices` builds, per axial slice (the volume's third axis) that contains brain:

* ``image``: the T1 slice, cropped to the head's bounding box (the same box for every slice), padded
  to a square, resized to ``size x size`` (bilinear, antialiased) and normalised to [0, 1] by its own
  1st / 99.5th intensity percentiles over the head;
* ``enhanced``: a CLAHE-like contrast-enhanced copy of ``image`` (`clahe` below, numpy). DIN feeds it
  to its second encoder; CrossModalSADNet uses it as its *second modality* (the template has a single
  modality, so the "cross-modal" demo is really original vs enhanced T1);
* ``label``: 0 background, 1 grey matter, 2 white matter: the GM / WM probability maps are resized
  like the image, then a pixel is labelled with the more probable tissue when that probability is at
  least ``threshold`` (default 0.5), else background (CSF, skull, air).

Every ``val_every``-th brain slice (default 5th) is held out for validation, the rest are training
slices. Neighbouring slices of one template are similar, so this measures interpolation between
slices, not generalisation across subjects: the demo shows the kernels train a real network on real
anatomy, it is not a clinical benchmark.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

CLASS_NAMES = ("background", "grey matter", "white matter")
_FILE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


def nilearn_data_dir() -> str:
    """Folder holding the MNI152 files inside the installed nilearn package (not imported)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the MNI152 template ships with nilearn: `pip install --no-deps nilearn` "
                                "(only its data files are used; nilearn is never imported)")
    for root in spec.submodule_search_locations:
        folder = os.path.join(root, "datasets", "data")
        if os.path.exists(os.path.join(folder, _FILE.format("t1"))):
            return folder
    raise FileNotFoundError(f"{_FILE.format('t1')} not found under {list(spec.submodule_search_locations)}")


def load_mni_volumes() -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t1, gm, wm) as float32 volumes [X, Y, Z]; t1 in its stored range, gm / wm probabilities in [0, 1]."""
    import nibabel

    folder = nilearn_data_dir()

    def read(name):
        return np.asarray(nibabel.load(os.path.join(folder, _FILE.format(name))).dataobj, dtype=np.float32)

    t1, gm, wm = read("t1"), read("gm"), read("wm")
    # The wheel stores the probability maps as uint8 0..255; rescale whatever the storage range is.
    gm, wm = gm / max(gm.max(), 1e-6), wm / max(wm.max(), 1e-6)
    return t1, gm, wm


def clahe(image: np.ndarray, tiles: int = 8, clip_limit: float = 2.0, bins: int = 256) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of images in [0, 1] (numpy, vectorised).

    image: [..., H, W]. The image is cut into ``tiles x tiles`` tiles; each tile's histogram is clipped
    at ``clip_limit`` times its mean bin count, the excess is spread over all bins, and its cumulative
    sum is the tile's intensity mapping. Each pixel's output blends the mappings of the four nearest
    tile centres bilinearly (as OpenCV's CLAHE does), so there are no tile seams.
    """
    img = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    lead, (h, w) = img.shape[:-2], img.shape[-2:]
    img = img.reshape(-1, h, w)
    n = img.shape[0]
    th, tw = -(-h // tiles), -(-w // tiles)  # tile size, padding the image (reflect) to a multiple
    padded = np.pad(img, ((0, 0), (0, th * tiles - h), (0, tw * tiles - w)), mode="reflect")
    q = np.minimum((padded * bins).astype(np.int64), bins - 1)
    # Histogram of every (image, tile) at once: one bincount over offset bin indices.
    tile_id = (np.arange(n)[:, None, None] * tiles + np.arange(tiles * th)[None, :, None] // th) * tiles \
        + np.arange(tiles * tw)[None, None, :] // tw
    hist = np.bincount((tile_id * bins + q).ravel(), minlength=n * tiles * tiles * bins)
    hist = hist.reshape(n, tiles, tiles, bins).astype(np.float64)
    limit = max(clip_limit * th * tw / bins, 1.0)
    excess = np.maximum(hist - limit, 0.0).sum(-1, keepdims=True)
    hist = np.minimum(hist, limit) + excess / bins
    lut = np.cumsum(hist, -1)
    lut = (lut - lut[..., :1]) / np.maximum(lut[..., -1:] - lut[..., :1], 1e-12)  # [n, tiles, tiles, bins]
    # Bilinear blend between tile centres; outside the outermost centres the nearest tile is used.
    qi = np.minimum((img * bins).astype(np.int64), bins - 1)
    fy = np.clip((np.arange(h) + 0.5) / th - 0.5, 0, tiles - 1)
    fx = np.clip((np.arange(w) + 0.5) / tw - 0.5, 0, tiles - 1)
    y0, x0 = np.floor(fy).astype(np.int64), np.floor(fx).astype(np.int64)
    y1, x1 = np.minimum(y0 + 1, tiles - 1), np.minimum(x0 + 1, tiles - 1)
    wy, wx = (fy - y0)[None, :, None], (fx - x0)[None, None, :]
    b = np.arange(n)[:, None, None]

    def mapped(ty, tx):
        return lut[b, ty[None, :, None], tx[None, None, :], qi]

    out = (1 - wy) * ((1 - wx) * mapped(y0, x0) + wx * mapped(y0, x1)) \
        + wy * ((1 - wx) * mapped(y1, x0) + wx * mapped(y1, x1))
    return out.astype(np.float32).reshape(*lead, h, w)


@dataclass
class MRISlices:
    """Axial slices: image / enhanced [N, 1, S, S] float32 in [0, 1], label [N, S, S] int64 (0 bg, 1 GM,
    2 WM), slice_index [N] (the z index in the template)."""

    image: torch.Tensor
    enhanced: torch.Tensor
    label: torch.Tensor
    slice_index: torch.Tensor

    def __len__(self) -> int:
        return self.image.shape[0]

    def subset(self, idx) -> "MRISlices":
        return MRISlices(self.image[idx], self.enhanced[idx], self.label[idx], self.slice_index[idx])

    def class_fractions(self) -> torch.Tensor:
        return torch.bincount(self.label.flatten(), minlength=len(CLASS_NAMES)).double() / self.label.numel()


def _square_crop_box(mask2d: np.ndarray, margin: int = 4) -> Tuple[slice, slice, int]:
    ys, xs = np.nonzero(mask2d)
    y0, y1 = max(ys.min() - margin, 0), min(ys.max() + margin + 1, mask2d.shape[0])
    x0, x1 = max(xs.min() - margin, 0), min(xs.max() + margin + 1, mask2d.shape[1])
    return slice(y0, y1), slice(x0, x1), max(y1 - y0, x1 - x0)


def _resize(t: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=t.shape[-1] > size)


def load_mni_slices(size: int = 128, split: str = "all", val_every: int = 5, threshold: float = 0.5,
                    min_brain_fraction: float = 0.02, clahe_tiles: int = 8,
                    clahe_clip: float = 2.0) -> MRISlices:
    """Axial MNI152 slices with brain content (see the module docstring).

    Args:
        size: output side in pixels.
        split: "train" (all but every val_every-th brain slice), "val" (every val_every-th) or "all".
        threshold: minimum GM or WM probability for a tissue label.
        min_brain_fraction: a slice is kept when GM + WM labels cover at least this fraction of the
            cropped slice at full resolution.
    """
    if split not in ("train", "val", "all"):
        raise ValueError(f"split: expected 'train', 'val' or 'all', got {split!r}")
    if size < 8:
        raise ValueError(f"size: expected at least 8 pixels, got {size}")
    if val_every < 2:
        raise ValueError(f"val_every: expected >= 2, got {val_every}")
    t1, gm, wm = load_mni_volumes()
    # Axial slices [Z, Y, X], flipped so that anterior is up when shown with imshow.
    t1, gm, wm = (np.ascontiguousarray(v.transpose(2, 1, 0)[:, ::-1, :]) for v in (t1, gm, wm))
    head = t1 > 0.05 * t1.max()
    ys, xs, side = _square_crop_box(head.any(0))
    brain = np.maximum(gm, wm)[:, ys, xs] >= threshold
    keep = np.nonzero(brain.mean((1, 2)) >= min_brain_fraction)[0]
    held_out = np.arange(len(keep)) % val_every == val_every // 2  # every val_every-th, not the edge
    if split != "all":
        keep = keep[held_out] if split == "val" else keep[~held_out]

    def square(v):
        c = v[keep][:, ys, xs]
        ph, pw = side - c.shape[1], side - c.shape[2]
        return torch.from_numpy(np.pad(c, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))))

    image = _resize(square(t1).unsqueeze(1), size)
    head_mask = _resize(square(head.astype(np.float32)).unsqueeze(1), size) > 0.5
    probs = _resize(torch.stack([square(gm), square(wm)], 1), size)
    # Percentile normalisation per slice over the head (robust to the bright scalp / skull voxels).
    flat, mask = image.flatten(1), head_mask.flatten(1)
    lo = torch.stack([torch.quantile(f[m], 0.01) if m.any() else f.min() for f, m in zip(flat, mask)])
    hi = torch.stack([torch.quantile(f[m], 0.995) if m.any() else f.max() for f, m in zip(flat, mask)])
    image = ((image - lo[:, None, None, None]) / (hi - lo).clamp_min(1e-6)[:, None, None, None]).clamp(0, 1)
    best, which = probs.max(1)
    label = torch.where(best >= threshold, which + 1, torch.zeros_like(which)).long()
    enhanced = torch.from_numpy(clahe(image.numpy(), tiles=clahe_tiles, clip_limit=clahe_clip))
    return MRISlices(image.float().contiguous(), enhanced.contiguous(), label.contiguous(),
                     torch.from_numpy(keep.astype(np.int64)))


def load_mni_splits(size: int = 128, **kwargs) -> Tuple[MRISlices, MRISlices]:
    """(train, val) slices; one read of the volumes."""
    everything = load_mni_slices(size, split="all", **kwargs)
    val_every = kwargs.get("val_every", 5)
    held_out = torch.arange(len(everything)) % val_every == val_every // 2
    return everything.subset(~held_out), everything.subset(held_out)


def flip_batch(images: Tuple[torch.Tensor, ...], label: torch.Tensor, flips: torch.Tensor):
    """Left-right flips (the brain is roughly symmetric) of the slices where `flips` [B] is True."""
    out = tuple(torch.where(flips[:, None, None, None], im.flip(-1), im) for im in images)
    return out, torch.where(flips[:, None, None], label.flip(-1), label)
