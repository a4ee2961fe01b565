/* Register traps (docs/preload.md): plain loads and stores on a mapped BAR's register page
 * reach the device model. Run under LD_PRELOAD=libvfiofs_preload.so with VFIOFS_MOUNT set;
 * `traps CASE NODE` prints result lines (vfio_test.h) that
 * tests/mount/test_preload_traps.py asserts. The accesses are inline assembly, so each
 * instruction form the decoder handles is exercised whatever the compiler would emit. */
#include "vfio_test.h"

#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <time.h>

/* Bind `node` through iommufd and map BAR `index` whole at a fixed address, as the
 * selftests' mmap_reserve() + MAP_FIXED do. */
static char *map_bar(int dev, int iommu, uint32_t index, int prot, uint64_t *size)
{
    struct vfio_region_info region = {.argsz = sizeof region, .index = index};
    char *hole, *bar;

    if (bind_iommufd(dev, iommu) != 0 || ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, &region) != 0) {
        perror("bind/region info");
        exit(2);
    }
    hole = mmap(NULL, 2 * region.size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    bar = (char *)(((uintptr_t)hole + region.size - 1) & ~(uintptr_t)(region.size - 1));
    if (mmap(bar, region.size, prot, MAP_SHARED | MAP_FIXED, dev, (off_t)region.offset) != bar) {
        perror("mmap");
        exit(2);
    }
    *size = region.size;
    return bar;
}

static uint64_t pread_value(int dev, off_t at, size_t size)
{
    uint64_t v = 0;

    if (pread(dev, &v, size, at) != (ssize_t)size)
        exit(3);
    return v;
}

/* The file name /proc/self/maps gives the mapping holding `addr` ("" for anonymous). */
static const char *mapping_of(const void *addr)
{
    static char line[512], name[256];
    FILE *f = fopen("/proc/self/maps", "r");
    unsigned long lo, hi;

    name[0] = 0;
    while (f != NULL && fgets(line, sizeof line, f) != NULL) {
        int at = 0;
        if (sscanf(line, "%lx-%lx %*s %*s %*s %*s %n", &lo, &hi, &at) >= 2 && (uintptr_t)addr >= lo &&
            (uintptr_t)addr < hi) {
            snprintf(name, sizeof name, "%s", line + at);
            name[strcspn(name, " \n")] = 0;
            break;
        }
    }
    if (f != NULL)
        fclose(f);
    return name;
}

/* The showcase device's BAR1: page 0 registers (queue_doorbell at 0, memory elsewhere), pages
 * 1-15 a sparse mmap area. Every store/load form on page 0, checked by pread. */
