/* Read a whole file with io_uring (raw syscalls, no liburing) and write its bytes to stdout.
 * tests/kernel_readers.rs compiles it with gcc at run time and compares the bytes with the source.
 *
 *   gcc -O2 -Wall tests/tools/uring_read.c -o /tmp/uring_read
 *   /tmp/uring_read MODE FILE > copy
 *
 * MODE:
 *   read        IORING_OP_READ on a plain fd (open(2))
 *   fixed-file  IORING_OP_READ on a registered file (IORING_REGISTER_FILES, IOSQE_FIXED_FILE)
 *   fixed-buf   IORING_OP_READ_FIXED into registered buffers (IORING_REGISTER_BUFFERS)
 *   openat      IORING_OP_OPENAT opens it (in the ring), then IORING_OP_READ on that fd
 *
 * Reads are 128 KiB pieces, 8 in flight; a short read is resubmitted for its remainder.
 * Exit 0: every byte written. 2: usage or setup failure. 3: an io_uring operation failed
 * (stderr names it, its offset and the errno).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define QD 8
#define PIECE (128 * 1024)

struct ring {
	int fd;
	unsigned *sq_tail, *sq_mask, *sq_array;
	unsigned *cq_head, *cq_tail, *cq_mask;
	struct io_uring_sqe *sqes;
	struct io_uring_cqe *cqes;
	unsigned queued;
};

static void die(const char *what)
{
	fprintf(stderr, "uring_read: %s: %s\n", what, strerror(errno));
	exit(2);
}

static void ring_init(struct ring *r)
{
	struct io_uring_params p;
	memset(&p, 0, sizeof p);
	r->fd = syscall(__NR_io_uring_setup, QD * 2, &p);
	if (r->fd < 0)
		die("io_uring_setup");
	size_t sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
	size_t cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
	int single = p.features & IORING_FEAT_SINGLE_MMAP;
	if (single) {
		if (cq_len > sq_len)
			sq_len = cq_len;
		cq_len = sq_len;
	}
	char *sq = mmap(NULL, sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
			IORING_OFF_SQ_RING);
	if (sq == MAP_FAILED)
		die("mmap sq ring");
	char *cq = sq;
	if (!single) {
		cq = mmap(NULL, cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
			  IORING_OFF_CQ_RING);
		if (cq == MAP_FAILED)
			die("mmap cq ring");
	}
	r->sqes = mmap(NULL, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
		       MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQES);
	if (r->sqes == MAP_FAILED)
		die("mmap sqes");
	r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
	r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
	r->sq_array = (unsigned *)(sq + p.sq_off.array);
	r->cq_head = (unsigned *)(cq + p.cq_off.head);
	r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
	r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
	r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
	r->queued = 0;
}

/* A zeroed SQE at the tail, published by ring_submit. */
static struct io_uring_sqe *ring_sqe(struct ring *r)
{
	unsigned tail = *r->sq_tail + r->queued;
	unsigned idx = tail & *r->sq_mask;
	struct io_uring_sqe *sqe = &r->sqes[idx];
	memset(sqe, 0, sizeof *sqe);
	r->sq_array[idx] = idx;
	r->queued++;
	return sqe;
}

/* Publish the queued SQEs and wait for at least one completion. */
static void ring_submit_wait(struct ring *r)
{
	unsigned n = r->queued;
	__atomic_store_n(r->sq_tail, *r->sq_tail + n, __ATOMIC_RELEASE);
	r->queued = 0;
	for (;;) {
		int ret = syscall(__NR_io_uring_enter, r->fd, n, 1, IORING_ENTER_GETEVENTS, NULL, 0);
		if (ret >= 0)
			return;
		if (errno != EINTR)
			die("io_uring_enter");
		n = 0;
	}
}

/* Take one completion, if any. */
static int ring_reap(struct ring *r, struct io_uring_cqe *out)
{
	unsigned head = *r->cq_head;
	if (head == __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE))
		return 0;
	*out = r->cqes[head & *r->cq_mask];
	__atomic_store_n(r->cq_head, head + 1, __ATOMIC_RELEASE);
	return 1;
}

