"""Kernel ABI of VFIO and iommufd, mirrored field by field from the uapi headers.

`include/uapi/linux/vfio.h` and `include/uapi/linux/iommufd.h` define what a driver
passes to ioctl(); this module repeats those structures as ctypes classes and those
numbers as constants, under the kernel's own names, so the daemon and the client
library agree on every byte. Flexible array members (``data[]``) are left out, as
``sizeof`` leaves them out in C.
"""

from __future__ import annotations

import ctypes

u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
s32 = ctypes.c_int32
u64 = ctypes.c_uint64

#: The page size of every mapping rule (IOMMU, mmap, DMA): x86-64's 4 KiB.
PAGE_SIZE = 4096


def _IO(type_: int, nr: int) -> int:
    """The kernel's _IO(): direction NONE and size 0, as every VFIO/iommufd ioctl."""
    return (type_ << 8) | nr


class _Struct(ctypes.LittleEndianStructure):
    """Base with a readable repr; layouts are the kernel's (natural alignment)."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name, *_ in self._fields_)
        return f"{type(self).__name__}({fields})"


# --------------------------------------------------------------------------- vfio.h

VFIO_API_VERSION = 0
VFIO_TYPE = ord(";")
VFIO_BASE = 100

VFIO_GET_API_VERSION = _IO(VFIO_TYPE, VFIO_BASE + 0)
VFIO_CHECK_EXTENSION = _IO(VFIO_TYPE, VFIO_BASE + 1)
VFIO_SET_IOMMU = _IO(VFIO_TYPE, VFIO_BASE + 2)
VFIO_GROUP_GET_STATUS = _IO(VFIO_TYPE, VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 4)
VFIO_GROUP_UNSET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 5)
VFIO_GROUP_GET_DEVICE_FD = _IO(VFIO_TYPE, VFIO_BASE + 6)
VFIO_DEVICE_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 7)
VFIO_DEVICE_GET_REGION_INFO = _IO(VFIO_TYPE, VFIO_BASE + 8)
VFIO_DEVICE_GET_IRQ_INFO = _IO(VFIO_TYPE, VFIO_BASE + 9)
VFIO_DEVICE_SET_IRQS = _IO(VFIO_TYPE, VFIO_BASE + 10)
VFIO_DEVICE_RESET = _IO(VFIO_TYPE, VFIO_BASE + 11)
VFIO_DEVICE_GET_PCI_HOT_RESET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)
VFIO_DEVICE_PCI_HOT_RESET = _IO(VFIO_TYPE, VFIO_BASE + 13)
VFIO_DEVICE_QUERY_GFX_PLANE = _IO(VFIO_TYPE, VFIO_BASE + 14)
VFIO_DEVICE_GET_GFX_DMABUF = _IO(VFIO_TYPE, VFIO_BASE + 15)
VFIO_DEVICE_IOEVENTFD = _IO(VFIO_TYPE, VFIO_BASE + 16)
VFIO_DEVICE_FEATURE = _IO(VFIO_TYPE, VFIO_BASE + 17)
VFIO_DEVICE_BIND_IOMMUFD = _IO(VFIO_TYPE, VFIO_BASE + 18)
VFIO_DEVICE_ATTACH_IOMMUFD_PT = _IO(VFIO_TYPE, VFIO_BASE + 19)
VFIO_DEVICE_DETACH_IOMMUFD_PT = _IO(VFIO_TYPE, VFIO_BASE + 20)
# Container ioctls that share numbers with device ioctls above.
VFIO_IOMMU_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)
VFIO_IOMMU_MAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 13)
VFIO_IOMMU_UNMAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 14)

# VFIO_CHECK_EXTENSION arguments
VFIO_TYPE1_IOMMU = 1
VFIO_SPAPR_TCE_IOMMU = 2
VFIO_TYPE1v2_IOMMU = 3
VFIO_DMA_CC_IOMMU = 4
VFIO_EEH = 5
VFIO_TYPE1_NESTING_IOMMU = 6
VFIO_SPAPR_TCE_v2_IOMMU = 7
VFIO_NOIOMMU_IOMMU = 8
VFIO_UNMAP_ALL = 9
VFIO_UPDATE_VADDR = 10


class vfio_info_cap_header(_Struct):
    _fields_ = [("id", u16), ("version", u16), ("next", u32)]


class vfio_group_status(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32)]


VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1


class vfio_iommu_type1_info(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("iova_pgsizes", u64), ("cap_offset", u32), ("pad", u32)]


VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1
VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION = 2
VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL = 3


class vfio_iova_range(_Struct):
    _fields_ = [("start", u64), ("end", u64)]


class vfio_iommu_type1_info_cap_iova_range(_Struct):
    """VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE; ``iova_ranges[nr_iovas]`` (vfio_iova_range) follow."""

    _fields_ = [("header", vfio_info_cap_header), ("nr_iovas", u32), ("reserved", u32)]


class vfio_iommu_type1_info_dma_avail(_Struct):
    """VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL: how many more mappings MAP_DMA accepts."""

    _fields_ = [("header", vfio_info_cap_header), ("avail", u32)]


class vfio_iommu_type1_dma_map(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("vaddr", u64), ("iova", u64), ("size", u64)]


VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_DMA_MAP_FLAG_VADDR = 1 << 2


class vfio_iommu_type1_dma_unmap(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("iova", u64), ("size", u64)]


VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1 << 0
VFIO_DMA_UNMAP_FLAG_ALL = 1 << 1
VFIO_DMA_UNMAP_FLAG_VADDR = 1 << 2


class vfio_device_info(_Struct):
    _fields_ = [
        ("argsz", u32),
        ("flags", u32),
        ("num_regions", u32),
        ("num_irqs", u32),
        ("cap_offset", u32),
        ("pad", u32),
    ]


VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_DEVICE_FLAGS_PLATFORM = 1 << 2
VFIO_DEVICE_FLAGS_AMBA = 1 << 3
VFIO_DEVICE_FLAGS_CCW = 1 << 4
VFIO_DEVICE_FLAGS_AP = 1 << 5
VFIO_DEVICE_FLAGS_FSL_MC = 1 << 6
VFIO_DEVICE_FLAGS_CAPS = 1 << 7
VFIO_DEVICE_FLAGS_CDX = 1 << 8


class vfio_region_info(_Struct):
    _fields_ = [
        ("argsz", u32),
        ("flags", u32),
        ("index", u32),
        ("cap_offset", u32),
        ("size", u64),
        ("offset", u64),
    ]


VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3

VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_REGION_INFO_CAP_TYPE = 2
VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3


class vfio_region_sparse_mmap_area(_Struct):
    _fields_ = [("offset", u64), ("size", u64)]


class vfio_region_info_cap_sparse_mmap(_Struct):
    _fields_ = [("header", vfio_info_cap_header), ("nr_areas", u32), ("reserved", u32)]


class vfio_region_info_cap_type(_Struct):
    _fields_ = [("header", vfio_info_cap_header), ("type", u32), ("subtype", u32)]


class vfio_irq_info(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("index", u32), ("count", u32)]


VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3


class vfio_irq_set(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("index", u32), ("start", u32), ("count", u32)]


VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5


class vfio_device_feature(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32)]


VFIO_DEVICE_FEATURE_MASK = 0xFFFF
VFIO_DEVICE_FEATURE_GET = 1 << 16
VFIO_DEVICE_FEATURE_SET = 1 << 17
VFIO_DEVICE_FEATURE_PROBE = 1 << 18
VFIO_DEVICE_FEATURE_PCI_VF_TOKEN = 0
VFIO_DEVICE_FEATURE_MIGRATION = 1
VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE = 2
VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY = 3
VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP = 4
VFIO_DEVICE_FEATURE_LOW_POWER_EXIT = 5
VFIO_DEVICE_FEATURE_DMA_LOGGING_START = 6
VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP = 7
VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT = 8
VFIO_DEVICE_FEATURE_MIG_DATA_SIZE = 9
VFIO_DEVICE_FEATURE_BUS_MASTER = 10
VFIO_DEVICE_FEATURE_DMA_BUF = 11


class vfio_device_bind_iommufd(_Struct):
    _fields_ = [
        ("argsz", u32),
        ("flags", u32),
        ("iommufd", s32),
        ("out_devid", u32),
        ("token_uuid_ptr", u64),
    ]


VFIO_DEVICE_BIND_FLAG_TOKEN = 1 << 0


class vfio_device_attach_iommufd_pt(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("pt_id", u32), ("pasid", u32)]


VFIO_DEVICE_ATTACH_PASID = 1 << 0


class vfio_device_detach_iommufd_pt(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("pasid", u32)]


VFIO_DEVICE_DETACH_PASID = 1 << 0

# vfio-pci region and IRQ indices (enum in vfio.h)
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_BAR1_REGION_INDEX = 1
VFIO_PCI_BAR2_REGION_INDEX = 2
VFIO_PCI_BAR3_REGION_INDEX = 3
VFIO_PCI_BAR4_REGION_INDEX = 4
VFIO_PCI_BAR5_REGION_INDEX = 5
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_VGA_REGION_INDEX = 8
VFIO_PCI_NUM_REGIONS = 9

VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_ERR_IRQ_INDEX = 3
VFIO_PCI_REQ_IRQ_INDEX = 4
VFIO_PCI_NUM_IRQS = 5

# Kernel-internal (include/linux/vfio_pci_core.h) but part of the de-facto ABI:
# a region's file offset is its index shifted left by 40 bits.
VFIO_PCI_OFFSET_SHIFT = 40
VFIO_PCI_OFFSET_MASK = (1 << VFIO_PCI_OFFSET_SHIFT) - 1


def VFIO_PCI_INDEX_TO_OFFSET(index: int) -> int:
    return index << VFIO_PCI_OFFSET_SHIFT


def VFIO_PCI_OFFSET_TO_INDEX(offset: int) -> int:
    return offset >> VFIO_PCI_OFFSET_SHIFT


# ------------------------------------------------------------------------ iommufd.h

IOMMUFD_TYPE = ord(";")
IOMMUFD_CMD_BASE = 0x80

IOMMUFD_CMD_DESTROY = 0x80
IOMMUFD_CMD_IOAS_ALLOC = 0x81
IOMMUFD_CMD_IOAS_ALLOW_IOVAS = 0x82
IOMMUFD_CMD_IOAS_COPY = 0x83
IOMMUFD_CMD_IOAS_IOVA_RANGES = 0x84
IOMMUFD_CMD_IOAS_MAP = 0x85
IOMMUFD_CMD_IOAS_UNMAP = 0x86
IOMMUFD_CMD_OPTION = 0x87
IOMMUFD_CMD_VFIO_IOAS = 0x88
IOMMUFD_CMD_HWPT_ALLOC = 0x89
IOMMUFD_CMD_GET_HW_INFO = 0x8A
IOMMUFD_CMD_IOAS_MAP_FILE = 0x8F

IOMMU_DESTROY = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_DESTROY)
IOMMU_IOAS_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_ALLOC)
IOMMU_IOAS_ALLOW_IOVAS = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_ALLOW_IOVAS)
IOMMU_IOAS_COPY = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_COPY)
IOMMU_IOAS_IOVA_RANGES = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_IOVA_RANGES)
IOMMU_IOAS_MAP = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_MAP)
IOMMU_IOAS_UNMAP = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_UNMAP)
IOMMU_OPTION = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_OPTION)
IOMMU_VFIO_IOAS = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_VFIO_IOAS)
IOMMU_HWPT_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_ALLOC)
IOMMU_GET_HW_INFO = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_GET_HW_INFO)
IOMMU_IOAS_MAP_FILE = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_MAP_FILE)


class iommu_destroy(_Struct):
    _fields_ = [("size", u32), ("id", u32)]


class iommu_ioas_alloc(_Struct):
    _fields_ = [("size", u32), ("flags", u32), ("out_ioas_id", u32)]


class iommu_iova_range(_Struct):
    _fields_ = [("start", u64), ("last", u64)]


class iommu_ioas_iova_ranges(_Struct):
    _fields_ = [
        ("size", u32),
        ("ioas_id", u32),
        ("num_iovas", u32),
        ("__reserved", u32),
        ("allowed_iovas", u64),
        ("out_iova_alignment", u64),
    ]


class iommu_ioas_map(_Struct):
    _fields_ = [
        ("size", u32),
        ("flags", u32),
        ("ioas_id", u32),
        ("__reserved", u32),
        ("user_va", u64),
        ("length", u64),
        ("iova", u64),
    ]


IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0
IOMMU_IOAS_MAP_WRITEABLE = 1 << 1
IOMMU_IOAS_MAP_READABLE = 1 << 2


class iommu_ioas_map_file(_Struct):
    _fields_ = [
        ("size", u32),
        ("flags", u32),
        ("ioas_id", u32),
        ("fd", s32),
        ("start", u64),
        ("length", u64),
        ("iova", u64),
    ]


class iommu_ioas_unmap(_Struct):
    _fields_ = [("size", u32), ("ioas_id", u32), ("iova", u64), ("length", u64)]


def _check_layouts() -> None:
    """Fail at import if a layout drifted from the kernel's sizeof()."""
    expected = {
        vfio_info_cap_header: 8,
        vfio_device_info: 24,
        vfio_region_info: 32,
        vfio_region_sparse_mmap_area: 16,
        vfio_region_info_cap_sparse_mmap: 16,
        vfio_region_info_cap_type: 16,
        vfio_irq_info: 16,
        vfio_irq_set: 20,
        vfio_device_feature: 8,
        vfio_device_bind_iommufd: 24,
        vfio_device_attach_iommufd_pt: 16,
        vfio_device_detach_iommufd_pt: 12,
        iommu_destroy: 8,
        iommu_ioas_alloc: 12,
        iommu_iova_range: 16,
        iommu_ioas_iova_ranges: 32,
        iommu_ioas_map: 40,
        iommu_ioas_map_file: 40,
        iommu_ioas_unmap: 24,
        vfio_group_status: 8,
        vfio_iommu_type1_info: 24,
        vfio_iova_range: 16,
        vfio_iommu_type1_info_cap_iova_range: 16,
        vfio_iommu_type1_info_dma_avail: 12,
        vfio_iommu_type1_dma_map: 32,
        vfio_iommu_type1_dma_unmap: 24,
    }
    for struct, size in expected.items():
        if ctypes.sizeof(struct) != size:  # pragma: no cover - guards edits
            raise AssertionError(f"{struct.__name__} is {ctypes.sizeof(struct)} bytes, kernel has {size}")


_check_layouts()
