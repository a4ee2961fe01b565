/* Path redirection: a program that opens the device nodes and sysfs files of VFIO devices finds
 * the mount's instead.
 *
 *   /dev/iommu                          -> <mnt>/iommu
 *   /dev/vfio[/...]                     -> <mnt>/vfio[/...]   (the container, groups, devices/vfioN)
 *   /sys/bus/pci/devices/<bdf>[/...]    -> <mnt>/sys/bus/pci/devices/<bdf>[/...]  if the mount has <bdf>
 *   /sys/kernel/iommu_groups/<n>[/...]  -> <mnt>/sys/kernel/iommu_groups/<n>[/...] if the mount has <n>
 *   /sys/kernel/debug/iommu[/...]       -> <mnt>/sys/kernel/debug/iommu[/...], which does not exist:
 *                                          the selftests probe Intel IOMMU debugfs, which says
 *                                          nothing about an emulated device
 *
 * Everything else, and every relative path, goes to libc untouched: a host's real PCI devices stay
 * visible. The mount's sys/ tree has the layout of the real /sys from the device directory down,
 * and its links are relative, so a link target read through a redirected path resolves (when the
 * program opens it, by the same rules) to the same place in the mount.
 *
 * glibc opens the files of opendir(), fopen() and realpath() through internal calls an interposed
 * open() never sees, so each is interposed by name. Each wrapper rewrites into a stack buffer and
 * calls the real function: no allocation, no locks, async-signal-safe where the libc call is. */
#define _GNU_SOURCE
#undef _FILE_OFFSET_BITS /* open and open64 are two symbols here, whatever the build flags say */
#undef _FORTIFY_SOURCE   /* which would make open() an inline wrapper we could not define */
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>

#include "vfiofs_preload.h"

#ifndef __OPEN_NEEDS_MODE
#define __OPEN_NEEDS_MODE(flags) (((flags) & O_CREAT) != 0 || ((flags) & O_TMPFILE) == O_TMPFILE)
#endif

/* -- the real functions ------------------------------------------------------------------------ */

#define REAL_FUNCTIONS(X)                                                                           \
    X(open) X(open64) X(openat) X(openat64) X(__open_2) X(__open64_2) X(__openat_2) X(__openat64_2) \
    X(opendir) X(fopen) X(fopen64)                                                                  \
    X(stat) X(stat64) X(lstat) X(lstat64) X(fstatat) X(fstatat64) X(statx)                          \
    X(__xstat) X(__xstat64) X(__lxstat) X(__lxstat64) X(__fxstatat) X(__fxstatat64)                 \
    X(access) X(faccessat) X(euidaccess) X(eaccess)                                                 \
    X(readlink) X(readlinkat) X(__readlink_chk) X(__readlinkat_chk)                                 \
    X(realpath) X(__realpath_chk)                                                                   \
    X(getxattr) X(lgetxattr) X(listxattr) X(llistxattr)

#define AS_ENUM(name) REAL_##name,
#define AS_NAME(name) #name,
enum { REAL_FUNCTIONS(AS_ENUM) REAL_COUNT };
static const char *const real_names[REAL_COUNT] = { REAL_FUNCTIONS(AS_NAME) };
static void *real_fns[REAL_COUNT];

/* Resolved all at once when the library loads (dlsym is not async-signal-safe); a call that comes
 * earlier, from another library's constructor, resolves its own. */
__attribute__((constructor)) static void resolve_all(void)
{
    for (int i = 0; i < REAL_COUNT; i++)
        if (__atomic_load_n(&real_fns[i], __ATOMIC_ACQUIRE) == NULL)
            __atomic_store_n(&real_fns[i], dlsym(RTLD_NEXT, real_names[i]), __ATOMIC_RELEASE);
}

static void *real(int id)
{
    void *fn = __atomic_load_n(&real_fns[id], __ATOMIC_ACQUIRE);

    if (fn == NULL) {
        fn = vfiofs_real(real_names[id]);
        __atomic_store_n(&real_fns[id], fn, __ATOMIC_RELEASE);
    }
    return fn;
}

#define REAL(name, type) ((type)real(REAL_##name))

/* -- the rewriting ----------------------------------------------------------------------------- */

