"""medseg: 3D medical image segmentation (MONAI U-Net and promptable SAM-Med models).

Importing this package is cheap: it pulls in numpy only. torch, monai, SimpleITK, pydicom and
napari are imported lazily by the modules that need them.
"""

from medseg.errors import MedsegError
from medseg.volume import LabelMap, Volume

__all__ = ["LabelMap", "MedsegError", "Volume", "__version__"]
__version__ = "0.1.0"
