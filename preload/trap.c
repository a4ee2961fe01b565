/* Register traps (docs/preload.md, "Register traps"): the pages of a mapped BAR outside its
 * sparse mmap areas are PROT_NONE, and a SIGSEGV handler turns each plain MOV load or store
 * there into a pread/pwrite of the device fd, so every register access reaches the model.
 *
 * The handler allocates nothing and takes no lock: the table is a fixed array whose entries
 * are published with an atomic store of their end address. x86-64 only; elsewhere BARs are
 * mapped directly (vffs_trap_supported() is 0). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <ucontext.h>
#include <unistd.h>

#include "control.h"

#if defined(__x86_64__)

#define TRAP_SLOTS 64

struct trap_range {
    uintptr_t start, end;  /* end == 0: free slot */
    uint64_t base;         /* the device-fd offset of `start`: (index << 40) + BAR offset */
    int fd, writable;
    dev_t dev;
    ino_t ino;
};

static struct trap_range ranges[TRAP_SLOTS];
static pthread_mutex_t ranges_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction previous;
static int installed;

static int same_file(const struct trap_range *r);

int vffs_trap_supported(void)
{
    return 1;
}

static void say(const char *s, size_t n)
{
    ssize_t r = write(2, s, n);
    (void)r;
}

/* Let the fault happen again with the default action: the program dies with SIGSEGV. */
static void die_here(const char *why, const uint8_t *code, int n)
{
    static const char hex[] = "0123456789abcdef";
    char line[160];
    size_t len = 0, w = strlen(why);
    struct sigaction dfl;
    int i;

    memcpy(line, "vfiofs: ", 8);
    len = 8;
    if (w > 80)
        w = 80;
    memcpy(line + len, why, w);
    len += w;
    for (i = 0; i < n && len + 4 < sizeof line; i++) {
        line[len++] = ' ';
        line[len++] = hex[code[i] >> 4];
        line[len++] = hex[code[i] & 15];
    }
    line[len++] = '\n';
    say(line, len);
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigaction(SIGSEGV, &dfl, NULL);
}

/* Encoding number (0 rax ... 15 r15) → gregs index. */
static const int greg[16] = {REG_RAX, REG_RCX, REG_RDX, REG_RBX, REG_RSP, REG_RBP, REG_RSI, REG_RDI,
                             REG_R8,  REG_R9,  REG_R10, REG_R11, REG_R12, REG_R13, REG_R14, REG_R15};

/* The decoded access: `size` bytes; a store of `value`, or a load into register `reg`. */
struct access {
    int store, size, length;
    int reg, byte_reg_high; /* load/store register; byte_reg_high: AH/CH/DH/BH */
    int dest_size;          /* a load's destination width (movzx widens), 0 = size */
    int sign;               /* movsx */
    uint64_t value;
};

static uint64_t reg_value(const greg_t *g, const struct access *a)
{
    uint64_t v = (uint64_t)g[greg[a->reg]];
    return a->byte_reg_high ? (v >> 8) & 0xff : v;
}

