"""Data for the demo and the examples (real MRI shipped with the nilearn wheel; see mri.py)."""
from .mri import CLASS_NAMES, MRISlices, clahe, load_mni_slices, load_mni_splits

__all__ = ["CLASS_NAMES", "MRISlices", "clahe", "load_mni_slices", "load_mni_splits"]
