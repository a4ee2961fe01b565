/* mmap(2) of a vfiofs device region: FUSE cannot map a device node, so the region's memory
 * comes over a one-shot abstract socket (docs/protocol.md §10) and is mapped where the
 * caller asked (MAP_FIXED included). A BAR with sparse mmap areas gets only its areas from the
 * memfd; its other pages are PROT_NONE and trapped (trap.c). Other mappings go to the real mmap. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "control.h"
#include "vfiofs_preload.h"

typedef void *(*mmap_fn)(void *, size_t, int, int, int, off_t);

static mmap_fn real_mmap(void)
{
    static mmap_fn fn;

    if (fn == NULL)
        fn = (mmap_fn)vfiofs_real("mmap");
    return fn;
}

#define VFIO_DEVICE_GET_REGION_INFO 0x3b6cu
#define REGION_INFO_FLAG_CAPS (1u << 3)
#define REGION_INFO_CAP_SPARSE_MMAP 1
#define MAX_AREAS 64

struct area {
    uint64_t offset, size;
};

/* The sparse mmap areas of region `index` (GET_REGION_INFO through the control path): their
 * count, 0 for a region without the capability, -errno on failure. */
static int sparse_areas(int fd, uint32_t index, struct area *areas)
{
    static const uint32_t room = 4096;
    unsigned char *info = calloc(1, room), *reply = calloc(1, room);
    uint32_t flags, cap_offset, got = 0, nr, i;
    int64_t result;
    int err, n = 0;

    if (info == NULL || reply == NULL) {
        n = -ENOMEM;
        goto out;
    }
    memcpy(info, &room, 4);
    memcpy(info + 8, &index, 4);
    err = vffs_transact(fd, VFFS_OP_IOCTL, VFIO_DEVICE_GET_REGION_INFO, VFFS_ARG_BUFFER, 0, NULL, 0, info, room,
                        reply, room, &got, &result, 0, NULL);
    if (err) {
        n = -err;
        goto out;
    }
    memcpy(&flags, reply + 4, 4);
    memcpy(&cap_offset, reply + 12, 4);
    if (!(flags & REGION_INFO_FLAG_CAPS))
        goto out;
    /* Walk the chain (header: u16 id, u16 version, u32 next; offsets from the struct's start). */
    while (cap_offset != 0 && (uint64_t)cap_offset + 16 <= got) { /* 64-bit: no wrap past the buffer */
        uint16_t id;
        uint32_t next;
        memcpy(&id, reply + cap_offset, 2);
        memcpy(&next, reply + cap_offset + 4, 4);
        if (id == REGION_INFO_CAP_SPARSE_MMAP) {
            memcpy(&nr, reply + cap_offset + 8, 4);
            for (i = 0; i < nr && i < MAX_AREAS && (uint64_t)cap_offset + 16 + 16 * (i + 1) <= got; i++) {
                memcpy(&areas[i].offset, reply + cap_offset + 16 + 16 * i, 8);
                memcpy(&areas[i].size, reply + cap_offset + 24 + 16 * i, 8);
            }
            n = (int)i;
            if (n == 0)
                n = -ENOENT; /* sparse, but nothing mappable: every page is trapped */
            break;
        }
        if (next <= cap_offset)
            break;
        cap_offset = next;
    }
out:
    free(info);
    free(reply);
    return n;
}

/* Map [region_off, region_off + length) of a sparse BAR at `addr`: the areas from the memfd,
 * the rest PROT_NONE and registered as traps on `fd`. */
static void *map_trapped(void *addr, int prot, int flags, int fd, int memfd, uint64_t index, uint64_t region_off,
                         uint64_t length, const struct area *areas, int nareas)
{
    uintptr_t base;
    uint64_t at, end = region_off + length, page = (uint64_t)sysconf(_SC_PAGESIZE);
    int i, err;
    void *p;

    p = real_mmap()(addr, length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | (flags & MAP_FIXED), -1, 0);
    if (p == MAP_FAILED)
        return p;
    base = (uintptr_t)p;
    for (i = 0; i < nareas; i++) {
        uint64_t from = areas[i].offset > region_off ? areas[i].offset : region_off;
        uint64_t to = areas[i].offset + areas[i].size < end ? areas[i].offset + areas[i].size : end;
        from &= ~(page - 1);
        to = (to + page - 1) & ~(page - 1);
        if (from >= to)
            continue;
        if (real_mmap()((void *)(base + (from - region_off)), to - from, prot, (flags & ~MAP_TYPE) | MAP_SHARED | MAP_FIXED,
                        memfd, (off_t)from) == MAP_FAILED)
            goto fail;
    }
    /* Register each trapped run between the areas. */
    for (at = region_off; at < end;) {
        uint64_t stop = end, next = end;
        int inside = 0;
        for (i = 0; i < nareas; i++) {
            uint64_t a0 = areas[i].offset & ~(page - 1), a1 = (areas[i].offset + areas[i].size + page - 1) & ~(page - 1);
            if (at >= a0 && at < a1) {
                inside = 1;
                next = a1;
            } else if (a0 > at && a0 < stop) {
                stop = a0;
            }
        }
        if (inside) {
            at = next;
            continue;
        }
        if ((err = vffs_trap_add(base + (at - region_off), base + (stop - region_off), fd, (index << 40) + at, prot)) != 0) {
            errno = err;
            goto fail;
        }
        at = stop;
    }
    return p;
fail:
    err = errno;
    vffs_trap_forget(base, base + length);
    munmap(p, length);
    errno = err;
    return MAP_FAILED;
}

