/* Timing loops for the interposition library, run by bench/run.py with LD_PRELOAD and
 * VFIOFS_MOUNT set. Each operation is timed on its own (CLOCK_MONOTONIC, ns) and every
 * sample is printed, one per line, after a "# name" line; run.py takes the medians.
 *
 *   preload_bench ioctl N           VFIO_DEVICE_GET_REGION_INFO on bound vfio0 (ram0)
 *   preload_bench pread N PATH      4-byte pread at offset 0 of PATH (a vfiofs node: bound vfio0
 *                                   BAR0 through the library; any other file: as is)
 *   preload_bench trap N            4-byte loads and stores of showcase (vfio2) BAR1's register at 0x100
 *                                   through a whole-BAR mapping (a trapped page), and pread/pwrite of it
 *   preload_bench memcpy N          1 MiB copies out of / into showcase (vfio2) BAR2 mapped
 *                                   through the library, and the same on anonymous memory */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "../tests/c/vfio_test.h"

static uint64_t now(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static int bound(const char *node, int *iommu)
{
    int dev;

    *iommu = open_node("iommu");
    dev = open_node(node);
    if (bind_iommufd(dev, *iommu) != 0) {
        perror("bind");
        exit(1);
    }
    return dev;
}

static void report(const char *name, const uint64_t *samples, int n)
{
    printf("# %s\n", name);
    for (int i = 0; i < n; i++)
        printf("%llu\n", (unsigned long long)samples[i]);
}

/* Run the statement (it may use i: negative while warming up) 200 times untimed, then n times
 * timed into t[]; report the samples. */
#define TIMED(name, ...)                        \
    do {                                        \
        for (int i = -200; i < n; i++) {        \
            uint64_t t0_ = now();               \
            __VA_ARGS__;                        \
            if (i >= 0)                         \
                t[i] = now() - t0_;             \
        }                                       \
        report(name, t, n);                     \
    } while (0)

int main(int argc, char **argv)
{
    int n = argc > 2 ? atoi(argv[2]) : 0, iommu = -1;
    uint64_t *t = calloc(n > 0 ? n : 1, sizeof *t), t0;

    if (argc < 3 || n <= 0 || t == NULL) {
        fprintf(stderr, "usage: preload_bench ioctl|pread|trap|memcpy N [PATH]\n");
        return 2;
    }
    if (strcmp(argv[1], "ioctl") == 0) {
        int dev = bound("vfio/devices/vfio0", &iommu);
        struct vfio_region_info info = {.argsz = sizeof info, .index = 0};

        TIMED("ioctl", if (ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, &info) != 0) {
            perror("GET_REGION_INFO");
            return 1;
        });
    } else if (strcmp(argv[1], "pread") == 0 && argc > 3) {
        int fd = strstr(argv[3], "/vfio/devices/") ? bound("vfio/devices/vfio0", &iommu) : open(argv[3], O_RDWR);
        uint32_t value;

        TIMED("pread", if (pread(fd, &value, 4, 0) != 4) {
            perror("pread");
            return 1;
        });
    } else if (strcmp(argv[1], "trap") == 0) {
        int dev = bound("vfio/devices/vfio2", &iommu);
        const size_t size = 64 * 1024;
        volatile uint32_t *bar = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, dev, REGION(1));
        volatile uint32_t *reg;
        uint32_t value = 0;

        if (bar == MAP_FAILED) {
            perror("mmap BAR1");
            return 1;
        }
        reg = bar + 0x100 / 4;
        TIMED("trap.load", value += *reg);
        TIMED("trap.store", *reg = (uint32_t)i);
        TIMED("pread", if (pread(dev, &value, 4, REGION(1) + 0x100) != 4) return 1);
        TIMED("pwrite", if (pwrite(dev, &value, 4, REGION(1) + 0x100) != 4) return 1);
    } else if (strcmp(argv[1], "memcpy") == 0) {
        const size_t size = 1 << 20;
        int dev = bound("vfio/devices/vfio2", &iommu);
        char *bar = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, dev, REGION(2));
        char *anon = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        char *buf = malloc(size);
        char *targets[2] = {bar, anon};
        const char *names[2] = {"bar.read", "anon.read"};
        const char *wnames[2] = {"bar.write", "anon.write"};

        if (bar == MAP_FAILED || anon == MAP_FAILED || buf == NULL) {
            perror("mmap");
            return 1;
        }
        memset(buf, 0x5a, size);
        for (int k = 0; k < 2; k++) {
            memcpy(targets[k], buf, size); /* fault every page in first */
            for (int i = 0; i < n; i++) {
                t0 = now();
                memcpy(buf, targets[k], size);
                __asm__ volatile("" ::: "memory");
                t[i] = now() - t0;
            }
            report(names[k], t, n);
            for (int i = 0; i < n; i++) {
                t0 = now();
                memcpy(targets[k], buf, size);
                __asm__ volatile("" ::: "memory");
                t[i] = now() - t0;
            }
            report(wnames[k], t, n);
        }
    } else {
        fprintf(stderr, "preload_bench: unknown mode %s\n", argv[1]);
        return 2;
    }
    return 0;
}
