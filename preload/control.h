/* The control protocol (docs/protocol.md) as the interposition library speaks it:
 * per-process state, node kinds, one round trip in the caller thread's slot, the fd channel. */
#ifndef VFIOFS_CONTROL_H
#define VFIOFS_CONTROL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Internal to the library: never exported, never clashing with the program's own names. */
#pragma GCC visibility push(hidden)

#define VFFS_MAGIC 0x53464656u
#define VFFS_CONTROL_BASE (1ULL << 62)
#define VFFS_MAX_MESSAGE 65536u
#define VFFS_MAX_FDS 2048u
#define VFFS_TOKEN_SIZE 16

enum { VFFS_OP_IOCTL = 1, VFFS_OP_GET_TOKEN, VFFS_OP_MAP_REGION, VFFS_OP_FD_CHANNEL, VFFS_OP_CLAIM };
enum { VFFS_ARG_NULL = 0, VFFS_ARG_BUFFER, VFFS_ARG_VALUE };
enum { VFFS_FD_NOT_OPEN = 1, VFFS_FD_FOREIGN, VFFS_FD_HANDLE, VFFS_FD_PASSED, VFFS_FD_PROCESS };

struct vffs_request_header {
    uint32_t magic;
    uint16_t version, header_size;
    uint32_t op, request, arg_kind, nfds;
    uint64_t arg_value;
    uint32_t payload_len, reserved0;
    uint64_t reserved1;
};

struct vffs_reply_header {
    uint32_t magic;
    uint16_t version, header_size;
    uint32_t op, request;
    int64_t result;
    uint32_t payload_len, reserved;
};

struct vffs_fdref {
    int32_t fd;
    uint32_t kind;
    uint8_t token[VFFS_TOKEN_SIZE];
};

/* What an fd is. NODE_NONE: not on the mount (pass through); NODE_OTHER: on the mount but
 * without a mailbox (directories, sys/ files); NODE_GONE: on a mount whose daemon went away. */
enum node_kind { NODE_NONE = 0, NODE_OTHER, NODE_GONE, NODE_IOMMU, NODE_CONTAINER, NODE_GROUP, NODE_DEVICE };

/* The kind of `fd` (cached per process by fd number, checked against st_ino every call).
 * errno is kept. */
enum node_kind vffs_node_kind(int fd);

/* The errno for a failed system call on a node: ENODEV once the daemon is gone (FUSE's
 * ENOTCONN, ECONNABORTED), else `e`. */
int vffs_daemon_errno(int e);

/* One round trip in this thread's slot of `fd`. Returns 0 and fills *result (and the reply
 * payload, at most `room` bytes, its length in *reply_len) or an errno. `keep_failed`: on a
 * failed pwrite, read the reply a failing command may have left (docs/protocol.md §4.3). */
int vffs_transact(int fd, uint32_t op, uint32_t request, uint32_t arg_kind, uint64_t arg_value,
                  const struct vffs_fdref *fds, uint32_t nfds, const void *payload, uint32_t len,
                  void *reply, uint32_t room, uint32_t *reply_len, int64_t *result, int keep_failed,
                  int *failed_reply);

/* Resolve fd number `n` for a command written to `own` (docs/protocol.md §5.3). */
int vffs_resolve_fd(int own, int n, struct vffs_fdref *ref);

/* Deposit descriptors (numbers[i] naming fds[i]; count may be 0: a process proof) as a fresh
 * parcel on the fd channel of `own`'s mount; fills `parcel`. Returns 0 or an errno. */
int vffs_deposit(int own, const int *numbers, int count, uint8_t parcel[VFFS_TOKEN_SIZE]);

/* Random bytes for parcel ids and socket names. */
void vffs_random(void *buf, size_t len);

/* Safe copies from and to the caller's memory (EFAULT rather than SIGSEGV): bytes done. */
size_t vffs_read_user(void *dst, uintptr_t src, size_t len);
size_t vffs_write_user(uintptr_t dst, const void *src, size_t len);

/* fd identity: the per-fd cache follows close/dup (fds.c). */
void vffs_fd_forget(int fd);
void vffs_fd_copy(int oldfd, int newfd);

/* Register traps (trap.c): PROT_NONE pages of a BAR mapping whose loads and stores become
 * pread/pwrite of `fd` at `base` + (address - start) (stores only if `prot` has PROT_WRITE;
 * nothing is trapped without PROT_READ). Returns 0 or an errno. */
int vffs_trap_supported(void);
int vffs_trap_add(uintptr_t start, uintptr_t end, int fd, uint64_t base, int prot);
/* [start, end) is no longer (all) ours: munmap, or a MAP_FIXED mapping over it. */
void vffs_trap_forget(uintptr_t start, uintptr_t end);

#pragma GCC visibility pop

#endif
