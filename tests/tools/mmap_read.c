/* Read a whole file through a shared read-only mapping (page faults, no read(2)) and write its
 * bytes to stdout. tests/kernel_readers.rs runs it in a child process, so that a page the kernel
 * refuses (SIGBUS) ends this program, not the test.
 *
 *   gcc -O2 -Wall tests/tools/mmap_read.c -o /tmp/mmap_read
 *   /tmp/mmap_read FILE > copy
 *
 * Exit 0: every byte written; 2: open/stat/mmap/write failed; killed by SIGBUS: a fault was
 * refused.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static void die(const char *what)
{
	fprintf(stderr, "mmap_read: %s: %s\n", what, strerror(errno));
	exit(2);
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: mmap_read FILE\n");
		return 2;
	}
	int fd = open(argv[1], O_RDONLY);
	if (fd < 0)
		die("open");
	struct stat st;
	if (fstat(fd, &st) < 0)
		die("fstat");
	size_t size = st.st_size;
	if (size == 0)
		return 0;
	unsigned char *p = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		die("mmap");
	/* Copy out page by page first (every fault happens here), then write. */
	unsigned char *out = malloc(size);
	if (!out)
		die("malloc");
	memcpy(out, p, size);
	for (size_t w = 0; w < size;) {
		ssize_t n = write(1, out + w, size - w);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("write");
		}
		w += n;
	}
	return 0;
}
