/* What a C program sees of a path, call by call: `paths OP PATH [OP PATH ...]` prints one line per
 * pair, "OP PATH = VALUE" or "OP PATH ! ERRNAME". tests/mount/test_run.py runs it under vfiofs run.
 *
 * Built twice by the tests: plainly (each OP calls the libc function it names), and with
 * -O2 -D_FORTIFY_SOURCE=2 -D_FILE_OFFSET_BITS=64, where open/readlink/realpath/stat/fopen become
 * __open64_2, __readlink_chk, __realpath_chk, stat64, fopen64 as in a distribution's build. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#ifndef PLAIN_CALLS
#define PLAIN_CALLS 1
#endif

#if PLAIN_CALLS
/* Exported by glibc, not declared by its headers (any more, or without _FORTIFY_SOURCE). */
int __open_2(const char *path, int flags);
int __open64_2(const char *path, int flags);
int __openat_2(int dirfd, const char *path, int flags);
int __openat64_2(int dirfd, const char *path, int flags);
int __xstat(int ver, const char *path, struct stat *st);
int __lxstat(int ver, const char *path, struct stat *st);
int __fxstatat(int ver, int dirfd, const char *path, struct stat *st, int flags);
int __xstat64(int ver, const char *path, struct stat64 *st);
ssize_t __readlink_chk(const char *path, char *buf, size_t len, size_t buflen);
ssize_t __readlinkat_chk(int dirfd, const char *path, char *buf, size_t len, size_t buflen);
char *__realpath_chk(const char *path, char *resolved, size_t resolvedlen);
#endif

static volatile int read_only = O_RDONLY; /* not a constant: a fortified open() calls __open_2 */

static void failed(const char *op, const char *path)
{
    printf("%s %s ! %s\n", op, path, strerrorname_np(errno));
}

/* The bytes, with newlines and backslashes escaped so each answer is one line. */
static void show(const char *op, const char *path, const char *data, size_t n)
{
    printf("%s %s = ", op, path);
    for (size_t i = 0; i < n; i++) {
        if (data[i] == '\n')
            fputs("\\n", stdout);
        else if (data[i] == '\\')
            fputs("\\\\", stdout);
        else
            putchar(data[i]);
    }
    putchar('\n');
}

static void show_fd(const char *op, const char *path, int fd)
{
    char buf[256];
    ssize_t n;

    if (fd < 0)
        return failed(op, path);
    n = read(fd, buf, sizeof(buf));
    if (n < 0) {
        failed(op, path);
    } else {
        show(op, path, buf, (size_t)n);
    }
    close(fd);
}

static const char *kind(mode_t mode)
{
    return S_ISDIR(mode) ? "dir" : S_ISREG(mode) ? "file" : S_ISLNK(mode) ? "link" : S_ISCHR(mode) ? "chr" : "other";
}

/* Called after the stat call, with its result (an argument list has no evaluation order). */
static void show_stat(const char *op, const char *path, int rc, mode_t mode)
{
    if (rc != 0)
        return failed(op, path);
    printf("%s %s = %s\n", op, path, kind(mode));
}