/* Decode the plain MOV forms at `c` (docs/preload.md); 0 if not one of them. */
static int decode(const uint8_t *c, const greg_t *g, struct access *a)
{
    int i = 0, opsize = 0, rex = 0, op, op2 = 0, modrm, mod, rm, reg, imm = 0, twobyte = 0;

    memset(a, 0, sizeof *a);
    for (;; i++) {
        if (i >= 14)
            return 0;
        if (c[i] == 0x66)
            opsize = 1;
        else if (c[i] == 0x67 || c[i] == 0x2e || c[i] == 0x3e || c[i] == 0x26 || c[i] == 0x36 || c[i] == 0x64 ||
                 c[i] == 0x65)
            ; /* address size and segments: si_addr is already the linear address */
        else
            break;
    }
    if ((c[i] & 0xf0) == 0x40)
        rex = c[i++];
    op = c[i++];
    if (op == 0x0f) {
        twobyte = 1;
        op2 = c[i++];
        if (op2 != 0xb6 && op2 != 0xb7 && op2 != 0xbe && op2 != 0xbf)
            return 0;
    } else if (op != 0x88 && op != 0x89 && op != 0x8a && op != 0x8b && op != 0xc6 && op != 0xc7) {
        return 0;
    }
    modrm = c[i++];
    mod = modrm >> 6;
    reg = ((modrm >> 3) & 7) | ((rex & 4) ? 8 : 0);
    rm = modrm & 7;
    if (mod == 3)
        return 0; /* a register operand cannot fault on memory */
    if (rm == 4) {
        int sib = c[i++];
        if (mod == 0 && (sib & 7) == 5)
            i += 4;
    } else if (mod == 0 && rm == 5) {
        i += 4; /* RIP-relative */
    }
    if (mod == 1)
        i += 1;
    else if (mod == 2)
        i += 4;

    if (twobyte) {
        a->store = 0;
        a->size = (op2 == 0xb6 || op2 == 0xbe) ? 1 : 2;
        a->dest_size = (rex & 8) ? 8 : opsize ? 2 : 4;
        a->sign = op2 >= 0xbe;
        a->reg = reg;
    } else if (op == 0xc6 || op == 0xc7) {
        int32_t v = 0;

        if (((modrm >> 3) & 7) != 0)
            return 0;
        a->store = 1;
        a->size = op == 0xc6 ? 1 : (rex & 8) ? 8 : opsize ? 2 : 4;
        imm = a->size == 8 ? 4 : a->size; /* REX.W: a sign-extended imm32 */
        memcpy(&v, c + i, (size_t)imm);   /* little-endian: the low bytes of v */
        a->value = a->size == 8 ? (uint64_t)(int64_t)v : (uint64_t)(uint32_t)v;
    } else {
        a->store = op == 0x88 || op == 0x89;
        a->size = (op == 0x88 || op == 0x8a) ? 1 : (rex & 8) ? 8 : opsize ? 2 : 4;
        a->reg = reg;
        if (a->size == 1 && rex == 0 && reg >= 4 && reg < 8) {
            a->reg = reg - 4; /* AH, CH, DH, BH */
            a->byte_reg_high = 1;
        }
        if (a->store)
            a->value = reg_value(g, a);
    }
    a->length = i + imm;
    return 1;
}

static void load_into(greg_t *g, const struct access *a, uint64_t v)
{
    uint64_t *r = (uint64_t *)&g[greg[a->reg]];
    int dest = a->dest_size ? a->dest_size : a->size;

    if (a->sign)
        v = a->size == 1 ? (uint64_t)(int64_t)(int8_t)v : (uint64_t)(int64_t)(int16_t)v;
    if (a->byte_reg_high)
        *r = (*r & ~0xff00ULL) | ((v & 0xff) << 8);
    else if (dest == 1)
        *r = (*r & ~0xffULL) | (v & 0xff);
    else if (dest == 2)
        *r = (*r & ~0xffffULL) | (v & 0xffff);
    else if (dest == 4)
        *r = v & 0xffffffffULL; /* a 32-bit destination zero-extends, as the CPU does */
    else
        *r = v;
}

static const struct trap_range *find(uintptr_t addr)
{
    int i;

    for (i = 0; i < TRAP_SLOTS; i++) {
        uintptr_t end = __atomic_load_n(&ranges[i].end, __ATOMIC_ACQUIRE);
        if (end != 0 && addr >= ranges[i].start && addr < end)
            return &ranges[i];
    }
    return NULL;
}

static void chain(int sig, siginfo_t *si, void *uc)
{
    if (previous.sa_flags & SA_SIGINFO) {
        previous.sa_sigaction(sig, si, uc);
    } else if (previous.sa_handler == SIG_DFL || previous.sa_handler == SIG_IGN) {
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigaction(SIGSEGV, &dfl, NULL); /* the fault happens again and kills, as without us */
    } else {
        previous.sa_handler(sig);
    }
}

