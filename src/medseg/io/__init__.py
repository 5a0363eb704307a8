"""Reading and writing volumes and label maps.

``read_volume`` and ``read_labels`` dispatch on the path: a folder is a DICOM series (see
:mod:`medseg.io.dicom`); ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd`` go through
SimpleITK (:mod:`medseg.io.itk`), which converts NIfTI's RAS to our LPS on read and back on write.
Writes are atomic and never replace an input.
"""

from medseg.io.files import (
    IMAGE_SUFFIXES,
    atomic_path,
    check_output_path,
    image_suffix,
    read_labels,
    read_volume,
    write_labels,
    write_volume,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "atomic_path",
    "check_output_path",
    "image_suffix",
    "read_labels",
    "read_volume",
    "write_labels",
    "write_volume",
]
