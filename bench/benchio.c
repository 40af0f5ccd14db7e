/* benchio: the timed parts of the hsm benchmark, so that a figure measures the I/O and not the
 * start-up of a tool.
 *
 *   benchio seq FILE [BLOCK]         read FILE front to back in BLOCK-byte reads (default 128 KiB,
 *                                    what cat and cp use); prints seconds and bytes
 *   benchio rand FILE COUNT SEED     COUNT 4 KiB preads at 4 KiB-aligned offsets drawn from a
 *                                    fixed-seed xorshift64*; prints seconds and a checksum
 *   benchio firstout CMD [ARG...]    fork+exec CMD with stdout on a pipe; prints the seconds from
 *                                    just before fork to the first byte of its output, then waits
 *                                    for it (its exit status must be 0)
 *
 * Every timer starts before open(2) / fork(2), so the open (FAN_OPEN_PERM) is part of the figure.
 * Output: one line, "SECONDS [EXTRA]". Exit status 1 on any error (with a message on stderr).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int die(const char *what)
{
    fprintf(stderr, "benchio: %s: %s\n", what, strerror(errno));
    return 1;
}

static int seq(const char *path, size_t block)
{
    char *buf = malloc(block);
    if (!buf)
        return die("malloc");
    double t0 = now();
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return die(path);
    unsigned long long total = 0;
    for (;;) {
        ssize_t n = read(fd, buf, block);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return die("read");
        }
        if (n == 0)
            break;
        total += (unsigned long long)n;
    }
    close(fd);
    double t1 = now();
    printf("%.6f %llu\n", t1 - t0, total);
    return 0;
}

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static int rnd(const char *path, long count, uint64_t seed)
{
    char buf[4096];
    uint64_t state = seed ? seed : 1;
    double t0 = now();
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return die(path);
    struct stat st;
    if (fstat(fd, &st) < 0)
        return die("fstat");
    uint64_t pages = (uint64_t)st.st_size / 4096;
    if (pages == 0) {
        errno = EINVAL;
        return die("file smaller than 4 KiB");
    }
    uint64_t sum = 0;
    for (long i = 0; i < count; i++) {
        off_t off = (off_t)(xorshift(&state) % pages) * 4096;
        ssize_t n = pread(fd, buf, sizeof buf, off);
        if (n != (ssize_t)sizeof buf)
            return die("pread");
        for (int j = 0; j < 4096; j += 512)
            sum += (unsigned char)buf[j];
    }
    close(fd);
    double t1 = now();
    printf("%.6f %llu\n", t1 - t0, (unsigned long long)sum);
    return 0;
}

static int firstout(char **argv)
{
    int p[2];
    if (pipe(p) < 0)
        return die("pipe");
    double t0 = now();
    pid_t pid = fork();
    if (pid < 0)
        return die("fork");
    if (pid == 0) {
        dup2(p[1], 1);
        close(p[0]);
        close(p[1]);
        execv(argv[0], argv);
        _exit(127);
    }
    close(p[1]);
    char c;
    ssize_t n;
    do
        n = read(p[0], &c, 1);
    while (n < 0 && errno == EINTR);
    double t1 = now();
    char rest[4096];
    while (read(p[0], rest, sizeof rest) > 0)
        ;
    int status;
    if (waitpid(pid, &status, 0) < 0)
        return die("waitpid");
    if (n != 1 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "benchio: %s produced no output or failed (status %d)\n", argv[0], status);
        return 1;
    }
    printf("%.6f\n", t1 - t0);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 3 && !strcmp(argv[1], "seq"))
        return seq(argv[2], argc >= 4 ? strtoul(argv[3], 0, 0) : 128 * 1024);
    if (argc == 5 && !strcmp(argv[1], "rand"))
        return rnd(argv[2], strtol(argv[3], 0, 0), strtoull(argv[4], 0, 0));
    if (argc >= 3 && !strcmp(argv[1], "firstout"))
        return firstout(argv + 2);
    fprintf(stderr, "usage: benchio seq FILE [BLOCK] | rand FILE COUNT SEED | firstout CMD [ARG...]\n");
    return 2;
}
