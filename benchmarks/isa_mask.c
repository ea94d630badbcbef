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
 * Two ways to catch a CPUID, both answered by the same masking code:
 *
 * - Fault (every CPUID of the process): Linux CPUID faulting (arch_prctl ARCH_SET_CPUID 0; flag
 *   cpuid_fault in /proc/cpuinfo) turns every CPUID of this thread into a SIGSEGV (si_code
 *   SI_KERNEL). The handler runs the real CPUID with faulting switched off for that one
 *   instruction, clears the hidden bits, writes the registers back and steps over the
 *   instruction. Faulting is per thread: threads inherit it, execve() resets it (a child loads
 *   the shim again through the inherited LD_PRELOAD).
 * - Patch (CPUs or hypervisors without cpuid_fault): isa.py copies the Python packages whose
 *   libraries run the kernels (onnxruntime, numpy, Pillow and their bundled .libs) into a
 *   folder named by DD_ISA_PATCHED and puts it first on PYTHONPATH; in that copy every CPUID
 *   instruction (0F A2, found by disassembly) is replaced with INT3; NOP (CC 90). The INT3 raises
 *   SIGTRAP; the handler checks that the trap comes from a library in that folder (or from this
 *   shim), answers as above and steps over the NOP. CPUIDs elsewhere (the interpreter, glibc,
 *   PyTorch) are not seen: isa.py masks glibc with GLIBC_TUNABLES and PyTorch with its own
 *   switches (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS).
 *
 * glibc picks its own memcpy etc. before any shim runs; isa.py masks those via GLIBC_TUNABLES.
 *
 * Other handlers of our signal (Python's faulthandler installs one for SIGSEGV, which pytest and
 * -X faulthandler enable) would replace ours and break the emulation, so sigaction() and signal()
 * are interposed for that signal: the program's handler is recorded and ours stays installed.
 * Every signal that is not a CPUID of ours goes to the program's handler, or gets the default
 * action (the process dies of it): a real crash still crashes. A program that calls the
 * rt_sigaction system call itself would replace our handler; its CPUIDs then kill it (never a
 * silent unmasked run).
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <dlfcn.h>
#include <link.h>
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
static int trap_sig;             /* SIGSEGV (fault) or SIGTRAP (patch) while masking */
static char patched[4096];       /* patch: the folder of the patched libraries, with a final / */
static uint32_t hide[3][4];      /* bits to clear: [leaf 7.0, 7.1, 0x24][EAX, EBX, ECX, EDX] */
static struct sigaction user;    /* the handler of trap_sig the program believes it has */
static sigaction_fn real_sigaction;
static volatile unsigned long traps; /* CPUIDs emulated so far */

#define B(n) (1u << (n))

static void cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

/* A signal that is not one of our CPUIDs: the program's handler, else the default action. */
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
    /* Default action. The signal is blocked while we run, so the raised one is delivered (and
     * kills the process) as soon as we return. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    real_sigaction(sig, &dfl, NULL);
    raise(sig);
}

static void answer(greg_t *g, const uint32_t r_in[4]) {
    uint32_t leaf = (uint32_t)g[REG_RAX], sub = (uint32_t)g[REG_RCX], r[4];
    memcpy(r, r_in, sizeof r);
    int row = leaf == 7 ? (sub == 0 ? 0 : sub == 1 ? 1 : -1) : leaf == 0x24 ? 2 : -1;
    if (row >= 0)
        for (int i = 0; i < 4; i++) r[i] &= ~hide[row][i];
    g[REG_RAX] = r[0];
    g[REG_RBX] = r[1];
    g[REG_RCX] = r[2];
    g[REG_RDX] = r[3];
    traps++;
}

/* Fault: a CPUID fault is a #GP (SI_KERNEL) at a decodable instruction, so ip is readable. */
static void on_segv(int sig, siginfo_t *si, void *ctx) {
    greg_t *g = ((ucontext_t *)ctx)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)g[REG_RIP];
    if (si->si_code != SI_KERNEL || ip[0] != 0x0f || ip[1] != 0xa2) {
        forward(sig, si, ctx);
        return;
    }
    int saved_errno = errno;
    uint32_t r[4];
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    cpuid((uint32_t)g[REG_RAX], (uint32_t)g[REG_RCX], r);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    errno = saved_errno;
    answer(g, r);
    g[REG_RIP] += 2;
}