struct component {
    const char *start;
    size_t len;
    const char *end; /* just after it: the rest of the path starts here */
};

/* The next component at or after `p`, skipping slashes and "." (len 0 at the end of the path). */
static const char *next_component(const char *p, struct component *c)
{
    for (;;) {
        while (*p == '/')
            p++;
        c->start = p;
        while (*p != '\0' && *p != '/')
            p++;
        c->len = (size_t)(p - c->start);
        c->end = p;
        if (!(c->len == 1 && c->start[0] == '.'))
            return p;
    }
}

static int is(const struct component *c, const char *word)
{
    size_t n = strlen(word);

    return c->len == n && memcmp(c->start, word, n) == 0;
}

/* Whether the rest of a path, read from a place `depth` levels below the mapped root, stays at or
 * below `floor` levels: ".." out of the redirected part (e.g. /dev/vfio/../null) is not ours. */
static int stays_below(const char *rest, int depth, int floor)
{
    struct component c;

    for (;;) {
        rest = next_component(rest, &c);
        if (c.len == 0)
            return 1;
        if (c.len == 2 && c.start[0] == '.' && c.start[1] == '.') {
            if (--depth < floor)
                return 0;
        } else {
            depth++;
        }
    }
}

/* out = root "/" mapped, if it fits; else -1 (ENAMETOOLONG). Returns the length. */
static int put(char *out, size_t at, const char *text, size_t n)
{
    if (at + n >= PATH_MAX) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(out + at, text, n);
    out[at + n] = '\0';
    return (int)(at + n);
}

/* Whether the mount has this entry (written in `out`): a raw syscall, so errno and async-signal
 * safety stay as they were, and no interposed function is re-entered. */
static int mount_has(const char *out)
{
    int saved = errno;
    long rc = syscall(SYS_faccessat, AT_FDCWD, out, F_OK);

    errno = saved;
    return rc == 0;
}

int vfiofs_redirect(const char *path, char *out)
{
    const char *root = vfiofs_mount_root();
    struct component c[5];
    const char *p;
    const char *mapped;  /* the mount's name for the matched prefix, before any variable part */
    int parts;           /* components matched (the variable one included) */
    int check = 0;       /* the last matched component must exist in the mount */
    int depth, floor, at;

    if (root == NULL || path == NULL || path[0] != '/')
        return 0;
    p = path;
    for (int i = 0; i < 5; i++)
        p = next_component(p, &c[i]);

    if (is(&c[0], "dev") && is(&c[1], "iommu")) {
        mapped = "iommu", parts = 2, depth = 1, floor = 1;
    } else if (is(&c[0], "dev") && is(&c[1], "vfio")) {
        mapped = "vfio", parts = 2, depth = 1, floor = 1;
    } else if (is(&c[0], "sys") && is(&c[1], "bus") && is(&c[2], "pci") && is(&c[3], "devices") && c[4].len) {
        mapped = "sys/bus/pci/devices/", parts = 5, depth = 5, floor = 1, check = 1;
    } else if (is(&c[0], "sys") && is(&c[1], "kernel") && is(&c[2], "iommu_groups") && c[3].len) {
        mapped = "sys/kernel/iommu_groups/", parts = 4, depth = 4, floor = 1, check = 1;
    } else if (is(&c[0], "sys") && is(&c[1], "kernel") && is(&c[2], "debug") && is(&c[3], "iommu")) {
        mapped = "sys/kernel/debug/iommu", parts = 4, depth = 4, floor = 1;
    } else {
        return 0;
    }
    if (check && is(&c[parts - 1], ".."))
        return 0;
    if (!stays_below(c[parts - 1].end, depth, floor))
        return 0;

    if ((at = put(out, 0, root, strlen(root))) < 0 || (at = put(out, at, "/", 1)) < 0 ||
        (at = put(out, at, mapped, strlen(mapped))) < 0)
        return -1;
    if (check) {
        if ((at = put(out, at, c[parts - 1].start, c[parts - 1].len)) < 0)
            return -1;
        if (!mount_has(out))
            return 0;
    }
    if (put(out, at, c[parts - 1].end, strlen(c[parts - 1].end)) < 0)
        return -1;
    return 1;
}

