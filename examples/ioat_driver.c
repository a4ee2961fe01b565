/* ioat_driver: a userspace driver that copies one page with an Intel I/OAT DMA channel.
 *
 *     ioat_driver BDF                     for example: ioat_driver 0000:00:06.0
 *
 * It is written for a real host: a Crystal Beach DMA function (8086:2021, Skylake-SP CBDMA)
 * bound to vfio-pci, with /dev/iommu and its /dev/vfio/devices/vfioN open to the user. It uses
 * nothing but the kernel's uapi headers and plain system calls:
 *
 *  1. finds the device's VFIO cdev in /sys/bus/pci/devices/BDF/vfio-dev/;
 *  2. opens /dev/iommu, allocates an IOAS, opens the cdev, binds it to the iommufd and
 *     attaches it to the IOAS (the iommufd way of Documentation/driver-api/vfio.rst);
 *  3. checks the ids in config space, turns on memory decoding and bus mastering;
 *  4. maps BAR0 and from then on touches the registers only through that mapping;
 *  5. maps three pages of its memory for DMA: a descriptor, a source, a destination;
 *  6. asks for MSI-X vector 0 on an eventfd (VFIO_DEVICE_SET_IRQS; vfio-pci programs the
 *     MSI-X table itself, so the driver never writes it);
 *  7. resets the channel, copies the source page to the destination with one COPY
 *     descriptor, waits for the completion interrupt with poll(), checks the channel status
 *     and the data, and tears everything down.
 *
 * On success it prints two lines and exits 0. Any failure prints one line
 * "ioat_driver: <what>: <reason>" on stderr and exits 1; the kernel releases whatever the
 * process still holds.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <linux/pci_regs.h>
#include <linux/types.h>
#include <linux/vfio.h>
#if __has_include(<linux/iommufd.h>)
#include <linux/iommufd.h>
#endif

/* Older uapi headers (Debian 12 ships Linux 6.1's) predate the iommufd interface (Linux 6.2)
 * and the VFIO device cdev (6.6). These are the kernel's definitions of the parts used here. */
#ifndef IOMMU_IOAS_ALLOC
struct iommu_ioas_alloc { __u32 size, flags, out_ioas_id; };
struct iommu_ioas_map {
    __u32 size, flags, ioas_id, __reserved;
    __aligned_u64 user_va, length, iova;
};
struct iommu_ioas_unmap { __u32 size, ioas_id; __aligned_u64 iova, length; };
#define IOMMU_IOAS_MAP_FIXED_IOVA (1 << 0)
#define IOMMU_IOAS_MAP_WRITEABLE (1 << 1)
#define IOMMU_IOAS_MAP_READABLE (1 << 2)
#define IOMMU_IOAS_ALLOC _IO(';', 0x81)
#define IOMMU_IOAS_MAP _IO(';', 0x85)
#define IOMMU_IOAS_UNMAP _IO(';', 0x86)
#endif
#ifndef VFIO_DEVICE_BIND_IOMMUFD
struct vfio_device_bind_iommufd { __u32 argsz, flags; __s32 iommufd; __u32 out_devid; };
struct vfio_device_attach_iommufd_pt { __u32 argsz, flags, pt_id; };
#define VFIO_DEVICE_BIND_IOMMUFD _IO(VFIO_TYPE, VFIO_BASE + 18)
#define VFIO_DEVICE_ATTACH_IOMMUFD_PT _IO(VFIO_TYPE, VFIO_BASE + 19)
#endif

#define IOAT_VENDOR 0x8086
#define IOAT_DEVICE 0x2021 /* Skylake-SP CBDMA */

/* BAR0: the device registers, then channel 0's at 0x80 (I/OAT 3.x) */
#define IOAT_XFERCAP 0x01    /* u8: log2 of the largest transfer */
#define IOAT_INTRCTRL 0x03   /* u8 */
#define INTRCTRL_MASTER_INT_EN 0x01
#define INTRCTRL_MSIX_VECTOR_CONTROL 0x08
#define IOAT_ATTNSTATUS 0x04 /* u32, read to clear: bit n = channel n interrupted */
#define IOAT_VER 0x08        /* u8: major.minor in two nibbles */
#define IOAT_CHANCTRL 0x80   /* u16 */
#define CHANCTRL_INT_REARM 0x0001  /* arms one completion interrupt */
#define CHANCTRL_ERR_INT_EN 0x0010 /* an error interrupts too */
#define IOAT_CHANCMD 0x84    /* u8 */
#define CHANCMD_RESET 0x20
#define IOAT_DMACOUNT 0x86   /* u16: the doorbell, descriptors to run since CHAINADDR */
#define IOAT_CHANSTS 0x88    /* u64: the state in bits 0-2, the last completed descriptor above */
#define CHANSTS_STATE 0x7
#define CHANSTS_DONE 1
#define CHANSTS_HALTED 3
#define IOAT_CHAINADDR 0x90  /* u64: the first descriptor */
#define IOAT_CHANERR 0xA8    /* u32, write 1 to clear */

