/* isa_mask.c: an LD_PRELOAD shim that hides CPU features from CPUID, so that libraries which
 * pick their kernels by CPUID (onnxruntime's MLAS, oneDNN, PyTorch's cpuinfo, numpy) take the
 * code paths of an older CPU. Built and used by deltadiff/benchmarks/isa.py:
 *
 *     DD_ISA=avx2 LD_PRELOAD=/path/isa_mask.so python ...
 *
 * DD_ISA=avx2 hides AVX-512 (every subset), AVX-VNNI / AVX-IFMA / AVX-VNNI-INT8 / AVX-NE-CONVERT,
 * AVX10 and AMX: what is left is an AVX2 + FMA CPU. Only the ISA changes: caches, memory and
 * clocks stay those of this machine.
 *
 * How: Linux CPUID faulting (arch_prctl ARCH_SET_CPUID 0; flag cpuid_fault in /proc/cpuinfo)
 * turns every CPUID of this thread into a SIGSEGV (si_code SI_KERNEL). The handler runs the real
 * CPUID with faulting switched off for that one instruction, clears the hidden bits, writes the
 * registers back and steps over the instruction. Faulting is per thread: threads inherit it,
 * execve() resets it (a child loads the shim again through the inherited LD_PRELOAD).
 * glibc picks its own memcpy etc. before any shim runs; isa.py masks those via GLIBC_TUNABLES.
 *
 * Other SIGSEGV handlers (Python's faulthandler, which pytest and -X faulthandler enable) would
 * replace ours and break the emulation, so sigaction() and signal() are interposed for SIGSEGV:
 * the program's handler is recorded and ours stays installed. Every SIGSEGV that is not a CPUID
 * fault goes to the program's handler, or gets the default action (the process dies of SIGSEGV):
 * a real crash still crashes. A program that calls the rt_sigaction system call itself would
 * replace our handler; its CPUIDs then kill it with SIGSEGV (never a silent unmasked run).
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);

static const char *isa;          /* the masked ISA while masking is on, else NULL */
static uint32_t hide[3][4];      /* bits to clear: [leaf 7.0, 7.1, 0x24][EAX, EBX, ECX, EDX] */
static struct sigaction user;    /* the SIGSEGV handler the program believes it has */
static sigaction_fn real_sigaction;
static volatile unsigned long traps; /* CPUIDs emulated so far */

#define B(n) (1u << (n))

static void cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

/* A SIGSEGV that is not ours: the program's handler, else the default action. */
static void forward(int sig, siginfo_t *si, void *ctx) {
    struct sigaction u = user;
    if (u.sa_flags & SA_RESETHAND) {
        memset(&user, 0, sizeof user);
        user.sa_handler = SIG_DFL;
    }
    if (u.sa_flags & SA_SIGINFO) {
        u.sa_sigaction(sig, si, ctx);
        return;
    }
    if (u.sa_handler == SIG_IGN && si->si_code <= 0) return; /* sent by kill(): ignorable */
    if (u.sa_handler != SIG_DFL && u.sa_handler != SIG_IGN) {
        u.sa_handler(sig);
        return;
    }
    /* Default action. SIGSEGV is blocked while we run, so the raised signal is delivered (and
     * kills the process) as soon as we return; a hardware fault would also simply repeat. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    real_sigaction(sig, &dfl, NULL);
    raise(sig);
}

static void on_segv(int sig, siginfo_t *si, void *ctx) {
    greg_t *g = ((ucontext_t *)ctx)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)g[REG_RIP];
    /* A CPUID fault is a #GP (SI_KERNEL) at a decodable instruction, so ip is readable. */
    if (si->si_code != SI_KERNEL || ip[0] != 0x0f || ip[1] != 0xa2) {
        forward(sig, si, ctx);
        return;
    }
    int saved_errno = errno;
    uint32_t leaf = (uint32_t)g[REG_RAX], sub = (uint32_t)g[REG_RCX], r[4];
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    cpuid(leaf, sub, r);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    errno = saved_errno;
    int row = leaf == 7 ? (sub == 0 ? 0 : sub == 1 ? 1 : -1) : leaf == 0x24 ? 2 : -1;
    if (row >= 0)
        for (int i = 0; i < 4; i++) r[i] &= ~hide[row][i];
    g[REG_RAX] = r[0];
    g[REG_RBX] = r[1];
    g[REG_RCX] = r[2];
    g[REG_RDX] = r[3];
    g[REG_RIP] += 2;
    traps++;
}