static void case_forms(const char *node)
{
    int iommu = open_node("iommu"), dev = open_node(node);
    uint64_t size, r;
    char *bar = map_bar(dev, iommu, 1, PROT_READ | PROT_WRITE, &size), *p = bar + 0x100;
    uint32_t index = 4;

    /* stores from registers: 88 (low and high byte registers), 66 89, 89, REX.W 89 with r9, SIB */
    asm volatile("movb %1, %0" : "=m"(*(volatile uint8_t *)(p + 0x00)) : "q"((uint8_t)0x11));
    asm volatile("movb %%ah, (%0)" ::"D"(p + 0x01), "a"(0x2200) : "memory");
    asm volatile("movw %w1, (%0)" ::"r"(p + 0x02), "r"(0x3344) : "memory");
    asm volatile("movl %k1, (%0)" ::"r"(p + 0x04), "r"(0x55667788) : "memory");
    asm volatile("mov %1, %%r9\n\tmovq %%r9, 8(%0)" ::"r"(p), "r"(0x0102030405060708ULL) : "r9", "memory");
    asm volatile("movl %k2, 0x10(%0,%1,4)" ::"r"(p), "r"((uint64_t)index), "r"(0x99aabbcc) : "memory"); /* 0x20 */
    asm volatile("movl %k1, 0x1000(%0)" ::"r"(p + 0x24 - 0x1000), "r"(0xddeeff00) : "memory");       /* disp32 */
    /* immediate stores: C6, 66 C7, C7, REX.W C7 (sign-extended) */
    asm volatile("movb $0x5a, (%0)" ::"r"(p + 0x30) : "memory");
    asm volatile("movw $0x1234, (%0)" ::"r"(p + 0x32) : "memory");
    asm volatile("movl $0xdeadbeef, (%0)" ::"r"(p + 0x34) : "memory");
    asm volatile("movq $-2, (%0)" ::"r"(p + 0x38) : "memory");
    VALUE("b", "0x%llx", (unsigned long long)pread_value(dev, REGION(1) + 0x100, 1));
    VALUE("bh", "0x%llx", (unsigned long long)pread_value(dev, REGION(1) + 0x101, 1));
    VALUE("w", "0x%llx", (unsigned long long)pread_value(dev, REGION(1) + 0x102, 2));
    VALUE("l", "0x%llx", (unsigned long long)pread_value(dev, REGION(1) + 0x104, 4));
    VALUE("q", "0x%llx", (unsigned long long)pread_value(dev, REGION(1) + 0x108, 8));
    VALUE("sib", "0x%llx", (unsigned long long)pread_value(dev, REGION(1) + 0x120, 4));
    VALUE("disp32", "0x%llx", (unsigned long long)pread_value(dev, REGION(1) + 0x124, 4));
    VALUE("imm8", "0x%llx", (unsigned long long)pread_value(dev, REGION(1) + 0x130, 1));
    VALUE("imm16", "0x%llx", (unsigned long long)pread_value(dev, REGION(1) + 0x132, 2));
    VALUE("imm32", "0x%llx", (unsigned long long)pread_value(dev, REGION(1) + 0x134, 4));
    VALUE("imm64", "0x%llx", (unsigned long long)pread_value(dev, REGION(1) + 0x138, 8));

    /* loads: 8A keeps the upper bits, 8A into AH, 66 8B keeps the upper bits, 8B zero-extends,
     * REX.W 8B into r12 (REX.R), movzx 0F B6 / 0F B7 (REX.W too), movsx 0F BE */
    r = ~0ULL;
    asm volatile("movb (%1), %b0" : "+a"(r) : "r"(p + 0x00) : "memory");
    VALUE("load_b", "0x%llx", (unsigned long long)r);
    r = 0;
    asm volatile("movb (%1), %%ah" : "+a"(r) : "S"(p + 0x30) : "memory");
    VALUE("load_ah", "0x%llx", (unsigned long long)r);
    r = ~0ULL;
    asm volatile("movw (%1), %w0" : "+r"(r) : "r"(p + 0x02) : "memory");
    VALUE("load_w", "0x%llx", (unsigned long long)r);
    r = ~0ULL;
    asm volatile("movl (%1), %k0" : "+r"(r) : "r"(p + 0x04) : "memory");
    VALUE("load_l", "0x%llx", (unsigned long long)r);
    asm volatile("movq 8(%1), %%r12\n\tmov %%r12, %0" : "=r"(r) : "r"(p) : "r12", "memory");
    VALUE("load_q", "0x%llx", (unsigned long long)r);
    r = ~0ULL;
    asm volatile("movzbl (%1), %k0" : "+r"(r) : "r"(p + 0x34) : "memory");
    VALUE("movzbl", "0x%llx", (unsigned long long)r);
    r = ~0ULL;
    asm volatile("movzwq (%1), %0" : "+r"(r) : "r"(p + 0x34) : "memory");
    VALUE("movzwq", "0x%llx", (unsigned long long)r);
    r = 0;
    asm volatile("movsbq (%1), %0" : "+r"(r) : "r"(p + 0x34) : "memory");
    VALUE("movsbq", "0x%llx", (unsigned long long)r);

    /* what a compiler emits for a volatile register: the queue_doorbell at BAR1 0 */
    *(volatile uint32_t *)bar = 0xfeedf00d;
    VALUE("doorbell_pread", "0x%llx", (unsigned long long)pread_value(dev, REGION(1), 4));
    VALUE("doorbell_load", "0x%x", *(volatile uint32_t *)bar);
    /* the sparse area is mapped directly: a store needs no trap and pread sees it */
    *(volatile uint32_t *)(bar + 0x1000) = 0xa5a5a5a5;
    VALUE("ram_pread", "0x%llx", (unsigned long long)pread_value(dev, REGION(1) + 0x1000, 4));
    VALUE("ram_mapping", "%s", strncmp(mapping_of(bar + 0x1000), "/memfd:", 7) == 0 ? "memfd" : mapping_of(bar + 0x1000));
    VALUE("register_mapping", "%s", mapping_of(bar)[0] ? mapping_of(bar) : "anonymous");
    CALL("munmap", munmap(bar, size));
    close(dev);
    close(iommu);
}

/* Accesses that must still kill the program with SIGSEGV, as without the library. */
static void case_crash(const char *node, const char *how)
{
    int iommu = open_node("iommu"), dev = open_node(node);
    uint64_t size;
    char *bar;

    if (strcmp(how, "readonly") == 0) {
        bar = map_bar(dev, iommu, 1, PROT_READ, &size);
        VALUE("load", "0x%x", *(volatile uint32_t *)bar); /* a load is fine */
        *(volatile uint32_t *)(bar + 0x100) = 1;          /* a store is not */
    } else {
        bar = map_bar(dev, iommu, 1, PROT_READ | PROT_WRITE, &size);
        if (strcmp(how, "rep_movsb") == 0) {
            static const char src[8] = "abcdefg";
            void *dst = bar + 0x100, *s = (void *)src;
            size_t n = 8;
            VALUE("before", "%d", 1);
            asm volatile("rep movsb" : "+D"(dst), "+S"(s), "+c"(n) : : "memory");
        } else if (strcmp(how, "closed") == 0) {
            close(dev); /* the mapping outlives the fd, the traps do not */
            VALUE("before", "%d", 1);
            *(volatile uint32_t *)(bar + 0x100) = 1;
        } else if (strcmp(how, "null") == 0) {
            volatile int *volatile nowhere = NULL;
            VALUE("before", "%d", 1);
            nowhere[2] = 1; /* outside every trapped range */
        }
    }
    VALUE("survived", "%d", 1);
}