/* A path in the mount as the program would see it on a host with the devices: /dev/... or /sys/...
 * (realpath's answer). Written to `out`; 0 if `path` is not in the mount's redirected parts. */
static int unredirect(const char *path, char *out)
{
    const char *root = vfiofs_mount_root();
    size_t n = root == NULL ? 0 : strlen(root);
    const char *rel;
    struct component c;

    if (root == NULL || strncmp(path, root, n) != 0 || path[n] != '/')
        return 0;
    rel = path + n;
    next_component(rel, &c);
    if (is(&c, "sys"))
        return put(out, 0, rel, strlen(rel)) < 0 ? 0 : 1;
    if (is(&c, "iommu") || is(&c, "vfio")) {
        int at = put(out, 0, "/dev", 4);
        return at < 0 || put(out, at, rel, strlen(rel)) < 0 ? 0 : 1;
    }
    return 0;
}

/* The path to hand to libc: `path` itself, or its rewritten form in `buf`; NULL when too long. */
static const char *where(const char *path, char *buf)
{
    int rc = vfiofs_redirect(path, buf);

    return rc < 0 ? NULL : rc ? buf : path;
}

#define WHERE(path, buf)                \
    char buf[PATH_MAX];                 \
    const char *at_ = where(path, buf); \
    if (at_ == NULL)                    \
        return -1;

/* -- open -------------------------------------------------------------------------------------- */

typedef int (*open_fn)(const char *, int, ...);
typedef int (*openat_fn)(int, const char *, int, ...);
typedef int (*open_2_fn)(const char *, int);
typedef int (*openat_2_fn)(int, const char *, int);

/* The mode argument of an open-like call, there only when the flags need one. A macro: va_start
 * belongs in the interposed function itself. */
#define MODE_ARG(flags)                           \
    ({                                            \
        mode_t mode_ = 0;                         \
        if (__OPEN_NEEDS_MODE(flags)) {           \
            va_list ap_;                          \
            va_start(ap_, flags);                 \
            mode_ = (mode_t)va_arg(ap_, int);     \
            va_end(ap_);                          \
        }                                         \
        mode_;                                    \
    })

int open(const char *path, int flags, ...)
{
    WHERE(path, buf);
    return REAL(open, open_fn)(at_, flags, MODE_ARG(flags));
}

int open64(const char *path, int flags, ...)
{
    WHERE(path, buf);
    return REAL(open64, open_fn)(at_, flags, MODE_ARG(flags));
}

int openat(int dirfd, const char *path, int flags, ...)
{
    WHERE(path, buf);
    return REAL(openat, openat_fn)(dirfd, at_, flags, MODE_ARG(flags));
}

int openat64(int dirfd, const char *path, int flags, ...)
{
    WHERE(path, buf);
    return REAL(openat64, openat_fn)(dirfd, at_, flags, MODE_ARG(flags));
}

/* _FORTIFY_SOURCE builds call these for open() without a constant mode argument. */
int __open_2(const char *path, int flags)
{
    WHERE(path, buf);
    return REAL(__open_2, open_2_fn)(at_, flags);
}

int __open64_2(const char *path, int flags)
{
    WHERE(path, buf);
    return REAL(__open64_2, open_2_fn)(at_, flags);
}

int __openat_2(int dirfd, const char *path, int flags)
{
    WHERE(path, buf);
    return REAL(__openat_2, openat_2_fn)(dirfd, at_, flags);
}

int __openat64_2(int dirfd, const char *path, int flags)
{
    WHERE(path, buf);
    return REAL(__openat64_2, openat_2_fn)(dirfd, at_, flags);
}

/* -- opendir, fopen ---------------------------------------------------------------------------- */

DIR *opendir(const char *path)
{
    char buf[PATH_MAX];
    const char *at = where(path, buf);

    return at == NULL ? NULL : REAL(opendir, DIR *(*)(const char *))(at);
}

FILE *fopen(const char *path, const char *mode)
{
    char buf[PATH_MAX];
    const char *at = where(path, buf);

    return at == NULL ? NULL : REAL(fopen, FILE *(*)(const char *, const char *))(at, mode);
}

FILE *fopen64(const char *path, const char *mode)
{
    char buf[PATH_MAX];
    const char *at = where(path, buf);

    return at == NULL ? NULL : REAL(fopen64, FILE *(*)(const char *, const char *))(at, mode);
}

