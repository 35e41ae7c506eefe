"""Site training cases: NIfTI arrays are read in nodal's (slice, row, column) order."""

import nibabel as nib
import numpy as np

from inference.training_data import file_case, read_site_case


def test_nifti_case_is_turned_into_slice_row_column_order(tmp_path):
    # an (x, y, z) = (40, 30, 12) image, 0.8 x 0.8 x 2.5 mm, with one box-shaped node that is
    # 16 mm along x, 8 mm along y and 10 mm along z
    hu = np.full((40, 30, 12), -100.0, np.float32)
    lab = np.zeros(hu.shape, np.uint8)
    lab[10:30, 10:20, 4:8] = 2
    hu[lab > 0] = 40.0
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(lab, affine), tmp_path / "label.nii.gz")

    image, spacing, label = read_site_case(tmp_path / "ct.nii.gz", tmp_path / "label.nii.gz")
    assert image.shape == label.shape == (12, 30, 40)
    assert np.allclose(spacing, (2.5, 0.8, 0.8))
    assert image[5, 15, 20] == 40.0 and label[5, 15, 20] == 2

    case = file_case(tmp_path / "ct.nii.gz", tmp_path / "label.nii.gz", 1.0)
    assert case.malignant == {1: True}
    short, long = case.axes_mm[1]
    assert abs(short - 8) <= 1.0 and abs(long - 16) <= 1.0  # in-plane (axial) axes
