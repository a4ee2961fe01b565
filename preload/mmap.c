/* mmap(2) of a vfiofs device region: FUSE cannot map a device node, so the region's memory
 * comes over a one-shot abstract socket (docs/protocol.md §10) and is mapped where the
 * caller asked (MAP_FIXED included). Other mappings go to the real mmap; munmap needs nothing. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
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
    int conn, fd = -1;

    /* The daemon connected before the pwrite returned: this never waits in practice. */
    if (poll(&p, 1, 10000) != 1)
        return -EIO;
    conn = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    if (conn < 0)
        return -EIO;
    if (recvmsg(conn, &mh, MSG_CMSG_CLOEXEC) >= 0)
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
    int listener, memfd, err, i;
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
    p = real_mmap()(addr, len, prot, flags, memfd, (off_t)region_off);
    err = errno;
    real_close(memfd);
    errno = err;
    return p;
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    enum node_kind kind;

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