struct slot {
	off_t off;
	size_t len;
	int busy;
};

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: uring_read read|fixed-file|fixed-buf|openat FILE\n");
		return 2;
	}
	const char *mode = argv[1], *path = argv[2];
	int m_fixed_file = !strcmp(mode, "fixed-file");
	int m_fixed_buf = !strcmp(mode, "fixed-buf");
	int m_openat = !strcmp(mode, "openat");
	if (!m_fixed_file && !m_fixed_buf && !m_openat && strcmp(mode, "read")) {
		fprintf(stderr, "uring_read: unknown mode %s\n", mode);
		return 2;
	}
	/* The size from stat(2): no open of the file outside the ring in openat mode. */
	struct stat st;
	if (stat(path, &st) < 0)
		die("stat");
	size_t size = st.st_size;
	unsigned char *out = malloc(size ? size : 1);
	if (!out)
		die("malloc");

	struct ring r;
	ring_init(&r);
	int fd;
	struct io_uring_cqe cqe;
	if (m_openat) {
		struct io_uring_sqe *sqe = ring_sqe(&r);
		sqe->opcode = IORING_OP_OPENAT;
		sqe->fd = AT_FDCWD;
		sqe->addr = (uint64_t)(uintptr_t)path;
		sqe->open_flags = O_RDONLY;
		ring_submit_wait(&r);
		while (!ring_reap(&r, &cqe))
			;
		if (cqe.res < 0) {
			fprintf(stderr, "uring_read: IORING_OP_OPENAT: %s\n", strerror(-cqe.res));
			return 3;
		}
		fd = cqe.res;
	} else {
		fd = open(path, O_RDONLY);
		if (fd < 0)
			die("open");
	}
	int sqe_fd = fd;
	if (m_fixed_file) {
		if (syscall(__NR_io_uring_register, r.fd, IORING_REGISTER_FILES, &fd, 1) < 0)
			die("IORING_REGISTER_FILES");
		sqe_fd = 0;
	}
	unsigned char *bufs = NULL;
	if (m_fixed_buf) {
		bufs = mmap(NULL, (size_t)QD * PIECE, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (bufs == MAP_FAILED)
			die("mmap buffers");
		struct iovec iov[QD];
		for (int i = 0; i < QD; i++) {
			iov[i].iov_base = bufs + (size_t)i * PIECE;
			iov[i].iov_len = PIECE;
		}
		if (syscall(__NR_io_uring_register, r.fd, IORING_REGISTER_BUFFERS, iov, QD) < 0)
			die("IORING_REGISTER_BUFFERS");
	}

	struct slot slots[QD];
	memset(slots, 0, sizeof slots);
	size_t next = 0, done = 0;
	while (done < size) {
		for (int i = 0; i < QD; i++) {
			if (slots[i].busy == 0 && slots[i].len == 0 && next < size) {
				slots[i].off = next;
				slots[i].len = size - next < PIECE ? size - next : PIECE;
				next += slots[i].len;
			}
			if (slots[i].busy || slots[i].len == 0)
				continue;
			struct io_uring_sqe *sqe = ring_sqe(&r);
			sqe->fd = sqe_fd;
			sqe->off = slots[i].off;
			sqe->len = slots[i].len;
			sqe->user_data = i;
			if (m_fixed_file)
				sqe->flags |= IOSQE_FIXED_FILE;
			if (m_fixed_buf) {
				sqe->opcode = IORING_OP_READ_FIXED;
				sqe->addr = (uint64_t)(uintptr_t)(bufs + (size_t)i * PIECE);
				sqe->buf_index = i;
			} else {
				sqe->opcode = IORING_OP_READ;
				sqe->addr = (uint64_t)(uintptr_t)(out + slots[i].off);
			}
			slots[i].busy = 1;
		}
		ring_submit_wait(&r);
		while (ring_reap(&r, &cqe)) {
			struct slot *s = &slots[cqe.user_data];
			s->busy = 0;
			if (cqe.res < 0) {
				fprintf(stderr, "uring_read: %s at offset %lld: %s (errno %d)\n",
					m_fixed_buf ? "IORING_OP_READ_FIXED" : "IORING_OP_READ",
					(long long)s->off, strerror(-cqe.res), -cqe.res);
				return 3;
			}
			if (cqe.res == 0) {
				fprintf(stderr, "uring_read: end of file at offset %lld of %zu\n",
					(long long)s->off, size);
				return 3;
			}
			if (m_fixed_buf)
				memcpy(out + s->off, bufs + cqe.user_data * PIECE, cqe.res);
			s->off += cqe.res;
			s->len -= cqe.res;
			done += cqe.res;
		}
	}
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
