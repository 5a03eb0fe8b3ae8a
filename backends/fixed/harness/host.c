/* Host platform for the harness: stdout, no counter. */
#include <stdint.h>
#include <stdio.h>

void kiln_out(const char *s);
uint32_t kiln_ticks(void);
int kiln_harness(void);

void kiln_out(const char *s) { fputs(s, stdout); }
uint32_t kiln_ticks(void) { return 0; }
int main(void) { return kiln_harness(); }
