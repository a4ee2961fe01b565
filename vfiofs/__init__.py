"""vfiofs: Linux VFIO device nodes (cdev + iommufd), emulated as a FUSE filesystem."""

__version__ = "0.1.0"