/* -- stat -------------------------------------------------------------------------------------- */

/* glibc >= 2.33 exports stat/lstat/fstatat; binaries built against older glibc call __xstat & co.
 * (still exported), which the headers no longer declare. */
int __xstat(int ver, const char *path, struct stat *st);
int __xstat64(int ver, const char *path, struct stat64 *st);
int __lxstat(int ver, const char *path, struct stat *st);
int __lxstat64(int ver, const char *path, struct stat64 *st);
int __fxstatat(int ver, int dirfd, const char *path, struct stat *st, int flags);
int __fxstatat64(int ver, int dirfd, const char *path, struct stat64 *st, int flags);

int stat(const char *path, struct stat *st)
{
    WHERE(path, buf);
    return REAL(stat, int (*)(const char *, struct stat *))(at_, st);
}

int stat64(const char *path, struct stat64 *st)
{
    WHERE(path, buf);
    return REAL(stat64, int (*)(const char *, struct stat64 *))(at_, st);
}

int lstat(const char *path, struct stat *st)
{
    WHERE(path, buf);
    return REAL(lstat, int (*)(const char *, struct stat *))(at_, st);
}

int lstat64(const char *path, struct stat64 *st)
{
    WHERE(path, buf);
    return REAL(lstat64, int (*)(const char *, struct stat64 *))(at_, st);
}

int fstatat(int dirfd, const char *path, struct stat *st, int flags)
{
    WHERE(path, buf);
    return REAL(fstatat, int (*)(int, const char *, struct stat *, int))(dirfd, at_, st, flags);
}

int fstatat64(int dirfd, const char *path, struct stat64 *st, int flags)
{
    WHERE(path, buf);
    return REAL(fstatat64, int (*)(int, const char *, struct stat64 *, int))(dirfd, at_, st, flags);
}

int statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *stx)
{
    WHERE(path, buf);
    return REAL(statx, int (*)(int, const char *, int, unsigned int, struct statx *))(dirfd, at_, flags, mask, stx);
}

int __xstat(int ver, const char *path, struct stat *st)
{
    WHERE(path, buf);
    return REAL(__xstat, int (*)(int, const char *, struct stat *))(ver, at_, st);
}

int __xstat64(int ver, const char *path, struct stat64 *st)
{
    WHERE(path, buf);
    return REAL(__xstat64, int (*)(int, const char *, struct stat64 *))(ver, at_, st);
}

int __lxstat(int ver, const char *path, struct stat *st)
{
    WHERE(path, buf);
    return REAL(__lxstat, int (*)(int, const char *, struct stat *))(ver, at_, st);
}

int __lxstat64(int ver, const char *path, struct stat64 *st)
{
    WHERE(path, buf);
    return REAL(__lxstat64, int (*)(int, const char *, struct stat64 *))(ver, at_, st);
}

int __fxstatat(int ver, int dirfd, const char *path, struct stat *st, int flags)
{
    WHERE(path, buf);
    return REAL(__fxstatat, int (*)(int, int, const char *, struct stat *, int))(ver, dirfd, at_, st, flags);
}

int __fxstatat64(int ver, int dirfd, const char *path, struct stat64 *st, int flags)
{
    WHERE(path, buf);
    return REAL(__fxstatat64, int (*)(int, int, const char *, struct stat64 *, int))(ver, dirfd, at_, st, flags);
}

/* -- access ------------------------------------------------------------------------------------ */

int access(const char *path, int mode)
{
    WHERE(path, buf);
    return REAL(access, int (*)(const char *, int))(at_, mode);
}

int faccessat(int dirfd, const char *path, int mode, int flags)
{
    WHERE(path, buf);
    return REAL(faccessat, int (*)(int, const char *, int, int))(dirfd, at_, mode, flags);
}

int euidaccess(const char *path, int mode)
{
    WHERE(path, buf);
    return REAL(euidaccess, int (*)(const char *, int))(at_, mode);
}

int eaccess(const char *path, int mode)
{
    WHERE(path, buf);
    return REAL(eaccess, int (*)(const char *, int))(at_, mode);
}

/* -- readlink ---------------------------------------------------------------------------------- */