/* One trapped access, or the fault handed on; errno is the caller's (on_segv keeps it). */
static void handle(int sig, siginfo_t *si, void *ucv)
{
    ucontext_t *uc = ucv;
    greg_t *g = uc->uc_mcontext.gregs;
    const struct trap_range *r;
    const uint8_t *code;
    struct access a;
    uint64_t v = 0, off;

    r = si->si_code == SEGV_ACCERR ? find((uintptr_t)si->si_addr) : NULL;
    if (r == NULL) {
        chain(sig, si, ucv);
        return;
    }
    code = (const uint8_t *)g[REG_RIP];
    if (!decode(code, g, &a)) {
        die_here("register access by an instruction it cannot decode:", code, 15);
        return;
    }
    if (a.store && !r->writable) {
        chain(sig, si, ucv); /* a store into a read-only mapping faults as it would */
        return;
    }
    off = r->base + ((uintptr_t)si->si_addr - r->start);
    if (!same_file(r)) {
        die_here("register access after the device fd was closed:", code, a.length);
        return;
    }
    if (a.store) {
        if (pwrite(r->fd, &a.value, (size_t)a.size, (off_t)off) != a.size) {
            die_here("register store failed:", code, a.length);
            return;
        }
    } else {
        if (pread(r->fd, &v, (size_t)a.size, (off_t)off) != a.size) {
            die_here("register load failed:", code, a.length);
            return;
        }
        load_into(g, &a, v);
    }
    g[REG_RIP] += a.length;
}

static void on_segv(int sig, siginfo_t *si, void *ucv)
{
    int saved = errno;

    handle(sig, si, ucv);
    errno = saved;
}

/* The range's fd still names the device it was mapped from. statx with AT_STATX_DONT_SYNC
 * answers from the kernel's cached attributes: fstat on a FUSE file would send a GETATTR to
 * the daemon after every pread/pwrite (they invalidate the attributes), doubling the cost of
 * a trapped access. A raw system call: async-signal-safe, and not the interposed statx. */
static int same_file(const struct trap_range *r)
{
    struct statx sx;

    if (syscall(SYS_statx, r->fd, "", AT_EMPTY_PATH | AT_STATX_DONT_SYNC, STATX_INO, &sx) != 0)
        return 0;
    return makedev(sx.stx_dev_major, sx.stx_dev_minor) == r->dev && sx.stx_ino == r->ino;
}

int vffs_trap_add(uintptr_t start, uintptr_t end, int fd, uint64_t base, int prot)
{
    struct stat st;
    int i, err = ENOMEM;

    if (!(prot & PROT_READ))
        return 0; /* PROT_NONE asked for: a fault there is the program's own */
    if (fstat(fd, &st) != 0)
        return errno;
    pthread_mutex_lock(&ranges_lock);
    if (!installed) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_segv;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGSEGV, &sa, &previous) != 0) {
            err = errno;
            pthread_mutex_unlock(&ranges_lock);
            return err;
        }
        installed = 1;
    }
    for (i = 0; i < TRAP_SLOTS; i++)
        if (ranges[i].end == 0) {
            ranges[i].start = start;
            ranges[i].base = base;
            ranges[i].fd = fd;
            ranges[i].writable = (prot & PROT_WRITE) != 0;
            ranges[i].dev = st.st_dev;
            ranges[i].ino = st.st_ino;
            __atomic_store_n(&ranges[i].end, end, __ATOMIC_RELEASE);
            err = 0;
            break;
        }
    pthread_mutex_unlock(&ranges_lock);
    return err;
}

void vffs_trap_forget(uintptr_t start, uintptr_t end)
{
    int i;

    pthread_mutex_lock(&ranges_lock);
    for (i = 0; i < TRAP_SLOTS; i++) {
        struct trap_range *r = &ranges[i];
        if (r->end == 0 || end <= r->start || start >= r->end)
            continue;
        if (start <= r->start && end >= r->end) {
            __atomic_store_n(&r->end, 0, __ATOMIC_RELEASE);
        } else if (start <= r->start) {
            r->base += end - r->start; /* the head went away */
            r->start = end;
        } else if (end >= r->end) {
            __atomic_store_n(&r->end, start, __ATOMIC_RELEASE); /* the tail went away */
        }
        /* a hole in the middle: kept (a fault there is no longer ours, but it is PROT_NONE no more) */
    }
    pthread_mutex_unlock(&ranges_lock);
}

#else

int vffs_trap_supported(void)
{
    return 0;
}

int vffs_trap_add(uintptr_t start, uintptr_t end, int fd, uint64_t base, int prot)
{
    (void)start, (void)end, (void)fd, (void)base, (void)prot;
    return ENOSYS;
}

void vffs_trap_forget(uintptr_t start, uintptr_t end)
{
    (void)start, (void)end;
}

#endif
