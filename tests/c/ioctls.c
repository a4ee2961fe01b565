/* Drives a vfiofs mount with plain ioctl(2) and mmap(2), as a C driver would; run under
 * LD_PRELOAD=libvfiofs_preload.so with VFIOFS_MOUNT set. `ioctls CASE` prints result lines
 * (vfio_test.h) that tests/mount/test_preload_ioctl.py asserts. */
#include "vfio_test.h"

#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>

static void *buffer(size_t size, int fill)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

    if (p == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    memset(p, fill, size);
    return p;
}

/* The cdev + iommufd path: every device and iommufd request, good and bad. */
static void case_iommufd(void)
{
    int iommu = open_node("iommu"), dev = open_node("vfio/devices/vfio0");
    int null = open("/dev/null", O_RDWR);
    struct vfio_device_info info = {.argsz = sizeof info};
    struct vfio_device_bind_iommufd b = {.argsz = sizeof b, .iommufd = iommu};
    struct vfio_region_info region = {.argsz = sizeof region};
    struct vfio_irq_info irq = {.argsz = sizeof irq, .index = VFIO_PCI_MSIX_IRQ_INDEX};
    struct iommu_ioas_alloc alloc = {.size = 8};
    struct iommu_ioas_iova_ranges ranges = {.size = sizeof ranges};
    struct iommu_iova_range range[4];
    struct iommu_ioas_unmap unmap = {.size = sizeof unmap};
    struct iommu_destroy destroy = {.size = sizeof destroy};
    struct vfio_device_detach_iommufd_pt detach = {.argsz = sizeof detach};
    uint32_t ioas;
    char *mem;

    /* A fresh device handle is blocked until BIND. */
    CALL("info_unbound", ioctl(dev, VFIO_DEVICE_GET_INFO, &info));
    CALL("unknown_unbound", ioctl(dev, VIO(0x50), NULL));
    b.iommufd = -2;
    CALL("bind_negative", ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &b));
    b.iommufd = iommu;
    b.argsz = 8;
    CALL("bind_short_argsz", ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &b));
    b.argsz = sizeof b;
    b.iommufd = null;
    CALL("bind_foreign", ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &b));
    b.iommufd = 1000;
    CALL("bind_not_open", ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &b));
    b.iommufd = dev;
    CALL("bind_device_as_iommufd", ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &b));
    b.iommufd = iommu;
    CALL("bind", ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &b));
    VALUE("devid", "%u", b.out_devid);
    CALL("bind_again", ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &b));

    CALL("api_version", ioctl(iommu, VFIO_GET_API_VERSION));
    CALL("ioas_alloc_short", ioctl(iommu, IOMMU_IOAS_ALLOC, &alloc));
    alloc.size = sizeof alloc;
    CALL("ioas_alloc", ioctl(iommu, IOMMU_IOAS_ALLOC, &alloc));
    ioas = alloc.out_ioas_id;
    VALUE("ioas", "%u", ioas);
    CALL("ioas_alloc_null", ioctl(iommu, IOMMU_IOAS_ALLOC, NULL));
    CALL("iommufd_unknown", ioctl(iommu, VIO(0x90), &alloc));
    CALL("iommu_not_iommufd", ioctl(iommu, VIO(0x50), NULL));
    CALL("attach_invalid", attach(dev, 0xffffffffu));
    CALL("attach", attach(dev, ioas));

    CALL("info", ioctl(dev, VFIO_DEVICE_GET_INFO, &info));
    VALUE("info_flags", "%u", info.flags);
    VALUE("num_regions", "%u", info.num_regions);
    VALUE("num_irqs", "%u", info.num_irqs);
    info.argsz = 8;
    CALL("info_short_argsz", ioctl(dev, VFIO_DEVICE_GET_INFO, &info));
    CALL("info_bad_pointer", ioctl(dev, VFIO_DEVICE_GET_INFO, (void *)8));
    CALL("region_info", ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, &region));
    VALUE("region0_size", "%llu", (unsigned long long)region.size);
    VALUE("region0_flags", "%u", region.flags);
    VALUE("region0_offset", "%llu", (unsigned long long)region.offset);
    region.index = 7;
    CALL("config_info", ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, &region));
    VALUE("config_offset", "0x%llx", (unsigned long long)region.offset);
    region.index = 9;
    CALL("region9_info", ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, &region));
    CALL("irq_info", ioctl(dev, VFIO_DEVICE_GET_IRQ_INFO, &irq));
    VALUE("msix_count", "%u", irq.count);
    CALL("unknown", ioctl(dev, VIO(0x50), NULL));
    CALL("tty_request", ioctl(dev, TCGETS, &info));
    CALL("reset", ioctl(dev, VFIO_DEVICE_RESET));

    /* IOVA ranges: too little room fails with EMSGSIZE and still says how many. */
    ranges.ioas_id = ioas;
    CALL("iova_ranges_empty", ioctl(iommu, IOMMU_IOAS_IOVA_RANGES, &ranges));
    VALUE("num_iovas", "%u", ranges.num_iovas);
    ranges.num_iovas = 4;
    ranges.allowed_iovas = (uintptr_t)range;
    memset(range, 0xaa, sizeof range);
    CALL("iova_ranges", ioctl(iommu, IOMMU_IOAS_IOVA_RANGES, &ranges));
    VALUE("range0", "0x%llx-0x%llx", (unsigned long long)range[0].start, (unsigned long long)range[0].last);
    VALUE("iova_alignment", "%llu", (unsigned long long)ranges.out_iova_alignment);

    mem = buffer(16384, 0x5a);
    CALL("ioas_map", ioas_map(iommu, ioas, mem, 16384, 0x100000));
    CALL("ioas_map_again", ioas_map(iommu, ioas, mem, 16384, 0x100000));
    CALL("ioas_map_unmapped", ioas_map(iommu, ioas, (void *)0x1000, 4096, 0x800000));
    unmap.ioas_id = ioas;
    unmap.iova = 0x100000;
    unmap.length = 16384;
    CALL("ioas_unmap", ioctl(iommu, IOMMU_IOAS_UNMAP, &unmap));
    VALUE("unmapped", "%llu", (unsigned long long)unmap.length);

    CALL("detach", ioctl(dev, VFIO_DEVICE_DETACH_IOMMUFD_PT, &detach));
    destroy.id = ioas;
    CALL("destroy", ioctl(iommu, IOMMU_DESTROY, &destroy));
    CALL("destroy_again", ioctl(iommu, IOMMU_DESTROY, &destroy));

    /* Other fds go to the real ioctl; a closed fd is EBADF. */
    {
        int pipefd[2], pending = -1;
        if (pipe(pipefd) == 0) {
            CALL("pipe_fionread", ioctl(pipefd[0], FIONREAD, &pending));
            VALUE("pipe_pending", "%d", pending);
        }
    }
    CALL("close_dev", close(dev));
    CALL("closed_fd", ioctl(dev, VFIO_DEVICE_GET_INFO, &info));
    close(iommu);
}

