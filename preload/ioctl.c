/* ioctl(2) on a vfiofs node, translated onto the control protocol (docs/protocol.md).
 *
 * VFIO and iommufd requests are _IO(';', nr): the number says nothing about the argument,
 * so a table per number says how the kernel takes it (a value, nothing, an int pointer, a
 * string, or a struct sized by its `argsz`/`size` field) and what must travel with it
 * (fd references, eventfds, a process proof). Requests on other fds go to the real ioctl. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "control.h"
#include "vfiofs_preload.h"

enum shape {
    S_NULL,   /* no argument (the pointer is not looked at) */
    S_VALUE,  /* the argument is an integer */
    S_ARGSZ,  /* vfio struct: the kernel copies max(minsz, argsz) */
    S_SIZE,   /* iommufd / extensible struct: u32 `size` (`argsz`) first, then that many bytes */
    S_INT,    /* int *: VFIO_GROUP_SET_CONTAINER */
    S_STRING, /* char *: VFIO_GROUP_GET_DEVICE_FD */
};

enum {
    F_FD8 = 1 << 0,       /* an fd number at payload offset 8 (BIND_IOMMUFD.iommufd) */
    F_FD0 = 1 << 1,       /* an fd number at payload offset 0 (the int of SET_CONTAINER) */
    F_EVENTFDS = 1 << 2,  /* SET_IRQS: an eventfd array after the 20-byte header */
    F_PROCESS = 1 << 3,   /* reaches into the caller's memory: prove the process */
    F_KEEP_FAILED = 1 << 4, /* may write back and fail (IOVA_RANGES' EMSGSIZE) */
    F_NEW_FD = 1 << 5,    /* returns a new fd (GET_DEVICE_FD) */
    F_IOMMUFD = 1 << 6,   /* an iommufd number: only the iommu node reads its argument */
};

struct command {
    uint32_t nr;
    enum shape shape;
    uint32_t minsz;
    uint32_t flags;
};

/* Every request the daemon implements (docs/protocol.md appendix A); minsz is the kernel's
 * offsetofend() of the struct's last mandatory field. */
static const struct command commands[] = {
    {0x64, S_NULL, 0, 0},                         /* VFIO_GET_API_VERSION */
    {0x65, S_VALUE, 0, 0},                        /* VFIO_CHECK_EXTENSION */
    {0x66, S_VALUE, 0, 0},                        /* VFIO_SET_IOMMU */
    {0x67, S_ARGSZ, 8, 0},                        /* VFIO_GROUP_GET_STATUS */
    {0x68, S_INT, 4, F_FD0},                      /* VFIO_GROUP_SET_CONTAINER */
    {0x69, S_NULL, 0, 0},                         /* VFIO_GROUP_UNSET_CONTAINER */
    {0x6a, S_STRING, 0, F_NEW_FD},                /* VFIO_GROUP_GET_DEVICE_FD */
    {0x6b, S_ARGSZ, 16, 0},                       /* VFIO_DEVICE_GET_INFO */
    {0x6c, S_ARGSZ, 32, 0},                       /* VFIO_DEVICE_GET_REGION_INFO */
    {0x6d, S_ARGSZ, 16, 0},                       /* VFIO_DEVICE_GET_IRQ_INFO */
    {0x6e, S_ARGSZ, 20, F_EVENTFDS},              /* VFIO_DEVICE_SET_IRQS */
    {0x6f, S_NULL, 0, 0},                         /* VFIO_DEVICE_RESET */
    {0x70, S_ARGSZ, 16, 0},                       /* VFIO_IOMMU_GET_INFO */
    {0x71, S_ARGSZ, 32, F_PROCESS},               /* VFIO_IOMMU_MAP_DMA */
    {0x72, S_ARGSZ, 24, 0},                       /* VFIO_IOMMU_UNMAP_DMA */
    {0x75, S_ARGSZ, 8, 0},                        /* VFIO_DEVICE_FEATURE */
    {0x76, S_SIZE, 4, F_FD8},                     /* VFIO_DEVICE_BIND_IOMMUFD (get_user(argsz) first) */
    {0x77, S_ARGSZ, 12, 0},                       /* VFIO_DEVICE_ATTACH_IOMMUFD_PT */
    {0x78, S_ARGSZ, 8, 0},                        /* VFIO_DEVICE_DETACH_IOMMUFD_PT */
    {0x80, S_SIZE, 4, F_IOMMUFD},                 /* IOMMU_DESTROY */
    {0x81, S_SIZE, 4, F_IOMMUFD},                 /* IOMMU_IOAS_ALLOC */
    {0x84, S_SIZE, 4, F_IOMMUFD | F_PROCESS | F_KEEP_FAILED}, /* IOMMU_IOAS_IOVA_RANGES */
    {0x85, S_SIZE, 4, F_IOMMUFD | F_PROCESS},     /* IOMMU_IOAS_MAP */
    {0x86, S_SIZE, 4, F_IOMMUFD},                 /* IOMMU_IOAS_UNMAP */
};

