/* Minimal libfuse3 low-level server: the C baseline of bench/run.py.
 *
 * One regular file "f" (mode 0666, direct_io). Reads of any offset return zeros,
 * writes are accepted whole. Single-threaded fuse_session_loop. Prints "ready" on
 * stdout once fuse_session_mount() succeeded. SIGINT/SIGTERM/SIGHUP end the loop
 * and unmount.
 *
 * Build: gcc -O2 -o cfuse cfuse.c $(pkg-config --cflags --libs fuse3)
 * Usage: cfuse MOUNTPOINT
 */
#define FUSE_USE_VERSION 34
#include <fuse_lowlevel.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define FILE_INO 2
#define TIMEOUT 300.0 /* same entry/attr timeouts as vfiofs */

static char zeros[1 << 20];

static int fill_attr(fuse_ino_t ino, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = ino;
    st->st_uid = getuid();
    st->st_gid = getgid();
    if (ino == FUSE_ROOT_ID) {
        st->st_mode = S_IFDIR | 0755;
        st->st_nlink = 2;
    } else if (ino == FILE_INO) {
        st->st_mode = S_IFREG | 0666;
        st->st_nlink = 1;
        st->st_size = 0; /* like vfiofs: size 0, direct_io reads go through anyway */
    } else {
        return -1;
    }
    return 0;
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct fuse_entry_param e;
    memset(&e, 0, sizeof(e));
    if (parent != FUSE_ROOT_ID || strcmp(name, "f") != 0) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    e.ino = FILE_INO;
    e.attr_timeout = TIMEOUT;
    e.entry_timeout = TIMEOUT;
    fill_attr(FILE_INO, &e.attr);
    fuse_reply_entry(req, &e);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct stat st;
    (void)fi;
    if (fill_attr(ino, &st) < 0)
        fuse_reply_err(req, ENOENT);
    else
        fuse_reply_attr(req, &st, TIMEOUT);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (ino != FILE_INO) {
        fuse_reply_err(req, EISDIR);
        return;
    }
    fi->direct_io = 1;
    fi->keep_cache = 0;
    fuse_reply_open(req, fi);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    (void)ino; (void)off; (void)fi;
    if (size > sizeof(zeros))
        size = sizeof(zeros);
    fuse_reply_buf(req, zeros, size);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi)
{
    (void)ino; (void)buf; (void)off; (void)fi;
    fuse_reply_write(req, size);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino; (void)fi;
    fuse_reply_err(req, 0);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    char buf[512];
    size_t len = 0;
    struct stat st;
    (void)fi;
    if (ino != FUSE_ROOT_ID) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    if (size > sizeof(buf))
        size = sizeof(buf);
    memset(&st, 0, sizeof(st));
    if (off < 1) {
        st.st_ino = FUSE_ROOT_ID; st.st_mode = S_IFDIR;
        len += fuse_add_direntry(req, buf + len, size - len, ".", &st, 1);
    }
    if (off < 2) {
        st.st_ino = FUSE_ROOT_ID; st.st_mode = S_IFDIR;
        len += fuse_add_direntry(req, buf + len, size - len, "..", &st, 2);
    }
    if (off < 3) {
        st.st_ino = FILE_INO; st.st_mode = S_IFREG;
        len += fuse_add_direntry(req, buf + len, size - len, "f", &st, 3);
    }
    fuse_reply_buf(req, buf, len > size ? 0 : len);
}

static const struct fuse_lowlevel_ops ops = {
    .lookup = op_lookup,
    .getattr = op_getattr,
    .open = op_open,
    .read = op_read,
    .write = op_write,
    .release = op_release,
    .readdir = op_readdir,
};

int main(int argc, char *argv[])
{
    char *fuse_argv[] = {argv[0], "-o", "fsname=cbench,subtype=cbench,default_permissions", NULL};
    struct fuse_args args = FUSE_ARGS_INIT(3, fuse_argv);
    struct fuse_session *se;
    int ret = 1;

    if (argc != 2) {
        fprintf(stderr, "usage: %s MOUNTPOINT\n", argv[0]);
        return 2;
    }
    se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
    if (se == NULL)
        return 1;
    if (fuse_set_signal_handlers(se) != 0)
        goto out_destroy;
    if (fuse_session_mount(se, argv[1]) != 0)
        goto out_signals;
    printf("ready\n");
    fflush(stdout);
    ret = fuse_session_loop(se) != 0;
    fuse_session_unmount(se);
out_signals:
    fuse_remove_signal_handlers(se);
out_destroy:
    fuse_session_destroy(se);
    return ret;
}
