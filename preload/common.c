/* What every part of the interposition library shares: the mount root and real libc calls. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vfiofs_preload.h"

const char *vfiofs_mount_root(void)
{
    static char root[4096];
    const char *env = getenv("VFIOFS_MOUNT");
    size_t n;

    if (env == NULL || env[0] == '\0')
        return NULL;
    n = strlen(env);
    while (n > 1 && env[n - 1] == '/')
        n--;
    if (n >= sizeof(root))
        return NULL;
    memcpy(root, env, n);
    root[n] = '\0';
    return root;
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
