/* vfiofs's interposition library (LD_PRELOAD): shared declarations.
 *
 * The library makes an unmodified C program that drives VFIO devices see a vfiofs mount:
 * paths.c redirects /dev/iommu, /dev/vfio/... and /sys/... into the mount; ioctl.c turns
 * ioctl(2) on a vfiofs node into the control protocol (docs/protocol.md) and mmap(2) of a
 * device region into the region's memory. `vfiofs run` sets VFIOFS_MOUNT and LD_PRELOAD. */
#ifndef VFIOFS_PRELOAD_H
#define VFIOFS_PRELOAD_H

#include <stddef.h>

/* The mount's root (from $VFIOFS_MOUNT), without a trailing slash; NULL when unset. */
const char *vfiofs_mount_root(void);

/* The real libc function behind an interposed one (dlsym(RTLD_NEXT)); aborts if missing. */
void *vfiofs_real(const char *name);

#endif