/* A hardware descriptor: 64 bytes, 64-byte aligned, in memory the device reads by DMA. */
struct ioat_desc {
    uint32_t size;
    uint32_t ctl;          /* bit 0: interrupt on completion; bits 24-31: op, 0 = COPY */
    uint64_t src, dst;     /* IOVAs */
    uint64_t next;         /* the next descriptor's IOVA */
    uint64_t reserved[4];
};
_Static_assert(sizeof(struct ioat_desc) == 64, "descriptors are 64 bytes");
#define DESC_INT_EN (1u << 0)

#define PAGE 4096
#define COPY_SIZE PAGE
#define DMA_IOVA 0x100000ull /* page 0: the descriptor, 1: the source, 2: the destination */
#define TIMEOUT_MS 5000

/* MMIO accessors: one volatile load or store of exactly the register's width. */
static inline uint8_t readb(const volatile void *a) { return *(const volatile uint8_t *)a; }
static inline uint32_t readl(const volatile void *a) { return *(const volatile uint32_t *)a; }
static inline uint64_t readq(const volatile void *a) { return *(const volatile uint64_t *)a; }
static inline void writeb(uint8_t v, volatile void *a) { *(volatile uint8_t *)a = v; }
static inline void writew(uint16_t v, volatile void *a) { *(volatile uint16_t *)a = v; }
static inline void writel(uint32_t v, volatile void *a) { *(volatile uint32_t *)a = v; }
static inline void writeq(uint64_t v, volatile void *a) { *(volatile uint64_t *)a = v; }