/* VFIO_DEVICE_SET_IRQS with eventfds, then loopback triggers (DATA_NONE). */
static void case_irqs(const char *node)
{
    int iommu = open_node("iommu"), dev = open_node(node);
    int efd[2] = {eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC), eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)};
    int pipefd[2];
    char buf[sizeof(struct vfio_irq_set) + 2 * sizeof(int32_t)];
    struct vfio_irq_set *set = (struct vfio_irq_set *)buf;
    uint64_t value = 0;

    if (pipe(pipefd) != 0)
        exit(2);
    CALL("bind", bind_iommufd(dev, iommu));
    *set = (struct vfio_irq_set){.argsz = sizeof buf, .flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                                 .index = VFIO_PCI_MSIX_IRQ_INDEX, .start = 0, .count = 2};
    set->data[0] = 900;
    set->data[1] = efd[1];
    CALL("set_irqs_closed_fd", ioctl(dev, VFIO_DEVICE_SET_IRQS, set));
    set->data[0] = pipefd[0];
    CALL("set_irqs_not_eventfd", ioctl(dev, VFIO_DEVICE_SET_IRQS, set));
    set->data[0] = efd[0];
    CALL("set_irqs", ioctl(dev, VFIO_DEVICE_SET_IRQS, set));
    CALL("read_before", read(efd[1], &value, sizeof value));
    *set = (struct vfio_irq_set){.argsz = sizeof *set, .flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                                 .index = VFIO_PCI_MSIX_IRQ_INDEX, .start = 1, .count = 1};
    CALL("trigger", ioctl(dev, VFIO_DEVICE_SET_IRQS, set));
    CALL("read_vector1", read(efd[1], &value, sizeof value));
    VALUE("vector1_count", "%llu", (unsigned long long)value);
    CALL("read_vector0", read(efd[0], &value, sizeof value));
    set->argsz = 4;
    CALL("set_irqs_short_argsz", ioctl(dev, VFIO_DEVICE_SET_IRQS, set));
    *set = (struct vfio_irq_set){.argsz = sizeof *set, .flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                                 .index = VFIO_PCI_MSIX_IRQ_INDEX, .start = 0, .count = 0};
    CALL("disable", ioctl(dev, VFIO_DEVICE_SET_IRQS, set));
    close(dev);
    close(iommu);
}

