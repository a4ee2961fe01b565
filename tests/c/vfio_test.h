/* What the C test programs share: the kernel ABI they use (defined here, so the tests do not
 * depend on the installed linux/vfio.h having the cdev and iommufd parts) and result lines.
 *
 * Every result is one line "name=value" on stdout; calls print "ok:<return value>" or the
 * errno's name, so the Python test can assert exact values and errnos. */
#ifndef VFIO_TEST_H
#define VFIO_TEST_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define VIO(nr) (0x3b00u | (nr))
#define VFIO_GET_API_VERSION VIO(100)
#define VFIO_CHECK_EXTENSION VIO(101)
#define VFIO_SET_IOMMU VIO(102)
#define VFIO_GROUP_GET_STATUS VIO(103)
#define VFIO_GROUP_SET_CONTAINER VIO(104)
#define VFIO_GROUP_UNSET_CONTAINER VIO(105)
#define VFIO_GROUP_GET_DEVICE_FD VIO(106)
#define VFIO_DEVICE_GET_INFO VIO(107)
#define VFIO_DEVICE_GET_REGION_INFO VIO(108)
#define VFIO_DEVICE_GET_IRQ_INFO VIO(109)
#define VFIO_DEVICE_SET_IRQS VIO(110)
#define VFIO_DEVICE_RESET VIO(111)
#define VFIO_IOMMU_GET_INFO VIO(112)
#define VFIO_IOMMU_MAP_DMA VIO(113)
#define VFIO_IOMMU_UNMAP_DMA VIO(114)
#define VFIO_DEVICE_FEATURE VIO(117)
#define VFIO_DEVICE_BIND_IOMMUFD VIO(118)
#define VFIO_DEVICE_ATTACH_IOMMUFD_PT VIO(119)
#define VFIO_DEVICE_DETACH_IOMMUFD_PT VIO(120)
#define IOMMU_DESTROY VIO(0x80)
#define IOMMU_IOAS_ALLOC VIO(0x81)
#define IOMMU_IOAS_IOVA_RANGES VIO(0x84)
#define IOMMU_IOAS_MAP VIO(0x85)
#define IOMMU_IOAS_UNMAP VIO(0x86)

#define VFIO_TYPE1v2_IOMMU 3
#define VFIO_IRQ_SET_DATA_NONE 1
#define VFIO_IRQ_SET_DATA_EVENTFD 4
#define VFIO_IRQ_SET_ACTION_TRIGGER 32
#define VFIO_PCI_MSIX_IRQ_INDEX 2
#define VFIO_DMA_UNMAP_FLAG_ALL 2
#define REGION(index) ((off_t)(index) << 40)

struct vfio_group_status { uint32_t argsz, flags; };
struct vfio_device_info { uint32_t argsz, flags, num_regions, num_irqs, cap_offset, pad; };
struct vfio_region_info { uint32_t argsz, flags, index, cap_offset; uint64_t size, offset; };
struct vfio_irq_info { uint32_t argsz, flags, index, count; };
struct vfio_irq_set { uint32_t argsz, flags, index, start, count; int32_t data[]; };
struct vfio_iommu_type1_info { uint32_t argsz, flags; uint64_t iova_pgsizes; uint32_t cap_offset, pad; };
struct vfio_info_cap_header { uint16_t id, version; uint32_t next; };
struct vfio_iova_range { uint64_t start, end; };
struct vfio_iommu_type1_info_cap_iova_range {
    struct vfio_info_cap_header header;
    uint32_t nr_iovas, reserved;
    struct vfio_iova_range iova_ranges[];
};
struct vfio_iommu_type1_dma_map { uint32_t argsz, flags; uint64_t vaddr, iova, size; };
struct vfio_iommu_type1_dma_unmap { uint32_t argsz, flags; uint64_t iova, size; };
struct vfio_device_bind_iommufd { uint32_t argsz, flags; int32_t iommufd; uint32_t out_devid; uint64_t token_uuid_ptr; };
struct vfio_device_attach_iommufd_pt { uint32_t argsz, flags, pt_id, pasid; };
struct vfio_device_detach_iommufd_pt { uint32_t argsz, flags, pasid; };
struct iommu_destroy { uint32_t size, id; };
struct iommu_ioas_alloc { uint32_t size, flags, out_ioas_id; };
struct iommu_iova_range { uint64_t start, last; };
struct iommu_ioas_iova_ranges { uint32_t size, ioas_id, num_iovas, reserved; uint64_t allowed_iovas, out_iova_alignment; };
struct iommu_ioas_map { uint32_t size, flags, ioas_id, reserved; uint64_t user_va, length, iova; };
struct iommu_ioas_unmap { uint32_t size, ioas_id; uint64_t iova, length; };

static inline const char *errname(int e)
{
    static char buf[16];
    const char *name = e ? strerrorname_np(e) : NULL; /* glibc 2.32, as tests/c/paths.c */

    if (name != NULL)
        return name;
    snprintf(buf, sizeof buf, "E%d", e);
    return buf;
}

/* A call's outcome: "ok:<value>" or the errno's name. */
#define CALL(name, expr)                                                         \
    ({                                                                           \
        long r_;                                                                 \
        errno = 0;                                                               \
        r_ = (long)(expr);                                                       \
        if (r_ < 0)                                                              \
            printf("%s=%s\n", (name), errname(errno));                           \
        else                                                                     \
            printf("%s=ok:%ld\n", (name), r_);                                   \
        fflush(stdout);                                                          \
        r_;                                                                      \
    })

#define VALUE(name, fmt, ...) (printf("%s=" fmt "\n", (name), __VA_ARGS__), fflush(stdout))

static inline const char *mount_path(const char *node)
{
    static char path[4096];
    const char *mnt = getenv("VFIOFS_MOUNT");

    if (mnt == NULL) {
        fprintf(stderr, "VFIOFS_MOUNT is not set\n");
        exit(2);
    }
    snprintf(path, sizeof path, "%s/%s", mnt, node);
    return path;
}

static inline int open_node(const char *node)
{
    int fd = open(mount_path(node), O_RDWR | O_CLOEXEC);

    if (fd < 0) {
        fprintf(stderr, "open %s: %s\n", mount_path(node), strerror(errno));
        exit(2);
    }
    return fd;
}

static inline int bind_iommufd(int dev, int iommufd)
{
    struct vfio_device_bind_iommufd b = {.argsz = sizeof b, .iommufd = iommufd};

    return ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &b);
}

static inline uint32_t ioas_alloc(int iommufd)
{
    struct iommu_ioas_alloc a = {.size = sizeof a};

    if (ioctl(iommufd, IOMMU_IOAS_ALLOC, &a) != 0) {
        perror("IOMMU_IOAS_ALLOC");
        exit(2);
    }
    return a.out_ioas_id;
}

static inline int ioas_map(int iommufd, uint32_t ioas, void *va, uint64_t length, uint64_t iova)
{
    struct iommu_ioas_map m = {.size = sizeof m, .flags = 7, .ioas_id = ioas, .user_va = (uintptr_t)va,
                               .length = length, .iova = iova};

    return ioctl(iommufd, IOMMU_IOAS_MAP, &m);
}

static inline int attach(int dev, uint32_t pt)
{
    struct vfio_device_attach_iommufd_pt a = {.argsz = sizeof a, .pt_id = pt};

    return ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &a);
}

#endif
