/* A program to exec from a stub: prints "exec probe ok" and exits 42. Built with
 * -DBLOB='"PATH"', it carries PATH's bytes in its read-only data (.incbin) and prints their
 * length and FNV-1a hash first, so that a binary bigger than hsm's --whole-below (a cloned stub
 * on xfs/btrfs, filled range by range) proves every page it faulted in held the source's bytes.
 * tests/kernel_readers.rs compiles it with gcc at run time.
 *
 *   gcc -O2 tests/tools/exec_probe.c -o probe
 *   gcc -O2 '-DBLOB="/tmp/blob.bin"' tests/tools/exec_probe.c -o probe-big
 */
#include <stdint.h>
#include <stdio.h>

#ifdef BLOB
__asm__(".section .rodata\n"
	".balign 16\n"
	".globl probe_blob\n"
	"probe_blob:\n"
	".incbin " "\"" BLOB "\"" "\n"
	".globl probe_blob_end\n"
	"probe_blob_end:\n"
	".previous\n");
extern const unsigned char probe_blob[], probe_blob_end[];
#endif

int main(void)
{
#ifdef BLOB
	uint64_t h = 0xcbf29ce484222325ULL;
	for (const unsigned char *p = probe_blob; p < probe_blob_end; p++) {
		h ^= *p;
		h *= 0x100000001b3ULL;
	}
	printf("blob %zu %016llx\n", (size_t)(probe_blob_end - probe_blob), (unsigned long long)h);
#endif
	printf("exec probe ok\n");
	return 42;
}