/* DMA by the irq_test_device (tests/models): its engine reads and writes our own buffer. */
static void dma_regs(int dev, uint64_t iova, uint64_t size, uint32_t command)
{
    if (pwrite(dev, &iova, 8, REGION(0) + 0x20) != 8 || pwrite(dev, &size, 8, REGION(0) + 0x28) != 8 ||
        pwrite(dev, &command, 4, REGION(0) + 0x30) != 4)
        exit(3);
}

static uint32_t dma_status(int dev)
{
    uint32_t status = 0xffffffff;

    if (pread(dev, &status, 4, REGION(0) + 0x38) != 4)
        exit(3);
    return status;
}

static void case_dma(void)
{
    int iommu = open_node("iommu"), dev = open_node("vfio/devices/vfio0");
    unsigned char *mem = buffer(8192, 0), pattern[64], back[64];
    uint32_t ioas;
    int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    char buf[sizeof(struct vfio_irq_set) + sizeof(int32_t)];
    struct vfio_irq_set *set = (struct vfio_irq_set *)buf;
    uint64_t count = 0;
    uint32_t vector = 0;
    int i;

    CALL("bind", bind_iommufd(dev, iommu));
    ioas = ioas_alloc(iommu);
    CALL("attach", attach(dev, ioas));
    CALL("ioas_map", ioas_map(iommu, ioas, mem, 8192, 0x100000));
    for (i = 0; i < 64; i++)
        pattern[i] = (unsigned char)(i * 7 + 1);
    /* device → memory: BAR2 holds the pattern, the engine writes it to IOVA 0x100000 */
    pwrite(dev, pattern, 64, REGION(2));
    dma_regs(dev, 0x100000, 64, 2);
    VALUE("to_memory_status", "%u", dma_status(dev));
    VALUE("to_memory_match", "%d", memcmp(mem, pattern, 64) == 0);
    /* memory → device */
    for (i = 0; i < 64; i++)
        mem[4096 + i] = (unsigned char)(255 - i);
    dma_regs(dev, 0x101000, 64, 1);
    VALUE("from_memory_status", "%u", dma_status(dev));
    pread(dev, back, 64, REGION(2));
    VALUE("from_memory_match", "%d", memcmp(back, mem + 4096, 64) == 0);
    /* an IOVA nobody mapped: a DMA fault, not a crash */
    dma_regs(dev, 0x900000, 64, 2);
    VALUE("unmapped_status", "%u", dma_status(dev));
    /* an interrupt the device raises itself reaches the eventfd */
    *set = (struct vfio_irq_set){.argsz = sizeof buf, .flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                                 .index = VFIO_PCI_MSIX_IRQ_INDEX, .start = 0, .count = 1};
    set->data[0] = efd;
    CALL("set_irqs", ioctl(dev, VFIO_DEVICE_SET_IRQS, set));
    pwrite(dev, &vector, 4, REGION(0) + 0x00); /* raise MSI-X vector 0 */
    CALL("read_irq", read(efd, &count, sizeof count));
    VALUE("irq_count", "%llu", (unsigned long long)count);
    close(dev);
    close(iommu);
}