static int is_ours(const void *p) {
    Dl_info self, at;
    if (!dladdr((void *)is_ours, &self) || !dladdr(p, &at) || !at.dli_fname) return 0;
    return at.dli_fbase == self.dli_fbase || strncmp(at.dli_fname, patched, strlen(patched)) == 0;
}

/* Patch: INT3 (SI_KERNEL, ip after it) followed by the NOP of a patched CPUID, in a patched
 * library. Any other SIGTRAP (a debugger's breakpoint, a raise()) is not ours. */
static void on_trap(int sig, siginfo_t *si, void *ctx) {
    greg_t *g = ((ucontext_t *)ctx)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)g[REG_RIP];
    if (si->si_code != SI_KERNEL || ip[-1] != 0xcc || ip[0] != 0x90 || !is_ours(ip - 1)) {
        forward(sig, si, ctx);
        return;
    }
    uint32_t r[4];
    cpuid((uint32_t)g[REG_RAX], (uint32_t)g[REG_RCX], r);
    answer(g, r);
    g[REG_RIP] += 1;
}

/* Interposed: while masking, the program's handler of our signal is recorded, ours stays. */
int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (!real_sigaction) real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    if (sig != trap_sig || !isa) return real_sigaction(sig, act, old);
    if (old) *old = user;
    if (act) user = *act;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    static sighandler_t (*real_signal)(int, sighandler_t);
    if (!real_signal) real_signal = (sighandler_t(*)(int, sighandler_t))dlsym(RTLD_NEXT, "signal");
    if (sig != trap_sig || !isa) return real_signal(sig, handler);
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    act.sa_flags = SA_RESTART;
    sigaction(sig, &act, &old);
    return old.sa_handler;
}

/* For Python (ctypes.CDLL(None)): the masked ISA when masking is on (fault: in this thread). */
const char *dd_isa_mask(void) {
    if (!isa) return NULL;
    return trap_sig == SIGTRAP || syscall(SYS_arch_prctl, ARCH_GET_CPUID, 0) == 0 ? isa : NULL;
}

/* "fault" or "patch" while masking, else NULL. */
const char *dd_isa_method(void) { return !isa ? NULL : trap_sig == SIGTRAP ? "patch" : "fault"; }

/* CPUID as a library under the mask sees it (trapped and masked when masking is on); for tests.
 * Patch mode: this is a patched site (INT3; NOP) of its own. */
void dd_isa_cpuid(uint32_t leaf, uint32_t sub, uint32_t out[4]) {
    if (trap_sig != SIGTRAP) {
        cpuid(leaf, sub, out);
        return;
    }
    __asm__ volatile("int3\n\tnop"
                     : "=a"(out[0]), "=b"(out[1]), "=c"(out[2]), "=d"(out[3])
                     : "a"(leaf), "c"(sub));
}

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
    const char *dir = getenv("DD_ISA_PATCHED");
    int patch = dir && *dir;
    if (patch && (strlen(dir) + 2 > sizeof patched || dir[0] != '/')) {
        fprintf(stderr, "isa_mask: DD_ISA_PATCHED must be an absolute path; not masking\n");
        return;
    }
    if (patch) snprintf(patched, sizeof patched, "%s%s", dir, dir[strlen(dir) - 1] == '/' ? "" : "/");
    int sig = patch ? SIGTRAP : SIGSEGV;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = patch ? on_trap : on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK; /* ONSTACK: a stack overflow still reaches a handler */
    if (real_sigaction(sig, &sa, &user) != 0) {
        fprintf(stderr, "isa_mask: cannot install the signal handler; not masking\n");
        return;
    }
    if (!patch && syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        real_sigaction(SIGSEGV, &user, NULL);
        fprintf(stderr, "isa_mask: CPUID faulting is not available here; not masking\n");
        return;
    }
    trap_sig = sig;
    isa = "avx2";
}
