/* vfiofs's interposition library (LD_PRELOAD): shared declarations.
 *
 * The library makes an unmodified C program that drives VFIO devices see a vfiofs mount:
 * paths.c redirects /dev/iommu, /dev/vfio/... and /sys/... into the mount; ioctl.c turns
 * ioctl(2) on a vfiofs node into the control protocol (docs/protocol.md) and mmap(2) of a
 * device region into the region's memory. `vfiofs run` sets VFIOFS_MOUNT and LD_PRELOAD. */
#ifndef VFIOFS_PRELOAD_H
#define VFIOFS_PRELOAD_H

#include <stddef.h>

/* The mount's root (from $VFIOFS_MOUNT, read once at load), without a trailing slash; NULL when
 * unset or not an absolute path. */
const char *vfiofs_mount_root(void);

/* The real libc function behind an interposed one (dlsym(RTLD_NEXT)); aborts if missing. */
void *vfiofs_real(const char *name);

/* Where `path` really is (paths.c): if it is one of the redirected device or sysfs paths, its
 * place in the mount is written to `out` (PATH_MAX bytes) and 1 returned; 0: use `path` as it is
 * (out is scratch then); -1 with errno ENAMETOOLONG when the rewritten path does not fit.
 * Async-signal-safe; errno is kept unless -1. */
int vfiofs_redirect(const char *path, char *out);

#endif
