/* Bare-metal Cortex-M platform for the harness (QEMU mps2-an386): vector table, reset
 * handler, ARM semihosting for output and exit, CMSDK timer 0 as the tick counter, and
 * the two libc functions the library may call. No libc, no heap. */
#include <stddef.h>
#include <stdint.h>

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;
int kiln_harness(void);
void kiln_out(const char *s);
uint32_t kiln_ticks(void);
void Reset_Handler(void);
void Fault_Handler(void);

static int semihost(int op, const void *arg) {
    register int r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

void kiln_out(const char *s) { semihost(0x04, s); /* SYS_WRITE0 */ }

#define TIMER0 ((volatile uint32_t *)0x40000000u) /* CTRL, VALUE, RELOAD */
uint32_t kiln_ticks(void) { return 0xFFFFFFFFu - TIMER0[1]; }

void *memcpy(void *d, const void *s, size_t n) {
    unsigned char *dp = d;
    const unsigned char *sp = s;
    while (n--) *dp++ = *sp++;
    return d;
}

void *memset(void *d, int c, size_t n) {
    unsigned char *dp = d;
    while (n--) *dp++ = (unsigned char)c;
    return d;
}

static void exit_with(int ok) {
    semihost(0x18, (const void *)(uintptr_t)(ok ? 0x20026u : 0x20023u)); /* SYS_EXIT */
    for (;;) {
    }
}

void Reset_Handler(void) {
    uint32_t *s = &_sidata, *d = &_sdata;
    while (d < &_edata) *d++ = *s++;
    for (d = &_sbss; d < &_ebss;) *d++ = 0;
    TIMER0[2] = 0xFFFFFFFFu;
    TIMER0[1] = 0xFFFFFFFFu;
    TIMER0[0] = 1u;
    exit_with(kiln_harness() == 0);
}

void Fault_Handler(void) {
    kiln_out("fault\n");
    exit_with(0);
}

__attribute__((section(".vectors"), used)) void (*const kiln_vectors[16])(void) = {
    (void (*)(void))(uintptr_t)&_estack, Reset_Handler, Fault_Handler, Fault_Handler, Fault_Handler,
    Fault_Handler, Fault_Handler, 0, 0, 0, 0, Fault_Handler, Fault_Handler, 0, Fault_Handler, Fault_Handler,
};