/* Accept the daemon's connection and take the one descriptor it sends. */
static int receive_memfd(int listener)
{
    struct pollfd p = {listener, POLLIN, 0};
    char data[32];
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    struct iovec iov = {data, sizeof data};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                        .msg_controllen = sizeof control.buf};
    struct cmsghdr *cm;
    int (*real_close)(int) = vfiofs_real("close");
    int conn, fd = -1, ready;
    ssize_t got;

    /* The daemon connected before the pwrite returned: this never waits in practice. A signal
     * handler of the program's must not turn the mmap into EIO. */
    do
        ready = poll(&p, 1, 10000);
    while (ready < 0 && errno == EINTR);
    if (ready != 1)
        return -EIO;
    do
        conn = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    while (conn < 0 && errno == EINTR);
    if (conn < 0)
        return -EIO;
    do
        got = recvmsg(conn, &mh, MSG_CMSG_CLOEXEC);
    while (got < 0 && errno == EINTR);
    if (got >= 0)
        for (cm = CMSG_FIRSTHDR(&mh); cm != NULL; cm = CMSG_NXTHDR(&mh, cm))
            if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS && cm->cmsg_len >= CMSG_LEN(sizeof(int)))
                memcpy(&fd, CMSG_DATA(cm), sizeof fd);
    real_close(conn);
    return fd >= 0 ? fd : -EIO;
}

static void *map_region(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    const uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    uint64_t index = (uint64_t)off >> 40, region_off = (uint64_t)off & ((1ULL << 40) - 1);
    uint64_t length = ((uint64_t)len + page - 1) & ~(page - 1);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    unsigned char payload[24 + 39];
    unsigned char rnd[16];
    uint32_t zero = 0, idx = (uint32_t)index;
    int64_t result;
    int (*real_close)(int) = vfiofs_real("close");
    int listener, memfd, err, i, nareas, trapped = 0;
    struct area areas[MAX_AREAS];
    void *p;

    if (len == 0 || off < 0 || ((uint64_t)off & (page - 1)) || index > UINT32_MAX) {
        errno = EINVAL;
        return MAP_FAILED;
    }
    if ((flags & MAP_TYPE) != MAP_SHARED && (flags & MAP_TYPE) != MAP_SHARED_VALIDATE) {
        errno = EINVAL; /* vfio-pci maps only VM_SHARED */
        return MAP_FAILED;
    }
    vffs_random(rnd, sizeof rnd);
    memcpy(sa.sun_path + 1, "vfiofs-", 7);
    for (i = 0; i < 16; i++)
        snprintf(sa.sun_path + 8 + 2 * i, 3, "%02x", rnd[i]);
    listener = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (listener < 0)
        return MAP_FAILED;
    if (bind(listener, (struct sockaddr *)&sa, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + 39)) ||
        listen(listener, 1)) {
        err = errno;
        real_close(listener);
        errno = err;
        return MAP_FAILED;
    }
    memcpy(payload, &idx, 4);
    memcpy(payload + 4, &zero, 4);
    memcpy(payload + 8, &region_off, 8);
    memcpy(payload + 16, &length, 8);
    memcpy(payload + 24, sa.sun_path + 1, 39);
    err = vffs_transact(fd, VFFS_OP_MAP_REGION, 0, VFFS_ARG_BUFFER, 0, NULL, 0, payload, sizeof payload, NULL, 0,
                        NULL, &result, 0, NULL);
    memfd = err ? -err : receive_memfd(listener);
    real_close(listener);
    if (memfd < 0) {
        errno = -memfd;
        return MAP_FAILED;
    }
    /* The memfd's offsets are the region's offsets. */
    nareas = index <= 5 && vffs_trap_supported() ? sparse_areas(fd, (uint32_t)index, areas) : 0;
    if (nareas == -ENOENT)
        nareas = 0, trapped = 1;
    if (nareas < 0) {
        real_close(memfd);
        errno = -nareas;
        return MAP_FAILED;
    }
    if (nareas > 0 || trapped)
        p = map_trapped(addr, prot, flags, fd, memfd, index, region_off, length, areas, nareas);
    else
        p = real_mmap()(addr, len, prot, flags, memfd, (off_t)region_off);
    err = errno;
    real_close(memfd);
    errno = err;
    return p;
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    enum node_kind kind;

    if ((flags & MAP_FIXED) && len > 0)
        vffs_trap_forget((uintptr_t)addr, (uintptr_t)addr + len); /* whatever was there is gone */
    if (fd < 0 || (flags & MAP_ANONYMOUS))
        return real_mmap()(addr, len, prot, flags, fd, off);
    kind = vffs_node_kind(fd);
    if (kind == NODE_DEVICE)
        return map_region(addr, len, prot, flags, fd, off);
    if (kind == NODE_GONE || kind >= NODE_IOMMU) {
        errno = ENODEV; /* no mmap on /dev/iommu, containers and groups; or the daemon is gone */
        return MAP_FAILED;
    }
    return real_mmap()(addr, len, prot, flags, fd, off);
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    return mmap(addr, len, prot, flags, fd, off);
}

int munmap(void *addr, size_t len)
{
    static int (*real_munmap)(void *, size_t);

    if (real_munmap == NULL)
        real_munmap = vfiofs_real("munmap");
    if (len > 0)
        vffs_trap_forget((uintptr_t)addr, (uintptr_t)addr + len);
    return real_munmap(addr, len);
}
