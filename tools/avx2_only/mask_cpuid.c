/* Makes this CPU look AVX2-only to the process it is preloaded into (LD_PRELOAD; tools/avx2_only.py).
 *
 * Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID, the "cpuid_fault" flag of /proc/cpuinfo) makes every CPUID
 * instruction of the process raise SIGSEGV. The handler runs the real CPUID (faulting off for that one instruction),
 * clears the AVX-512, AMX and AVX-VNNI feature bits of leaf 7, and resumes after the instruction. Everything that asks
 * CPUID at load or later (onnxruntime's MLAS and cpuinfo, numpy, onnxq's ops through __builtin_cpu_supports) then
 * picks its AVX2 code, as on an AVX2-only EPYC. The setting is inherited by the threads the process starts after.
 * What asked CPUID before this constructor ran keeps what it saw (glibc's string functions). The instructions still
 * run on this CPU's cores: ports, caches and clocks are not an AVX2-only CPU's.
 *
 * The handler must stay SIGSEGV's: a program that installs its own (Python's faulthandler, which pytest turns on)
 * would otherwise get the next CPUID as a crash. So sigaction() is interposed for SIGSEGV: the program's handler is
 * kept here and called for every fault that is not a CPUID, and a default action is restored for real, the
 * faulting instruction then faulting again. signal() is interposed alike (perf, for one, installs its handlers so).
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define ARCH_SET_CPUID 0x1012

/* Leaf 7, subleaf 0: EBX AVX512F, DQ, IFMA, PF, ER, CD, BW, VL; ECX AVX512_VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ;
 * EDX AVX512_4VNNIW, 4FMAPS, VP2INTERSECT, AMX_BF16, AVX512_FP16, AMX_TILE, AMX_INT8. Subleaf 1: EAX AVX_VNNI,
 * AVX512_BF16. */
static const uint32_t kEbx7 = (1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31);
static const uint32_t kEcx7 = (1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14);
static const uint32_t kEdx7 = (1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25);
static const uint32_t kEax71 = (1u << 4) | (1u << 5);

static struct sigaction program_handler; /* what the program installed for SIGSEGV (zero: SIG_DFL) */

static int RealSigaction(int sig, const struct sigaction* action, struct sigaction* old) {
  static int (*real)(int, const struct sigaction*, struct sigaction*);
  if (real == 0) real = (int (*)(int, const struct sigaction*, struct sigaction*))dlsym(RTLD_NEXT, "sigaction");
  return real(sig, action, old);
}

/* The program's sigaction: SIGSEGV's handler is recorded, not installed. */
int sigaction(int sig, const struct sigaction* action, struct sigaction* old) {
  if (sig != SIGSEGV) return RealSigaction(sig, action, old);
  if (old != 0) *old = program_handler;
  if (action != 0) program_handler = *action;
  return 0;
}

/* The program's signal(): the same for SIGSEGV (glibc's signal() does not go through the sigaction symbol). */
sighandler_t signal(int sig, sighandler_t handler) {
  struct sigaction action, old;
  memset(&action, 0, sizeof action);
  action.sa_handler = handler;
  action.sa_flags = SA_RESTART;
  if (sig != SIGSEGV) return RealSigaction(sig, &action, &old) == 0 ? old.sa_handler : SIG_ERR;
  old = program_handler;
  program_handler = action;
  return (old.sa_flags & SA_SIGINFO) ? (sighandler_t)old.sa_sigaction : old.sa_handler;
}

/* A fault that is not a CPUID: the program's handler, or its default action (restored, the instruction retried). */
static void ProgramFault(int sig, siginfo_t* info, void* context) {
  if (program_handler.sa_flags & SA_SIGINFO) {
    program_handler.sa_sigaction(sig, info, context);
  } else if (program_handler.sa_handler != SIG_DFL && program_handler.sa_handler != SIG_IGN) {
    program_handler.sa_handler(sig);
  } else {
    struct sigaction fallback;
    memset(&fallback, 0, sizeof fallback);
    fallback.sa_handler = SIG_DFL;
    RealSigaction(SIGSEGV, &fallback, 0);
  }
}

static void OnSegv(int sig, siginfo_t* info, void* context) {
  ucontext_t* uc = (ucontext_t*)context;
  greg_t* r = uc->uc_mcontext.gregs;
  const uint8_t* rip = (const uint8_t*)r[REG_RIP];
  if (info->si_code <= 0 || rip[0] != 0x0f || rip[1] != 0xa2) { /* sent by a process, or not CPUID */
    ProgramFault(sig, info, context);
    return;
  }
  const unsigned leaf = (unsigned)r[REG_RAX], subleaf = (unsigned)r[REG_RCX];
  unsigned a, b, c, d;
  syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
  __cpuid_count(leaf, subleaf, a, b, c, d);
  syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
  if (leaf == 7 && subleaf == 0) {
    b &= ~kEbx7;
    c &= ~kEcx7;
    d &= ~kEdx7;
  } else if (leaf == 7 && subleaf == 1) {
    a &= ~kEax71;
  }
  r[REG_RAX] = a;
  r[REG_RBX] = b;
  r[REG_RCX] = c;
  r[REG_RDX] = d;
  r[REG_RIP] += 2;
}

__attribute__((constructor)) static void MaskCpuid(void) {
  struct sigaction action;
  memset(&action, 0, sizeof action);
  action.sa_sigaction = OnSegv;
  action.sa_flags = SA_SIGINFO;
  RealSigaction(SIGSEGV, &action, 0);
  syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
}