static void die(int err, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));
static void die(int err, const char *fmt, ...)
{
    char what[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    fprintf(stderr, "ioat_driver: %s: %s\n", what, strerror(err));
    exit(1);
}

static void xioctl(int fd, unsigned long request, void *arg, const char *name)
{
    if (ioctl(fd, request, arg) < 0)
        die(errno, "%s", name);
}

static int xopen(const char *path)
{
    int fd = open(path, O_RDWR | O_CLOEXEC);

    if (fd < 0)
        die(errno, "open %s", path);
    return fd;
}

/* The VFIO cdev of a PCI function bound to vfio-pci: /sys/bus/pci/devices/BDF/vfio-dev/vfioN. */
static void find_cdev(const char *bdf, char *cdev, size_t size)
{
    char path[256];
    struct dirent *entry;
    DIR *dir;

    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/vfio-dev/", bdf);
    dir = opendir(path);
    if (dir == NULL)
        die(errno, "%s (is %s bound to vfio-pci?)", path, bdf);
    cdev[0] = '\0';
    while ((entry = readdir(dir)) != NULL)
        if (strncmp(entry->d_name, "vfio", 4) == 0)
            snprintf(cdev, size, "/dev/vfio/devices/%s", entry->d_name);
    closedir(dir);
    if (cdev[0] == '\0')
        die(ENOENT, "no VFIO device cdev in %s", path);
}

static void region_info(int dev, unsigned int index, struct vfio_region_info *info, const char *name)
{
    *info = (struct vfio_region_info){.argsz = sizeof *info, .index = index};
    xioctl(dev, VFIO_DEVICE_GET_REGION_INFO, info, name);
}

int main(int argc, char **argv)
{
    char cdev[300];
    uint16_t ids[2], command;

    if (argc != 2) {
        fprintf(stderr, "usage: ioat_driver BDF    (e.g. 0000:00:06.0)\n");
        return 2;
    }
    const char *bdf = argv[1];
    find_cdev(bdf, cdev, sizeof cdev);

    /* iommufd: an IOAS (an I/O address space), then the device bound and attached to it. */
    int iommufd = xopen("/dev/iommu");
    struct iommu_ioas_alloc alloc = {.size = sizeof alloc};
    xioctl(iommufd, IOMMU_IOAS_ALLOC, &alloc, "IOMMU_IOAS_ALLOC");
    int dev = xopen(cdev);
    struct vfio_device_bind_iommufd bind = {.argsz = sizeof bind, .iommufd = iommufd};
    xioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &bind, "VFIO_DEVICE_BIND_IOMMUFD");
    struct vfio_device_attach_iommufd_pt attach = {.argsz = sizeof attach, .pt_id = alloc.out_ioas_id};
    xioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach, "VFIO_DEVICE_ATTACH_IOMMUFD_PT");

    struct vfio_device_info info = {.argsz = sizeof info};
    xioctl(dev, VFIO_DEVICE_GET_INFO, &info, "VFIO_DEVICE_GET_INFO");
    if (!(info.flags & VFIO_DEVICE_FLAGS_PCI))
        die(ENODEV, "%s is not a vfio-pci device", cdev);

    /* Config space: is this our device? Then let it decode its BARs and master the bus. */
    struct vfio_region_info cfg, bar0;
    region_info(dev, VFIO_PCI_CONFIG_REGION_INDEX, &cfg, "VFIO_DEVICE_GET_REGION_INFO (config)");
    if (pread(dev, ids, sizeof ids, cfg.offset + PCI_VENDOR_ID) != sizeof ids)
        die(errno, "read the ids in config space");
    if (le16toh(ids[0]) != IOAT_VENDOR || le16toh(ids[1]) != IOAT_DEVICE)
        die(ENODEV, "%s is %04x:%04x, not an I/OAT DMA function (%04x:%04x)", bdf, le16toh(ids[0]),
            le16toh(ids[1]), IOAT_VENDOR, IOAT_DEVICE);
    if (pread(dev, &command, 2, cfg.offset + PCI_COMMAND) != 2)
        die(errno, "read PCI_COMMAND");
    command = htole16(le16toh(command) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
    if (pwrite(dev, &command, 2, cfg.offset + PCI_COMMAND) != 2)
        die(errno, "write PCI_COMMAND");
    struct vfio_irq_info msix = {.argsz = sizeof msix, .index = VFIO_PCI_MSIX_IRQ_INDEX};
    xioctl(dev, VFIO_DEVICE_GET_IRQ_INFO, &msix, "VFIO_DEVICE_GET_IRQ_INFO (MSI-X)");
    if (msix.count < 1 || !(msix.flags & VFIO_IRQ_INFO_EVENTFD))
        die(ENODEV, "%s has no MSI-X vector to signal an eventfd", bdf);

    /* BAR0, mapped whole. */
    region_info(dev, VFIO_PCI_BAR0_REGION_INDEX, &bar0, "VFIO_DEVICE_GET_REGION_INFO (BAR0)");
    if (!(bar0.flags & VFIO_REGION_INFO_FLAG_MMAP))
        die(EINVAL, "BAR0 cannot be mapped");
    volatile uint8_t *regs = mmap(NULL, bar0.size, PROT_READ | PROT_WRITE, MAP_SHARED, dev, bar0.offset);
    if (regs == MAP_FAILED)
        die(errno, "mmap BAR0");
    uint8_t version = readb(regs + IOAT_VER), xfercap = readb(regs + IOAT_XFERCAP);
    if (xfercap && COPY_SIZE > 1ul << xfercap)
        die(EINVAL, "XFERCAP %u: the channel cannot copy %d bytes at once", xfercap, COPY_SIZE);
    printf("%s: %04x:%04x at %s, I/OAT %u.%u, BAR0 %llu bytes mapped\n", bdf, IOAT_VENDOR, IOAT_DEVICE, cdev,
           version >> 4, version & 0xf, (unsigned long long)bar0.size);

    /* DMA memory: three pages of this process, visible to the device at DMA_IOVA. */
    uint8_t *buf = mmap(NULL, 3 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED)
        die(errno, "mmap the DMA buffer");
    struct iommu_ioas_map map = {
        .size = sizeof map, .ioas_id = alloc.out_ioas_id, .user_va = (uintptr_t)buf, .length = 3 * PAGE,
        .iova = DMA_IOVA, .flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
    };
    xioctl(iommufd, IOMMU_IOAS_MAP, &map, "IOMMU_IOAS_MAP");
    struct ioat_desc *desc = (struct ioat_desc *)buf;
    uint8_t *src = buf + PAGE, *dst = buf + 2 * PAGE;

    /* MSI-X vector 0 signals this eventfd. */
    int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (efd < 0)
        die(errno, "eventfd");
    union {
        struct vfio_irq_set set;
        uint8_t bytes[sizeof(struct vfio_irq_set) + sizeof(int32_t)];
    } irq = {.set = {.argsz = sizeof irq, .flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                     .index = VFIO_PCI_MSIX_IRQ_INDEX, .start = 0, .count = 1}};
    memcpy(irq.set.data, &efd, sizeof(int32_t));
    xioctl(dev, VFIO_DEVICE_SET_IRQS, &irq, "VFIO_DEVICE_SET_IRQS (MSI-X vector 0)");

    /* Reset the channel: clear old errors, RESET, wait until the bit drops; it is then HALTED. */
    writel(readl(regs + IOAT_CHANERR), regs + IOAT_CHANERR);
    writeb(CHANCMD_RESET, regs + IOAT_CHANCMD);
    for (int ms = 0; readb(regs + IOAT_CHANCMD) & CHANCMD_RESET; ms++) {
        if (ms == TIMEOUT_MS)
            die(ETIMEDOUT, "channel reset still running after %d ms", TIMEOUT_MS);
        usleep(1000);
    }
    uint64_t status = readq(regs + IOAT_CHANSTS);
    if ((status & CHANSTS_STATE) != CHANSTS_HALTED)
        die(EIO, "channel not HALTED after reset (CHANSTS %#llx)", (unsigned long long)status);
    writeb(INTRCTRL_MASTER_INT_EN | INTRCTRL_MSIX_VECTOR_CONTROL, regs + IOAT_INTRCTRL);

    /* One COPY descriptor that interrupts when done; its next is itself (a ring of one). */
    for (int i = 0; i < COPY_SIZE; i++)
        src[i] = (uint8_t)(i * 7 + 3);
    memset(dst, 0, COPY_SIZE);
    *desc = (struct ioat_desc){.size = COPY_SIZE, .ctl = DESC_INT_EN, .src = DMA_IOVA + PAGE,
                               .dst = DMA_IOVA + 2 * PAGE, .next = DMA_IOVA};
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* the descriptor is in memory before the doorbell */
    writew(CHANCTRL_INT_REARM | CHANCTRL_ERR_INT_EN, regs + IOAT_CHANCTRL);
    writeq(DMA_IOVA, regs + IOAT_CHAINADDR);
    writew(1, regs + IOAT_DMACOUNT);

    /* Wait for the interrupt, then do what an interrupt handler does: read the cause and status. */
    struct pollfd pfd = {.fd = efd, .events = POLLIN};
    int ready = poll(&pfd, 1, TIMEOUT_MS);
    if (ready < 0)
        die(errno, "poll the MSI-X eventfd");
    if (ready == 0)
        die(ETIMEDOUT, "no MSI-X interrupt within %d ms (CHANSTS %#llx)", TIMEOUT_MS,
            (unsigned long long)readq(regs + IOAT_CHANSTS));
    uint64_t fired;
    if (read(efd, &fired, sizeof fired) != sizeof fired)
        die(errno, "read the MSI-X eventfd");
    uint32_t attention = readl(regs + IOAT_ATTNSTATUS);
    status = readq(regs + IOAT_CHANSTS);
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* the device's writes are seen after its status */
    if (!(attention & 1))
        die(EIO, "interrupt without channel 0 in ATTNSTATUS (%#x)", attention);
    if ((status & CHANSTS_STATE) != CHANSTS_DONE)
        die(EIO, "channel stopped in state %llu, CHANERR %#x", (unsigned long long)(status & CHANSTS_STATE),
            readl(regs + IOAT_CHANERR));
    if ((status & ~0x3full) != DMA_IOVA)
        die(EIO, "CHANSTS names descriptor %#llx, not %#llx", (unsigned long long)(status & ~0x3full), DMA_IOVA);
    for (int i = 0; i < COPY_SIZE; i++)
        if (dst[i] != src[i])
            die(EIO, "destination byte %d is %#x, the source's is %#x", i, dst[i], src[i]);
    if (fired != 1)
        die(EIO, "MSI-X vector 0 fired %llu times for one descriptor", (unsigned long long)fired);
    printf("copied %d bytes by DMA, MSI-X vector 0 fired once, CHANSTS DONE\n", COPY_SIZE);

    /* Tear down: interrupts off, DMA mapping gone, memory unmapped, files closed. */
    struct vfio_irq_set off = {.argsz = sizeof off, .flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                               .index = VFIO_PCI_MSIX_IRQ_INDEX, .start = 0, .count = 0};
    xioctl(dev, VFIO_DEVICE_SET_IRQS, &off, "VFIO_DEVICE_SET_IRQS (disable MSI-X)");
    struct iommu_ioas_unmap unmap = {.size = sizeof unmap, .ioas_id = alloc.out_ioas_id, .iova = DMA_IOVA,
                                     .length = 3 * PAGE};
    xioctl(iommufd, IOMMU_IOAS_UNMAP, &unmap, "IOMMU_IOAS_UNMAP");
    if (munmap(buf, 3 * PAGE) < 0 || munmap((void *)regs, bar0.size) < 0)
        die(errno, "munmap");
    close(efd);
    close(dev);
    close(iommufd);
    return 0;
}