/* Other iommufd numbers (0x80..0x94) still have their `size` read on the iommu node, so
 * the daemon answers EFAULT / EINVAL / ENOTTY in the kernel's order. */
static const struct command other_iommufd = {0, S_SIZE, 4, F_IOMMUFD};
static const struct command unknown = {0, S_NULL, 0, 0};

static const struct command *lookup(uint32_t request, enum node_kind kind)
{
    size_t i;
    const struct command *c = &unknown;

    if ((request & 0xffffff00u) != 0x3b00u)
        return &unknown; /* not _IO(';', nr): the daemon says ENOTTY */
    for (i = 0; i < sizeof commands / sizeof *commands; i++)
        if (commands[i].nr == (request & 0xff))
            c = &commands[i];
    if (c == &unknown && (request & 0xff) >= 0x80 && (request & 0xff) <= 0x94)
        c = &other_iommufd;
    if ((c->flags & F_IOMMUFD) && kind != NODE_IOMMU)
        return &unknown; /* the kernel never reads it there: ENOTTY */
    return c;
}

static int fail(int err)
{
    errno = err;
    return -1;
}

/* How many bytes of the caller's struct the kernel would reach (before any cap). */
static int argument_length(const struct command *c, uintptr_t arg, uint32_t *len)
{
    uint32_t size = 0;
    char probe[256];
    size_t got, i, total = 0;

    switch (c->shape) {
    case S_INT:
        *len = 4;
        return 0;
    case S_ARGSZ:
    case S_SIZE:
        if (vffs_read_user(&size, arg, 4) != 4)
            return EFAULT;
        *len = size > c->minsz ? size : c->minsz;
        return 0;
    case S_STRING: /* up to and with the NUL, at most a page (the kernel's strndup_user) */
        while (total < 4096) {
            size_t want = 4096 - total < sizeof probe ? 4096 - total : sizeof probe;
            got = vffs_read_user(probe, arg + total, want);
            if (got == 0)
                break;
            for (i = 0; i < got; i++)
                if (probe[i] == '\0') {
                    *len = (uint32_t)(total + i + 1);
                    return 0;
                }
            total += got;
            if (got < want)
                break;
        }
        if (total == 0)
            return EFAULT;
        *len = (uint32_t)total;
        return 0;
    default:
        *len = 0;
        return 0;
    }
}

static int has_ref(const struct vffs_fdref *refs, uint32_t nrefs, int number)
{
    uint32_t i;

    for (i = 0; i < nrefs; i++)
        if (refs[i].fd == number)
            return 1;
    return 0;
}

static int add_ref(struct vffs_fdref *refs, uint32_t *nrefs, int own, int number)
{
    if (has_ref(refs, *nrefs, number))
        return 0;
    return vffs_resolve_fd(own, number, &refs[(*nrefs)++]);
}

/* SET_IRQS with DATA_EVENTFD: the daemon signals the eventfds itself, so they travel to it
 * over the fd channel before the command names them (docs/protocol.md §11). */
