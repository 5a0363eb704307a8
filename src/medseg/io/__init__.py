"""Reading and writing volumes and label maps.

``read_volume`` and ``read_labels`` dispatch on the path: a folder is a DICOM series (see
:mod:`medseg.io.dicom`); ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd`` go through
SimpleITK (:mod:`medseg.io.itk`), which converts NIfTI's RAS to our LPS on read and back on write.
Every write goes through :mod:`medseg.io.atomic` (temporary name, verify, fsync, rename) and
never replaces an input; text outputs use :func:`write_json`, :func:`write_csv`,
:func:`write_text`.
"""

from medseg.io.files import (
    IMAGE_SUFFIXES,
    atomic_dir,
    atomic_path,
    check_output_path,
    image_suffix,
    read_labels,
    read_volume,
    write_csv,
    write_json,
    write_labels,
    write_sitk_image,
    write_text,
    write_volume,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "atomic_dir",
    "atomic_path",
    "check_output_path",
    "image_suffix",
    "read_labels",
    "read_volume",
    "write_csv",
    "write_json",
    "write_labels",
    "write_sitk_image",
    "write_text",
    "write_volume",
]
