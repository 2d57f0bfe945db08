"""Bad volume files: what a download, a converter or a disk can do to a NIfTI/DICOM file."""
from __future__ import annotations

import gzip

import numpy as np

from tests.badinputs import bad_input


def _nifti(path, data, affine=None):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


@bad_input("volume", match=r"corrupt or truncated", names=("{tmp}/ct.nii.gz",))
def case_truncated_gzip(tmp):
    from datamodules.io import read_volume

    path = _nifti(tmp / "ct.nii.gz", np.zeros((16, 16, 8), np.int16))
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    read_volume(path)
