/* What every part of the interposition library shares: the mount root and real libc calls. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vfiofs_preload.h"

/* Read once (the constructor below, or the first call if another library's constructor comes
 * first): later calls only read memory, so they are thread- and async-signal-safe, and a
 * program that clears its environment keeps its devices. */
static char root[PATH_MAX];
static int root_state; /* 0 not read yet, 1 set, 2 unset or unusable */

static int read_root(void)
{
    const char *env = getenv("VFIOFS_MOUNT");
    size_t n;
    int state = 2;

    if (env != NULL && env[0] == '/') {
        n = strlen(env);
        while (n > 1 && env[n - 1] == '/')
            n--;
        if (n < sizeof(root)) {
            memcpy(root, env, n);
            root[n] = '\0';
            state = 1;
        }
    }
    __atomic_store_n(&root_state, state, __ATOMIC_RELEASE);
    return state;
}

__attribute__((constructor)) static void vfiofs_common_init(void)
{
    if (__atomic_load_n(&root_state, __ATOMIC_ACQUIRE) == 0)
        read_root();
}

const char *vfiofs_mount_root(void)
{
    int state = __atomic_load_n(&root_state, __ATOMIC_ACQUIRE);

    if (state == 0)
        state = read_root();
    return state == 1 ? root : NULL;
}

void *vfiofs_real(const char *name)
{
    void *fn = dlsym(RTLD_NEXT, name);

    if (fn == NULL) {
        fprintf(stderr, "vfiofs preload: libc has no %s\n", name);
        abort();
    }
    return fn;
}