/* A SIGSEGV handler the program had before the first trapped mapping still gets the faults
 * that are not register accesses; register accesses keep working after it ran. */
static sigjmp_buf recover;

static void own_handler(int sig)
{
    (void)sig;
    siglongjmp(recover, 1);
}

static void case_chain(const char *node)
{
    int iommu = open_node("iommu"), dev = open_node(node);
    struct sigaction sa = {.sa_handler = own_handler};
    volatile int *volatile nowhere = NULL;
    volatile int chained = 0;
    uint64_t size;
    char *bar;

    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, NULL);
    bar = map_bar(dev, iommu, 1, PROT_READ | PROT_WRITE, &size);
    if (sigsetjmp(recover, 1) == 0)
        nowhere[2] = 1;
    else
        chained = 1;
    VALUE("chained", "%d", chained);
    *(volatile uint32_t *)(bar + 0x100) = 0x600d;
    VALUE("after", "0x%llx", (unsigned long long)pread_value(dev, REGION(1) + 0x100, 4));
    VALUE("load_after", "0x%x", *(volatile uint32_t *)(bar + 0x100));
}

/* The I/OAT channel 0 (vfiofs/models/ioat.py) driven only through the mapping. */
#define CH 0x80
#define DESC_IOVA 0x100000ULL
#define PAGE 4096

static int wait_done(volatile char *bar)
{
    struct timespec start, now;
    uint64_t status;

    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        status = *(volatile uint64_t *)(bar + CH + 0x08); /* CHANSTS */
        if ((status & 7) != 0)                              /* not ACTIVE */
            return (int)(status & 7);
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec - start.tv_sec > 20)
            return -1;
    }
}

static void case_ioat(const char *node)
{
    int iommu = open_node("iommu"), dev = open_node(node);
    uint64_t size;
    volatile char *bar = map_bar(dev, iommu, 0, PROT_READ | PROT_WRITE, &size);
    unsigned char *mem = mmap(NULL, 3 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint32_t ioas = ioas_alloc(iommu);
    uint64_t desc[8] = {0};
    uint32_t attn, again;
    int i, round;

    CALL("attach", attach(dev, ioas));
    CALL("ioas_map", ioas_map(iommu, ioas, mem, 3 * PAGE, DESC_IOVA));
    VALUE("ver", "0x%x", bar[0x08]);
    VALUE("chansts_power_on", "%llu", (unsigned long long)*(volatile uint64_t *)(bar + CH + 0x08));
    /* one 4 KiB copy, page 1 -> page 2, interrupt enabled; `next` is itself */
    desc[0] = PAGE | (0x1ULL << 32); /* size; ctl int_en */
    desc[1] = DESC_IOVA + PAGE;       /* src */
    desc[2] = DESC_IOVA + 2 * PAGE;   /* dst */
    desc[3] = DESC_IOVA;              /* next */
    memcpy(mem, desc, sizeof desc);
    bar[0x03] = 0x01;                          /* INTRCTRL MASTER_INT_EN */
    for (round = 1; round <= 2; round++) {
        for (i = 0; i < PAGE; i++)
            mem[PAGE + i] = (unsigned char)(i * 7 + round);
        memset(mem + 2 * PAGE, 0, PAGE);
        *(volatile uint16_t *)(bar + CH) = 0x1;  /* CHANCTRL INT_REARM */
        /* the same two writes each round: only a trap makes the second pair reach the model */
        *(volatile uint64_t *)(bar + CH + 0x10) = DESC_IOVA; /* CHAINADDR */
        *(volatile uint16_t *)(bar + CH + 0x06) = 1;         /* DMACOUNT: the doorbell */
        printf("status%d=%d\n", round, wait_done(bar));
        printf("copied%d=%d\n", round, memcmp(mem + PAGE, mem + 2 * PAGE, PAGE) == 0);
        /* ATTNSTATUS reads-to-clear: the first load sees the interrupt, the second does not */
        attn = *(volatile uint32_t *)(bar + 0x04);
        again = *(volatile uint32_t *)(bar + 0x04);
        printf("attn%d=%u,%u\n", round, attn, again);
    }
    fflush(stdout);
    VALUE("chanerr", "%u", *(volatile uint32_t *)(bar + CH + 0x28));
    CALL("munmap", munmap((void *)bar, size));
    close(dev);
    close(iommu);
}

int main(int argc, char **argv)
{
    if (argc >= 3 && strcmp(argv[1], "forms") == 0)
        case_forms(argv[2]);
    else if (argc >= 4 && strcmp(argv[1], "crash") == 0)
        case_crash(argv[2], argv[3]);
    else if (argc >= 3 && strcmp(argv[1], "chain") == 0)
        case_chain(argv[2]);
    else if (argc >= 3 && strcmp(argv[1], "ioat") == 0)
        case_ioat(argv[2]);
    else {
        fprintf(stderr, "usage: traps forms|ioat NODE | traps chain NODE | traps crash NODE readonly|rep_movsb|closed|null\n");
        return 2;
    }
    return 0;
}
