"""Writing small DICOM series for tests (SimpleITK), as a scanner export would be."""
from pathlib import Path

import numpy as np


def write_dicom_series(array_xyz: np.ndarray, affine: np.ndarray, folder: Path, shift_per_slice=(0.0, 0.0, 0.0)) -> None:
    """One axial slice per file, LPS geometry, as a scanner export would be. `shift_per_slice` (mm, LPS)
    moves slice z's position by z times that vector: a gantry-tilted (sheared) stack."""
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    lps = np.diag([-1.0, -1.0, 1.0])
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    direction = lps @ affine[:3, :3] / spacing
    vol = sitk.GetImageFromArray(np.transpose(array_xyz, (2, 1, 0)))
    vol.SetSpacing([float(s) for s in spacing])
    vol.SetOrigin([float(v) for v in lps @ affine[:3, 3]])
    vol.SetDirection([float(v) for v in direction.ravel()])
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.42"
    dir_tag = "\\".join(f"{v:.6f}" for v in (list(direction[:, 0]) + list(direction[:, 1])))
    for z in range(vol.GetDepth()):
        sl = vol[:, :, z]
        for tag, value in (("0008|0060", "CT"), ("0020|000e", series_uid), ("0020|000d", series_uid + ".0"),
                           ("0008|0018", f"{series_uid}.{z + 1}"), ("0020|0037", dir_tag),
                           ("0020|0032", "\\".join(f"{v + z * d:.6f}" for v, d in zip(vol.TransformIndexToPhysicalPoint((0, 0, z)),
                                                                           shift_per_slice))),
                           ("0020|0013", str(z + 1)), ("0018|0050", f"{spacing[2]:.6f}"),
                           ("0028|1052", "0"), ("0028|1053", "1")):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{z:04d}.dcm"))
        writer.Execute(sl)