/* The legacy path: container, group, GET_DEVICE_FD returning a new fd, type1 DMA. */
static void case_legacy(void)
{
    int container = open_node("vfio/vfio"), group = open_node("vfio/1"), other = open_node("vfio/0");
    int null = open("/dev/null", O_RDWR), closed = 1000, dev;
    struct vfio_group_status status = {.argsz = sizeof status};
    struct vfio_device_info info = {.argsz = sizeof info};
    struct vfio_iommu_type1_info small = {.argsz = sizeof small};
    struct vfio_iommu_type1_info *full;
    struct vfio_iommu_type1_dma_map map = {.argsz = sizeof map, .flags = 3, .iova = 0x200000, .size = 16384};
    struct vfio_iommu_type1_dma_unmap unmap = {.argsz = sizeof unmap, .iova = 0x200000, .size = 16384};
    char *mem = buffer(16384, 1);
    uint32_t off;

    CALL("api_version", ioctl(container, VFIO_GET_API_VERSION));
    CALL("check_type1v2", ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU));
    CALL("check_nesting", ioctl(container, VFIO_CHECK_EXTENSION, 6));
    CALL("set_iommu_no_group", ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU));
    CALL("group_status", ioctl(group, VFIO_GROUP_GET_STATUS, &status));
    VALUE("group_flags", "%u", status.flags);
    CALL("set_container_foreign", ioctl(other, VFIO_GROUP_SET_CONTAINER, &null));
    CALL("set_container_not_open", ioctl(other, VFIO_GROUP_SET_CONTAINER, &closed));
    CALL("set_container_null", ioctl(other, VFIO_GROUP_SET_CONTAINER, NULL));
    CALL("set_container", ioctl(group, VFIO_GROUP_SET_CONTAINER, &container));
    CALL("set_container_again", ioctl(group, VFIO_GROUP_SET_CONTAINER, &container));
    CALL("device_fd_no_iommu", ioctl(group, VFIO_GROUP_GET_DEVICE_FD, "0000:00:02.0"));
    CALL("set_iommu_bad_type", ioctl(container, VFIO_SET_IOMMU, 7));
    CALL("set_iommu", ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU));
    CALL("set_iommu_again", ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU));

    CALL("iommu_info_small", ioctl(container, VFIO_IOMMU_GET_INFO, &small));
    VALUE("iommu_info_argsz_grew", "%d", small.argsz > sizeof small);
    full = calloc(1, small.argsz);
    full->argsz = small.argsz;
    CALL("iommu_info", ioctl(container, VFIO_IOMMU_GET_INFO, full));
    VALUE("iommu_info_caps", "%u", full->flags & 2u);
    for (off = full->cap_offset; off != 0;) {
        struct vfio_info_cap_header *h = (struct vfio_info_cap_header *)((char *)full + off);
        if (h->id == 1) {
            struct vfio_iommu_type1_info_cap_iova_range *r = (void *)h;
            VALUE("nr_iovas", "%u", r->nr_iovas);
            VALUE("iova_range0", "0x%llx-0x%llx", (unsigned long long)r->iova_ranges[0].start,
                  (unsigned long long)r->iova_ranges[0].end);
        }
        off = h->next;
    }

    CALL("device_fd_wrong_name", ioctl(group, VFIO_GROUP_GET_DEVICE_FD, "0000:00:09.0"));
    CALL("device_fd_null", ioctl(group, VFIO_GROUP_GET_DEVICE_FD, NULL));
    dev = CALL("device_fd", ioctl(group, VFIO_GROUP_GET_DEVICE_FD, "0000:00:02.0"));
    VALUE("device_fd_new", "%d", dev > group && dev != container);
    VALUE("device_fd_cloexec", "%d", (fcntl(dev, F_GETFD) & FD_CLOEXEC) != 0);
    CALL("device_info", ioctl(dev, VFIO_DEVICE_GET_INFO, &info));
    VALUE("device_regions", "%u", info.num_regions);
    CALL("device_bind", bind_iommufd(dev, container));

    map.vaddr = (uintptr_t)mem;
    CALL("map_dma", ioctl(container, VFIO_IOMMU_MAP_DMA, &map));
    CALL("map_dma_again", ioctl(container, VFIO_IOMMU_MAP_DMA, &map));
    CALL("unmap_dma", ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap));
    VALUE("unmapped", "%llu", (unsigned long long)unmap.size);
    CALL("map_dma_2", ioctl(container, VFIO_IOMMU_MAP_DMA, &map));
    unmap = (struct vfio_iommu_type1_dma_unmap){.argsz = sizeof unmap, .flags = VFIO_DMA_UNMAP_FLAG_ALL};
    CALL("unmap_all", ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap));
    VALUE("unmapped_all", "%llu", (unsigned long long)unmap.size);
    CALL("close_device", close(dev));
    CALL("unset_container", ioctl(group, VFIO_GROUP_UNSET_CONTAINER));
    CALL("unset_container_again", ioctl(group, VFIO_GROUP_UNSET_CONTAINER));
    close(group);
    close(other);
    close(container);
}