static int pass_eventfds(int fd, const unsigned char *payload, uint32_t len, struct vffs_fdref *refs,
                         uint32_t *nrefs)
{
    uint32_t flags, count, i, j;
    int numbers[VFFS_MAX_FDS];
    int nsend = 0, err;
    uint8_t parcel[VFFS_TOKEN_SIZE];

    if (len < 20)
        return 0;
    memcpy(&flags, payload + 4, 4);
    memcpy(&count, payload + 16, 4);
    if (!(flags & (1u << 2))) /* VFIO_IRQ_SET_DATA_EVENTFD */
        return 0;
    if (count > (len - 20) / 4)
        count = (len - 20) / 4;
    if (count > VFFS_MAX_FDS)
        count = VFFS_MAX_FDS;
    for (i = 0; i < count; i++) {
        int32_t n;

        memcpy(&n, payload + 20 + 4 * i, 4);
        if (n < 0 || has_ref(refs, *nrefs, n))
            continue;
        memset(&refs[*nrefs], 0, sizeof refs[*nrefs]);
        refs[*nrefs].fd = n;
        if (syscall(SYS_fcntl, n, F_GETFD) < 0) {
            refs[*nrefs].kind = VFFS_FD_NOT_OPEN;
        } else {
            refs[*nrefs].kind = VFFS_FD_PASSED;
            numbers[nsend++] = n;
        }
        (*nrefs)++;
    }
    if (nsend == 0)
        return 0;
    err = vffs_deposit(fd, numbers, nsend, parcel);
    if (err)
        return err;
    for (j = 0; j < *nrefs; j++)
        if (refs[j].kind == VFFS_FD_PASSED)
            memcpy(refs[j].token, parcel, VFFS_TOKEN_SIZE);
    return 0;
}

/* GET_DEVICE_FD returns a new fd in the kernel: open the device node the daemon named and
 * claim the grant on that fresh handle (docs/protocol.md §13). The fd, or -errno. */