/* Interposed: while masking, the program's SIGSEGV handler is recorded, ours stays installed. */
int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (!real_sigaction) real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    if (sig != SIGSEGV || !isa) return real_sigaction(sig, act, old);
    if (old) *old = user;
    if (act) user = *act;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    static sighandler_t (*real_signal)(int, sighandler_t);
    if (!real_signal) real_signal = (sighandler_t(*)(int, sighandler_t))dlsym(RTLD_NEXT, "signal");
    if (sig != SIGSEGV || !isa) return real_signal(sig, handler);
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    act.sa_flags = SA_RESTART;
    sigaction(sig, &act, &old);
    return old.sa_handler;
}

/* For Python (ctypes.CDLL(None)): the masked ISA when CPUID faulting is on in this thread. */
const char *dd_isa_mask(void) {
    return isa && syscall(SYS_arch_prctl, ARCH_GET_CPUID, 0) == 0 ? isa : NULL;
}

/* CPUID as this process sees it (trapped and masked when masking is on); for tests. */
void dd_isa_cpuid(uint32_t leaf, uint32_t sub, uint32_t out[4]) { cpuid(leaf, sub, out); }

/* How many CPUIDs have been emulated: their cost (a few microseconds each) against a timing. */
unsigned long dd_isa_traps(void) { return traps; }

__attribute__((constructor)) static void isa_mask_init(void) {
    const char *want = getenv("DD_ISA");
    if (!want || !*want || strcmp(want, "native") == 0) return;
    if (strcmp(want, "avx2") != 0) {
        fprintf(stderr, "isa_mask: DD_ISA=%s is not known (use avx2 or native); not masking\n", want);
        return;
    }
    /* leaf 7.0 EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31 */
    hide[0][1] = B(16) | B(17) | B(21) | B(26) | B(27) | B(28) | B(30) | B(31);
    /* 7.0 ECX: VBMI 1, VBMI2 6, VNNI 11, BITALG 12, VPOPCNTDQ 14 */
    hide[0][2] = B(1) | B(6) | B(11) | B(12) | B(14);
    /* 7.0 EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX-BF16 22, FP16 23, AMX-TILE 24, AMX-INT8 25 */
    hide[0][3] = B(2) | B(3) | B(8) | B(22) | B(23) | B(24) | B(25);
    /* 7.1 EAX: AVX-VNNI 4, AVX512-BF16 5, AMX-FP16 21, AVX-IFMA 23 */
    hide[1][0] = B(4) | B(5) | B(21) | B(23);
    /* 7.1 EDX: AVX-VNNI-INT8 4, AVX-NE-CONVERT 5, AMX-COMPLEX 8, AVX10 19 */
    hide[1][3] = B(4) | B(5) | B(8) | B(19);
    /* leaf 0x24 (AVX10 version and vector lengths): all of it */
    for (int i = 0; i < 4; i++) hide[2][i] = ~0u;

    if (!real_sigaction) real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK; /* ONSTACK: a stack overflow still reaches a handler */
    if (real_sigaction(SIGSEGV, &sa, &user) != 0 ||
        syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        real_sigaction(SIGSEGV, &user, NULL);
        fprintf(stderr, "isa_mask: CPUID faulting is not available here; not masking\n");
        return;
    }
    isa = "avx2";
}
