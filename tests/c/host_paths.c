/* A driver written for a real host: it finds its device the way the kernel's VFIO selftests
 * do (/sys/bus/pci/devices/<bdf>/vfio-dev/, the iommu_group link) and uses only /dev paths,
 * never the mount's. Run under `vfiofs run`, it binds through the cdev, maps a DMA buffer,
 * maps BAR0 and checks it against pread, then repeats the setup through the legacy group and
 * /dev/iommu as the container (iommufd's VFIO compatibility). Prints name=value lines. */
#define _GNU_SOURCE /* before any libc header: vfio_test.h uses GNU strerrorname_np */
#include <dirent.h>
#include <libgen.h>
#include <limits.h>
#include <sys/mman.h>

#include "vfio_test.h"

static int open_dev(const char *path)
{
    int fd = open(path, O_RDWR);

    if (fd < 0) {
        printf("open %s=%s\n", path, errname(errno));
        exit(1);
    }
    return fd;
}

int main(int argc, char **argv)
{
    const char *bdf = argc > 1 ? argv[1] : "0000:00:01.0";
    char path[PATH_MAX], link[PATH_MAX], cdev[300] = "";
    struct dirent *entry;
    DIR *dir;
    ssize_t n;

    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/vfio-dev/", bdf);
    dir = opendir(path);
    if (dir == NULL) {
        printf("opendir=%s\n", errname(errno));
        return 1;
    }
    while ((entry = readdir(dir)) != NULL)
        if (strncmp(entry->d_name, "vfio", 4) == 0)
            snprintf(cdev, sizeof cdev, "/dev/vfio/devices/%s", entry->d_name);
    closedir(dir);
    VALUE("cdev", "%s", cdev);

    /* cdev + iommufd */
    int iommu = open_dev("/dev/iommu"), dev = open_dev(cdev);
    CALL("bind", bind_iommufd(dev, iommu));
    uint32_t ioas = ioas_alloc(iommu);
    CALL("attach", attach(dev, ioas));
    void *buf = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CALL("ioas_map", ioas_map(iommu, ioas, buf, 4096, 0x10000));
    struct vfio_region_info bar0 = {.argsz = sizeof bar0, .index = 0};
    CALL("bar0_info", ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, &bar0));
    VALUE("bar0_size", "%llu", (unsigned long long)bar0.size);
    uint16_t vendor = 0;
    CALL("config_pread", (int)pread(dev, &vendor, 2, REGION(7)));
    VALUE("vendor", "%#x", vendor);
    uint32_t *bar = mmap(NULL, bar0.size, PROT_READ | PROT_WRITE, MAP_SHARED, dev, REGION(0));
    if (bar == MAP_FAILED) {
        printf("bar_mmap=%s\n", errname(errno));
        return 1;
    }
    bar[4] = 0xfeedf00d;
    uint32_t back = 0;
    CALL("bar_pread", (int)pread(dev, &back, 4, REGION(0) + 16));
    VALUE("through_mapping", "%#x", back);
    munmap(bar, bar0.size);
    close(dev);

    /* the legacy group, with /dev/iommu as its container */
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/iommu_group", bdf);
    n = readlink(path, link, sizeof link - 1);
    if (n < 0) {
        printf("readlink=%s\n", errname(errno));
        return 1;
    }
    link[n] = '\0';
    snprintf(path, sizeof path, "/dev/vfio/%s", basename(link));
    VALUE("group", "%s", path);
    int container = open_dev("/dev/iommu"), group = open_dev(path);
    CALL("api_version", ioctl(container, VFIO_GET_API_VERSION));
    CALL("set_container", ioctl(group, VFIO_GROUP_SET_CONTAINER, &container));
    CALL("check_type1v2", ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU));
    CALL("set_iommu", ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU));
    int device = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, bdf);
    VALUE("device_fd", "%s", device >= 0 ? "new" : errname(errno));
    struct vfio_iommu_type1_dma_map map = {.argsz = sizeof map, .flags = 3, .vaddr = (uintptr_t)buf,
                                           .iova = 0x20000, .size = 4096};
    CALL("map_dma", ioctl(container, VFIO_IOMMU_MAP_DMA, &map));
    struct vfio_device_info info = {.argsz = sizeof info};
    CALL("device_info", ioctl(device, VFIO_DEVICE_GET_INFO, &info));
    VALUE("num_regions", "%u", info.num_regions);
    close(device);
    close(group);
    close(container);
    close(iommu);
    return 0;
}