static int by_name(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* O_CREAT through each open-like call: path.1, path.2, ... created with modes 0601, 0602, ...
 * (umask 0), so the mode argument (read from the variadic part) reaches the file. */
static void create(const char *op, const char *path)
{
    char name[PATH_MAX];
    struct stat st;
    int i, fd;

    umask(0);
    printf("%s %s =", op, path);
    for (i = 1; i <= (PLAIN_CALLS ? 4 : 2); i++) {
        snprintf(name, sizeof name, "%s.%d", path, i);
        switch (i) {
        case 1: fd = open(name, O_WRONLY | O_CREAT | O_EXCL, 0600 + i); break;
        case 2: fd = openat(AT_FDCWD, name, O_WRONLY | O_CREAT | O_EXCL, 0600 + i); break;
#if PLAIN_CALLS
        case 3: fd = open64(name, O_WRONLY | O_CREAT | O_EXCL, 0600 + i); break;
        default: fd = openat64(AT_FDCWD, name, O_WRONLY | O_CREAT | O_EXCL, 0600 + i); break;
#else
        default: fd = -1; break;
#endif
        }
        if (fd < 0 || fstat(fd, &st) != 0)
            printf(" !%s", strerrorname_np(errno));
        else
            printf(" %04o", (unsigned)(st.st_mode & 07777));
        if (fd >= 0)
            close(fd);
    }
    putchar('\n');
}

static void list_dir(const char *op, const char *path)
{
    DIR *dir = opendir(path);
    struct dirent *entry;
    char *names[256];
    size_t n = 0;

    if (dir == NULL)
        return failed(op, path);
    while ((entry = readdir(dir)) != NULL && n < 256)
        if (strcmp(entry->d_name, ".") != 0 && strcmp(entry->d_name, "..") != 0)
            names[n++] = strdup(entry->d_name);
    closedir(dir);
    qsort(names, n, sizeof(names[0]), by_name);
    printf("%s %s =", op, path);
    for (size_t i = 0; i < n; i++) {
        printf(" %s", names[i]);
        free(names[i]);
    }
    putchar('\n');
}

static void read_line(const char *op, const char *path, FILE *file)
{
    char line[256];

    if (file == NULL)
        return failed(op, path);
    if (fgets(line, sizeof(line), file) == NULL)
        line[0] = '\0';
    fclose(file);
    show(op, path, line, strlen(line));
}

static void show_link(const char *op, const char *path, ssize_t n, const char *buf)
{
    if (n < 0)
        return failed(op, path);
    show(op, path, buf, (size_t)n);
}

static void show_resolved(const char *op, const char *path, const char *resolved)
{
    if (resolved == NULL)
        return failed(op, path);
    show(op, path, resolved, strlen(resolved));
}

/* Threads opening and reading the same path at once must all see the same bytes. */
struct job {
    const char *path;
    char first[64];
    int mismatches;
};

static void *hammer(void *arg)
{
    struct job *job = arg;

    for (int i = 0; i < 500; i++) {
        char buf[64] = {0};
        int fd = open(job->path, read_only);

        if (fd < 0 || read(fd, buf, sizeof(buf) - 1) < 0 || (job->first[0] && strcmp(buf, job->first) != 0))
            job->mismatches++;
        else if (!job->first[0])
            strcpy(job->first, buf);
        if (fd >= 0)
            close(fd);
    }
    return NULL;
}

static void threads(const char *op, const char *path)
{
    struct job jobs[8];
    pthread_t ids[8];
    int bad = 0;

    memset(jobs, 0, sizeof(jobs));
    for (int i = 0; i < 8; i++) {
        jobs[i].path = path;
        pthread_create(&ids[i], NULL, hammer, &jobs[i]);
    }
    for (int i = 0; i < 8; i++) {
        pthread_join(ids[i], NULL);
        bad += jobs[i].mismatches + (strcmp(jobs[i].first, jobs[0].first) != 0);
    }
    if (bad)
        printf("%s %s ! %d mismatches\n", op, path, bad);
    else
        show(op, path, jobs[0].first, strlen(jobs[0].first));
}

static void run(const char *op, const char *path)
{
    char buf[PATH_MAX];
    struct stat st = {0};
    struct statx stx = {0};
#if PLAIN_CALLS
    struct stat64 st64 = {0};
#endif
    ssize_t n;
    int rc;

    if (strcmp(op, "open") == 0) {
        show_fd(op, path, open(path, read_only));
    } else if (strcmp(op, "openat") == 0) {
        show_fd(op, path, openat(AT_FDCWD, path, read_only));
    } else if (strcmp(op, "opendir") == 0) {
        list_dir(op, path);
    } else if (strcmp(op, "fopen") == 0) {
        read_line(op, path, fopen(path, "r"));
    } else if (strcmp(op, "stat") == 0) {
        rc = stat(path, &st);
        show_stat(op, path, rc, st.st_mode);
    } else if (strcmp(op, "lstat") == 0) {
        rc = lstat(path, &st);
        show_stat(op, path, rc, st.st_mode);
    } else if (strcmp(op, "fstatat") == 0) {
        rc = fstatat(AT_FDCWD, path, &st, AT_SYMLINK_NOFOLLOW);
        show_stat(op, path, rc, st.st_mode);
    } else if (strcmp(op, "statx") == 0) {
        rc = statx(AT_FDCWD, path, AT_SYMLINK_NOFOLLOW, STATX_TYPE, &stx);
        show_stat(op, path, rc, stx.stx_mode);
    } else if (strcmp(op, "access") == 0) {
        if (access(path, F_OK) != 0)
            failed(op, path);
        else
            printf("%s %s = ok\n", op, path);
    } else if (strcmp(op, "faccessat") == 0) {
        if (faccessat(AT_FDCWD, path, R_OK, 0) != 0)
            failed(op, path);
        else
            printf("%s %s = ok\n", op, path);
    } else if (strcmp(op, "readlink") == 0) {
        n = readlink(path, buf, sizeof(buf) - 1);
        show_link(op, path, n, buf);
    } else if (strcmp(op, "readlinkat") == 0) {
        n = readlinkat(AT_FDCWD, path, buf, sizeof(buf) - 1);
        show_link(op, path, n, buf);
    } else if (strcmp(op, "realpath") == 0) {
        show_resolved(op, path, realpath(path, buf));
    } else if (strcmp(op, "realpath-malloc") == 0) {
        char *resolved = realpath(path, NULL);
        show_resolved(op, path, resolved);
        free(resolved);
    } else if (strcmp(op, "lgetxattr") == 0) {
        n = lgetxattr(path, "system.posix_acl_access", buf, sizeof(buf));
        show_link(op, path, n, buf);
    } else if (strcmp(op, "create") == 0) {
        create(op, path);
    } else if (strcmp(op, "threads") == 0) {
        threads(op, path);
#if PLAIN_CALLS
    } else if (strcmp(op, "open64") == 0) {
        show_fd(op, path, open64(path, read_only));
    } else if (strcmp(op, "openat64") == 0) {
        show_fd(op, path, openat64(AT_FDCWD, path, read_only));
    } else if (strcmp(op, "__open_2") == 0) {
        show_fd(op, path, __open_2(path, read_only));
    } else if (strcmp(op, "__open64_2") == 0) {
        show_fd(op, path, __open64_2(path, read_only));
    } else if (strcmp(op, "__openat_2") == 0) {
        show_fd(op, path, __openat_2(AT_FDCWD, path, read_only));
    } else if (strcmp(op, "__openat64_2") == 0) {
        show_fd(op, path, __openat64_2(AT_FDCWD, path, read_only));
    } else if (strcmp(op, "fopen64") == 0) {
        read_line(op, path, fopen64(path, "r"));
    } else if (strcmp(op, "stat64") == 0) {
        rc = stat64(path, &st64);
        show_stat(op, path, rc, st64.st_mode);
    } else if (strcmp(op, "lstat64") == 0) {
        rc = lstat64(path, &st64);
        show_stat(op, path, rc, st64.st_mode);
    } else if (strcmp(op, "fstatat64") == 0) {
        rc = fstatat64(AT_FDCWD, path, &st64, AT_SYMLINK_NOFOLLOW);
        show_stat(op, path, rc, st64.st_mode);
    } else if (strcmp(op, "__xstat") == 0) {
        rc = __xstat(1, path, &st);
        show_stat(op, path, rc, st.st_mode);
    } else if (strcmp(op, "__xstat64") == 0) {
        rc = __xstat64(1, path, &st64);
        show_stat(op, path, rc, st64.st_mode);
    } else if (strcmp(op, "__lxstat") == 0) {
        rc = __lxstat(1, path, &st);
        show_stat(op, path, rc, st.st_mode);
    } else if (strcmp(op, "__fxstatat") == 0) {
        rc = __fxstatat(1, AT_FDCWD, path, &st, AT_SYMLINK_NOFOLLOW);
        show_stat(op, path, rc, st.st_mode);
    } else if (strcmp(op, "euidaccess") == 0) {
        if (euidaccess(path, R_OK) != 0)
            failed(op, path);
        else
            printf("%s %s = ok\n", op, path);
    } else if (strcmp(op, "__readlink_chk") == 0) {
        n = __readlink_chk(path, buf, sizeof(buf) - 1, sizeof(buf));
        show_link(op, path, n, buf);
    } else if (strcmp(op, "__readlinkat_chk") == 0) {
        n = __readlinkat_chk(AT_FDCWD, path, buf, sizeof(buf) - 1, sizeof(buf));
        show_link(op, path, n, buf);
    } else if (strcmp(op, "__realpath_chk") == 0) {
        show_resolved(op, path, __realpath_chk(path, buf, sizeof(buf)));
    } else if (strcmp(op, "canonicalize_file_name") == 0) {
        char *resolved = canonicalize_file_name(path);
        show_resolved(op, path, resolved);
        free(resolved);
#endif
    } else {
        printf("%s %s ! unknown operation\n", op, path);
    }
}

int main(int argc, char **argv)
{
    if (argc < 3 || argc % 2 == 0) {
        fprintf(stderr, "usage: %s OP PATH [OP PATH ...]\n", argv[0]);
        return 2;
    }
    for (int i = 1; i + 1 < argc; i += 2)
        run(argv[i], argv[i + 1]);
    return 0;
}