/* A whole BAR mmap'ed at a fixed address, as the selftests map BARs. */
static void case_mmap(void)
{
    int iommu = open_node("iommu"), dev = open_node("vfio/devices/vfio0");
    struct vfio_region_info region = {.argsz = sizeof region, .index = 0};
    uint32_t word = 0, value;
    char *hole, *bar, *part;

    CALL("mmap_unbound", mmap(NULL, 4096, PROT_READ, MAP_SHARED, dev, 0) == MAP_FAILED ? -1 : 0);
    CALL("bind", bind_iommufd(dev, iommu));
    ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, &region);
    /* reserve a hole, then map the BAR into it (MAP_FIXED), as mmap_reserve() + bar_map do */
    hole = mmap(NULL, 2 * region.size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    bar = (char *)(((uintptr_t)hole + region.size - 1) & ~(uintptr_t)(region.size - 1));
    VALUE("fixed_address", "%d",
          mmap(bar, region.size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, dev, (off_t)region.offset) == bar);
    value = 0xc0ffee01;
    memcpy(bar + 0x10, &value, 4);
    pread(dev, &word, 4, REGION(0) + 0x10);
    VALUE("pread_sees_store", "0x%x", word);
    value = 0x12345678;
    pwrite(dev, &value, 4, REGION(0) + region.size - 4);
    memcpy(&word, bar + region.size - 4, 4);
    VALUE("mapping_sees_pwrite", "0x%x", word);
    part = mmap(NULL, 4096, PROT_READ, MAP_SHARED, dev, REGION(0) + 0);
    VALUE("part_sees_store", "0x%x", part == MAP_FAILED ? 0 : *(uint32_t *)(part + 0x10));
    CALL("munmap_part", munmap(part, 4096));
    CALL("mmap_private", mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, dev, 0) == MAP_FAILED ? -1 : 0);
    CALL("mmap_config", mmap(NULL, 4096, PROT_READ, MAP_SHARED, dev, REGION(7)) == MAP_FAILED ? -1 : 0);
    CALL("mmap_region9", mmap(NULL, 4096, PROT_READ, MAP_SHARED, dev, REGION(9)) == MAP_FAILED ? -1 : 0);
    CALL("mmap_beyond", mmap(NULL, 4096, PROT_READ, MAP_SHARED, dev, REGION(0) + region.size) == MAP_FAILED ? -1 : 0);
    CALL("mmap_iommu", mmap(NULL, 4096, PROT_READ, MAP_SHARED, iommu, 0) == MAP_FAILED ? -1 : 0);
    CALL("munmap", munmap(bar, region.size));
    close(dev);
    close(iommu);
}