static int open_granted_device(int group_fd, int64_t result)
{
    unsigned index = (unsigned)(result & 0xffff);
    uint64_t ticket = (uint64_t)result >> 16;
    char link[64], path[PATH_MAX + 32];
    char *slash;
    ssize_t n;
    int dev, err;
    int64_t claimed;
    int (*real_close)(int) = vfiofs_real("close");

    snprintf(link, sizeof link, "/proc/self/fd/%d", group_fd);
    n = syscall(SYS_readlinkat, AT_FDCWD, link, path, (size_t)PATH_MAX - 1);
    if (n < 0)
        return -EIO;
    path[n] = '\0';
    /* <root>/vfio/<G> → <root>/vfio/devices/vfio<index> */
    slash = strrchr(path, '/');
    if (slash == NULL)
        return -EIO;
    snprintf(slash, sizeof path - (size_t)(slash - path), "/devices/vfio%u", index);
    dev = (int)syscall(SYS_openat, AT_FDCWD, path, O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -vffs_daemon_errno(errno);
    err = vffs_transact(dev, VFFS_OP_CLAIM, 0, VFFS_ARG_NULL, ticket, NULL, 0, NULL, 0, NULL, 0, NULL, &claimed, 0,
                        NULL);
    if (err) {
        real_close(dev);
        return -err;
    }
    vffs_fd_forget(dev);
    return dev;
}

static int translate(int fd, enum node_kind kind, uint32_t request, uintptr_t arg)
{
    const struct command *c = lookup(request, kind);
    struct vffs_fdref *refs = NULL;
    unsigned char *payload = NULL, *reply = NULL;
    uint32_t nrefs = 0, len = 0, got_len = 0, room;
    uint32_t kind_arg = VFFS_ARG_NULL;
    uint64_t value = 0;
    int64_t result = 0;
    int err = 0, failed_reply = 0, ret = -1;
    size_t got, used;

    if (c->shape == S_VALUE) {
        kind_arg = VFFS_ARG_VALUE;
        value = arg;
    } else if (c->shape != S_NULL && arg != 0) {
        err = argument_length(c, arg, &len);
        if (err)
            return fail(err);
        if (len > VFFS_MAX_MESSAGE - sizeof(struct vffs_request_header))
            len = VFFS_MAX_MESSAGE - sizeof(struct vffs_request_header);
        payload = malloc(len ? len : 1);
        reply = malloc(len ? len : 1);
        refs = calloc(VFFS_MAX_FDS, sizeof *refs);
        if (payload == NULL || reply == NULL || refs == NULL) {
            err = ENOMEM;
            goto out;
        }
        got = vffs_read_user(payload, arg, len);
        if (got == 0 && len > 0) {
            err = EFAULT;
            goto out;
        }
        len = (uint32_t)got; /* what lies past a fault is the daemon's EFAULT, as the kernel's */
        kind_arg = VFFS_ARG_BUFFER;
        if (c->flags & (F_FD0 | F_FD8)) {
            uint32_t at = (c->flags & F_FD8) ? 8 : 0;
            int32_t n;
            if (len >= at + 4) {
                memcpy(&n, payload + at, 4);
                if (n >= 0 && (err = add_ref(refs, &nrefs, fd, n)) != 0)
                    goto out;
            }
        }
        if ((c->flags & F_EVENTFDS) && (err = pass_eventfds(fd, payload, len, refs, &nrefs)) != 0)
            goto out;
        if (c->flags & F_PROCESS) {
            uint8_t parcel[VFFS_TOKEN_SIZE];
            /* Without a proof (no channel) the daemon answers EPERM if it needs one. */
            if (vffs_deposit(fd, NULL, 0, parcel) == 0) {
                memset(&refs[nrefs], 0, sizeof refs[nrefs]);
                refs[nrefs].fd = 0;
                refs[nrefs].kind = VFFS_FD_PROCESS;
                memcpy(refs[nrefs].token, parcel, VFFS_TOKEN_SIZE);
                nrefs++;
            }
        }
        used = sizeof(struct vffs_request_header) + nrefs * sizeof *refs;
        if (len + used > VFFS_MAX_MESSAGE) /* a huge argsz: send what fits */
            len = used < VFFS_MAX_MESSAGE ? (uint32_t)(VFFS_MAX_MESSAGE - used) : 0;
    }
    room = len;
    err = vffs_transact(fd, VFFS_OP_IOCTL, request, kind_arg, value, refs, nrefs, payload, len, reply, room,
                        &got_len, &result, (c->flags & F_KEEP_FAILED) != 0, &failed_reply);
    if ((err == 0 || failed_reply) && kind_arg == VFFS_ARG_BUFFER && got_len == len) {
        /* Copy back what the command changed (never rewrite bytes it left alone). */
        uint32_t first = 0, last = len;
        while (first < len && payload[first] == reply[first])
            first++;
        while (last > first && payload[last - 1] == reply[last - 1])
            last--;
        if (first < last && vffs_write_user(arg + first, reply + first, last - first) != last - first && !err)
            err = EFAULT;
    }
    if (err)
        goto out;
    if (c->flags & F_NEW_FD) {
        ret = open_granted_device(fd, result);
        if (ret < 0)
            err = -ret;
    } else {
        ret = (int)result;
    }
out:
    free(payload);
    free(reply);
    free(refs);
    if (err)
        return fail(err);
    return ret;
}

int ioctl(int fd, unsigned long request, ...)
{
    static int (*real_ioctl)(int, unsigned long, ...);
    va_list ap;
    void *arg;
    enum node_kind kind;

    va_start(ap, request);
    arg = va_arg(ap, void *);
    va_end(ap);
    kind = vffs_node_kind(fd);
    if (kind == NODE_GONE)
        return fail(ENODEV);
    if (kind >= NODE_IOMMU)
        return translate(fd, kind, (uint32_t)request, (uintptr_t)arg);
    if (real_ioctl == NULL)
        real_ioctl = vfiofs_real("ioctl");
    return real_ioctl(fd, request, arg);
}