ssize_t __readlink_chk(const char *path, char *out, size_t len, size_t outlen);
ssize_t __readlinkat_chk(int dirfd, const char *path, char *out, size_t len, size_t outlen);
char *__realpath_chk(const char *path, char *resolved, size_t resolvedlen);

ssize_t readlink(const char *path, char *out, size_t len)
{
    WHERE(path, buf);
    return REAL(readlink, ssize_t (*)(const char *, char *, size_t))(at_, out, len);
}

ssize_t readlinkat(int dirfd, const char *path, char *out, size_t len)
{
    WHERE(path, buf);
    return REAL(readlinkat, ssize_t (*)(int, const char *, char *, size_t))(dirfd, at_, out, len);
}

ssize_t __readlink_chk(const char *path, char *out, size_t len, size_t outlen)
{
    WHERE(path, buf);
    return REAL(__readlink_chk, ssize_t (*)(const char *, char *, size_t, size_t))(at_, out, len, outlen);
}

ssize_t __readlinkat_chk(int dirfd, const char *path, char *out, size_t len, size_t outlen)
{
    WHERE(path, buf);
    return REAL(__readlinkat_chk, ssize_t (*)(int, const char *, char *, size_t, size_t))(dirfd, at_, out, len,
                                                                                          outlen);
}

/* -- extended attributes (ls -l asks for ACLs) ------------------------------------------------- */

ssize_t getxattr(const char *path, const char *name, void *value, size_t size)
{
    WHERE(path, buf);
    return REAL(getxattr, ssize_t (*)(const char *, const char *, void *, size_t))(at_, name, value, size);
}

ssize_t lgetxattr(const char *path, const char *name, void *value, size_t size)
{
    WHERE(path, buf);
    return REAL(lgetxattr, ssize_t (*)(const char *, const char *, void *, size_t))(at_, name, value, size);
}

ssize_t listxattr(const char *path, char *list, size_t size)
{
    WHERE(path, buf);
    return REAL(listxattr, ssize_t (*)(const char *, char *, size_t))(at_, list, size);
}

ssize_t llistxattr(const char *path, char *list, size_t size)
{
    WHERE(path, buf);
    return REAL(llistxattr, ssize_t (*)(const char *, char *, size_t))(at_, list, size);
}

/* -- realpath ---------------------------------------------------------------------------------- */

/* The real answer for the mount's path, given back under the path the program asked about
 * (/dev/... or /sys/...), so that it can be opened again, compared, or printed. */
static char *resolve(const char *path, char *resolved, size_t resolvedlen, int checked)
{
    char buf[PATH_MAX], in_mount[PATH_MAX], shown[PATH_MAX];
    const char *at = where(path, buf);
    const char *answer;
    size_t n;
    int saved;

    if (at == NULL)
        return NULL;
    if (at == path) {
        if (checked)
            return REAL(__realpath_chk, char *(*)(const char *, char *, size_t))(path, resolved, resolvedlen);
        return REAL(realpath, char *(*)(const char *, char *))(path, resolved);
    }
    if (REAL(realpath, char *(*)(const char *, char *))(at, in_mount) == NULL)
        return NULL;
    saved = errno; /* unredirect's put() says ENAMETOOLONG when it falls back: not our failure */
    answer = unredirect(in_mount, shown) ? shown : in_mount;
    errno = saved;
    n = strlen(answer) + 1;
    if (resolved == NULL) {
        resolved = malloc(n); /* as realpath(path, NULL) does */
        if (resolved == NULL) {
            errno = ENOMEM;
            return NULL;
        }
    }
    memcpy(resolved, answer, n);
    return resolved;
}

char *realpath(const char *path, char *resolved)
{
    return resolve(path, resolved, PATH_MAX, 0);
}

char *__realpath_chk(const char *path, char *resolved, size_t resolvedlen)
{
    if (resolved != NULL && resolvedlen < PATH_MAX) /* the real one reports the overflow and aborts */
        return REAL(__realpath_chk, char *(*)(const char *, char *, size_t))(path, resolved, resolvedlen);
    return resolve(path, resolved, resolvedlen, 1);
}

char *canonicalize_file_name(const char *path)
{
    return resolve(path, NULL, PATH_MAX, 0);
}