/* dup/dup2/fcntl keep a node fd's identity; close forgets it. */
static void case_dup(void)
{
    int iommu = open_node("iommu"), dev = open_node("vfio/devices/vfio0");
    int iommu2 = dup(iommu), dev2, dev3, pipefd[2], pending = -1;
    struct vfio_device_info info = {.argsz = sizeof info};

    close(iommu); /* the dup is the same handle: BIND with it works */
    CALL("bind_with_dup", bind_iommufd(dev, iommu2));
    dev2 = CALL("dup2", dup2(dev, 100));
    dev3 = CALL("dupfd_cloexec", fcntl(dev, F_DUPFD_CLOEXEC, 200));
    CALL("close_original", close(dev));
    CALL("info_dup2", ioctl(dev2, VFIO_DEVICE_GET_INFO, &info));
    CALL("info_dupfd", ioctl(dev3, VFIO_DEVICE_GET_INFO, &info));
    CALL("info_closed", ioctl(dev, VFIO_DEVICE_GET_INFO, &info));
    /* the number 100 now names a pipe: its ioctls are the pipe's */
    if (pipe(pipefd) != 0)
        exit(2);
    CALL("dup2_pipe", dup2(pipefd[0], 100));
    CALL("pipe_fionread", ioctl(100, FIONREAD, &pending));
    CALL("info_after_dup2_over", ioctl(100, VFIO_DEVICE_GET_INFO, &info));
    close(dev3);
    close(iommu2);
}

