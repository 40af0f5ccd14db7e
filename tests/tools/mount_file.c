/* mount(2) a filesystem whose source is a regular file, without a loop device (erofs mounts
 * its image file directly since Linux 6.12, CONFIG_EROFS_FS_BACKED_BY_FILE), as a container
 * runtime does from its own code (mount(8) would set up a loop device for a regular file).
 * tests/kernel_readers.rs compiles it with gcc at run time.
 *
 *   gcc -O2 tests/tools/mount_file.c -o /tmp/mount_file
 *   /tmp/mount_file erofs /path/image.erofs /mnt/x
 *
 * Read-only. Exit 0: mounted; 1: mount(2) failed (stderr has the errno).
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: mount_file FSTYPE FILE TARGET\n");
		return 2;
	}
	if (mount(argv[2], argv[3], argv[1], MS_RDONLY, NULL) < 0) {
		fprintf(stderr, "mount_file: mount -t %s %s %s: %s (errno %d)\n", argv[1], argv[2],
			argv[3], strerror(errno), errno);
		return 1;
	}
	return 0;
}
