/* fd identity: the library caches what each fd number is (control.c); these keep that cache
 * right when numbers are closed or duplicated (a dup of a node fd is the same handle). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <unistd.h>

#include "control.h"
#include "vfiofs_preload.h"

int close(int fd)
{
    static int (*real)(int);

    if (real == NULL)
        real = vfiofs_real("close");
    vffs_fd_forget(fd);
    return real(fd);
}

int dup(int fd)
{
    static int (*real)(int);
    int n;

    if (real == NULL)
        real = vfiofs_real("dup");
    n = real(fd);
    if (n >= 0)
        vffs_fd_copy(fd, n);
    return n;
}

int dup2(int fd, int newfd)
{
    static int (*real)(int, int);
    int n;

    if (real == NULL)
        real = vfiofs_real("dup2");
    n = real(fd, newfd);
    if (n >= 0)
        vffs_fd_copy(fd, n);
    return n;
}

int dup3(int fd, int newfd, int flags)
{
    static int (*real)(int, int, int);
    int n;

    if (real == NULL)
        real = vfiofs_real("dup3");
    n = real(fd, newfd, flags);
    if (n >= 0)
        vffs_fd_copy(fd, n);
    return n;
}

typedef int (*fcntl_fn)(int, int, ...);

static int do_fcntl(fcntl_fn *real, const char *name, int fd, int cmd, void *arg)
{
    int n;

    if (*real == NULL)
        *real = (fcntl_fn)dlsym(RTLD_NEXT, name); /* fcntl64: glibc 2.28 and later */
    if (*real == NULL)
        *real = (fcntl_fn)vfiofs_real("fcntl");
    n = (*real)(fd, cmd, arg);
    if (n >= 0 && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC))
        vffs_fd_copy(fd, n);
    return n;
}

int fcntl(int fd, int cmd, ...)
{
    va_list ap;
    void *arg;

    va_start(ap, cmd);
    arg = va_arg(ap, void *);
    va_end(ap);
    static fcntl_fn real;

    return do_fcntl(&real, "fcntl", fd, cmd, arg);
}

int fcntl64(int fd, int cmd, ...)
{
    va_list ap;
    void *arg;

    va_start(ap, cmd);
    arg = va_arg(ap, void *);
    va_end(ap);
    static fcntl_fn real;

    return do_fcntl(&real, "fcntl64", fd, cmd, arg);
}

int close_range(unsigned int first, unsigned int last, int flags)
{
    static int (*real)(unsigned int, unsigned int, int);
    unsigned int fd;
    int n;

    if (real == NULL)
        real = (int (*)(unsigned int, unsigned int, int))dlsym(RTLD_NEXT, "close_range");
    if (real == NULL) {
        errno = ENOSYS;
        return -1;
    }
    n = real(first, last, flags);
    if (n == 0 && !(flags & 4 /* CLOSE_RANGE_CLOEXEC */))
        for (fd = first; fd <= last && fd < 4096; fd++)
            vffs_fd_forget((int)fd);
    return n;
}