/* A forked child binds and maps its own; the parent's handles keep working. */
static void case_fork(void)
{
    int iommu = open_node("iommu"), dev = open_node("vfio/devices/vfio0");
    uint32_t ioas;
    int status;
    pid_t child;

    CALL("parent_bind", bind_iommufd(dev, iommu));
    ioas = ioas_alloc(iommu);
    CALL("parent_attach", attach(dev, ioas));
    fflush(stdout);
    child = fork();
    if (child == 0) {
        int my_iommu = open_node("iommu"), my_dev = open_node("vfio/devices/vfio1");
        struct vfio_device_info info = {.argsz = sizeof info};
        char *mem = buffer(8192, 3);
        uint32_t my_ioas;

        CALL("child_bind", bind_iommufd(my_dev, my_iommu));
        my_ioas = ioas_alloc(my_iommu);
        CALL("child_attach", attach(my_dev, my_ioas));
        CALL("child_map", ioas_map(my_iommu, my_ioas, mem, 8192, 0x100000));
        /* the inherited handles are the parent's: same handles, the child's own proof */
        CALL("child_inherited_info", ioctl(dev, VFIO_DEVICE_GET_INFO, &info));
        CALL("child_inherited_map", ioas_map(iommu, ioas, mem, 8192, 0x300000));
        _exit(0);
    }
    waitpid(child, &status, 0);
    VALUE("child_status", "%d", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    {
        struct iommu_ioas_unmap unmap = {.size = sizeof unmap, .ioas_id = ioas, .iova = 0x300000, .length = 8192};
        char *mem = buffer(4096, 4);
        CALL("parent_unmap_child_mapping", ioctl(iommu, IOMMU_IOAS_UNMAP, &unmap));
        CALL("parent_map", ioas_map(iommu, ioas, mem, 4096, 0x300000));
    }
    close(dev);
    close(iommu);
}

/* A child in its own process group hammers the daemon; the parent SIGKILLs the group
 * mid-request (as the selftests' harness does on a timeout). */
static void case_kill(void)
{
    int ready[2];
    char byte;
    pid_t child;
    int status;

    if (pipe(ready) != 0)
        exit(2);
    child = fork();
    if (child == 0) {
        int iommu = open_node("iommu"), dev = open_node("vfio/devices/vfio0");
        char *mem = buffer(65536, 9);
        struct vfio_device_info info = {.argsz = sizeof info};
        struct iommu_ioas_unmap unmap = {.size = sizeof unmap, .iova = 0, .length = UINT64_MAX};
        uint32_t ioas;
        int n = 0;

        setpgid(0, 0);
        if (bind_iommufd(dev, iommu) != 0)
            _exit(3);
        ioas = ioas_alloc(iommu);
        attach(dev, ioas);
        unmap.ioas_id = ioas;
        for (;;) {
            ioas_map(iommu, ioas, mem, 65536, 0x100000);
            ioctl(dev, VFIO_DEVICE_GET_INFO, &info);
            ioctl(iommu, IOMMU_IOAS_UNMAP, &unmap);
            if (++n == 20 && write(ready[1], "r", 1) != 1)
                _exit(4);
        }
    }
    if (read(ready[0], &byte, 1) != 1)
        exit(2);
    kill(-child, SIGKILL);
    kill(child, SIGKILL);
    waitpid(child, &status, 0);
    VALUE("child_killed", "%d", WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
}

/* The daemon goes away under an open handle: every call fails at once, none hangs. */
static void case_gone(void)
{
    int iommu = open_node("iommu"), dev = open_node("vfio/devices/vfio0");
    struct vfio_device_info info = {.argsz = sizeof info};
    char line[16];

    CALL("bind", bind_iommufd(dev, iommu));
    printf("ready=1\n");
    fflush(stdout);
    if (fgets(line, sizeof line, stdin) == NULL) /* the test kills the daemon, then writes a line */
        exit(2);
    CALL("info_gone", ioctl(dev, VFIO_DEVICE_GET_INFO, &info));
    CALL("alloc_gone", ioctl(iommu, IOMMU_IOAS_ALLOC, &(struct iommu_ioas_alloc){.size = 12}));
    CALL("mmap_gone", mmap(NULL, 4096, PROT_READ, MAP_SHARED, dev, 0) == MAP_FAILED ? -1 : 0);
}

/* Threads share one device fd; each uses its own slot (its tid), so no thread ever sees
 * another thread's reply. */
static int shared_dev;

static void *hammer(void *index)
{
    long bad = 0, i;

    for (i = 0; i < 200; i++) {
        struct vfio_region_info region = {.argsz = sizeof region, .index = (uint32_t)(uintptr_t)index};
        if (ioctl(shared_dev, VFIO_DEVICE_GET_REGION_INFO, &region) != 0 ||
            region.offset != (uint64_t)REGION((uintptr_t)index))
            bad++;
    }
    return (void *)bad;
}

static void case_threads(void)
{
    int iommu = open_node("iommu");
    pthread_t threads[4];
    long bad = 0;
    void *result;
    uintptr_t i;

    shared_dev = open_node("vfio/devices/vfio0");
    CALL("bind", bind_iommufd(shared_dev, iommu));
    for (i = 0; i < 4; i++)
        pthread_create(&threads[i], NULL, hammer, (void *)i);
    for (i = 0; i < 4; i++) {
        pthread_join(threads[i], &result);
        bad += (long)result;
    }
    VALUE("thread_mismatches", "%ld", bad);
}

/* Under a finite RLIMIT_FSIZE a mailbox write fails with EFBIG; the library keeps the
 * SIGXFSZ that comes with it from killing the program. */
static void case_fsize(void)
{
    int iommu = open_node("iommu");
    struct rlimit lim = {1 << 20, 1 << 20};

    signal(SIGXFSZ, SIG_DFL);
    setrlimit(RLIMIT_FSIZE, &lim);
    CALL("api_version_fsize", ioctl(iommu, VFIO_GET_API_VERSION));
    CALL("api_version_fsize_again", ioctl(iommu, VFIO_GET_API_VERSION));
    close(iommu);
}

int main(int argc, char **argv)
{
    signal(SIGXFSZ, SIG_IGN);
    if (argc < 2)
        return 2;
    if (!strcmp(argv[1], "iommufd"))
        case_iommufd();
    else if (!strcmp(argv[1], "irqs"))
        case_irqs(argc > 2 ? argv[2] : "vfio/devices/vfio2");
    else if (!strcmp(argv[1], "dma"))
        case_dma();
    else if (!strcmp(argv[1], "legacy"))
        case_legacy();
    else if (!strcmp(argv[1], "mmap"))
        case_mmap();
    else if (!strcmp(argv[1], "dup"))
        case_dup();
    else if (!strcmp(argv[1], "fork"))
        case_fork();
    else if (!strcmp(argv[1], "kill"))
        case_kill();
    else if (!strcmp(argv[1], "threads"))
        case_threads();
    else if (!strcmp(argv[1], "fsize"))
        case_fsize();
    else if (!strcmp(argv[1], "gone"))
        case_gone();
    else
        return 2;
    return 0;
}
