/* benchio: the timed parts of the hsm benchmark, so that a figure measures the I/O and not the
 * start-up of a tool.
 *
 *   benchio seq FILE [BLOCK]         read FILE front to back in BLOCK-byte reads (default 128 KiB,
 *                                    what cat and cp use); prints seconds and bytes
 *   benchio rand FILE COUNT SEED     COUNT 4 KiB preads at 4 KiB-aligned offsets drawn from a
 *                                    fixed-seed xorshift64*; prints seconds and a checksum
 *   benchio copyseq SRC DST          the floor under a cold `seq` through any daemon that copies:
 *                                    for each 1 MiB of SRC, read it (O_DIRECT where SRC's fs has
 *                                    it, into a transparent huge page, as hsm reads) and pwrite it
 *                                    into DST (a new file of SRC's size), then read it back from
 *                                    DST in 128 KiB reads; one thread, no events; prints seconds
 *                                    and the bytes read back
 *   benchio copyrand SRC DST COUNT SEED  the same for `rand`: before each 4 KiB pread of DST, copy
 *                                    that page from SRC (pread + pwrite); prints seconds and the
 *                                    checksum, which must equal `rand`'s on SRC
 *   benchio firstout CMD [ARG...]    fork+exec CMD with stdout on a pipe; prints the seconds from
 *                                    just before fork to the first byte of its output, then waits
 *                                    for it (its exit status must be 0)
 *   benchio touch MIB                write one byte per page of MIB MiB of fresh memory, twice; prints
 *                                    the seconds of each pass (in a VM whose host takes freed memory
 *                                    back, the first pass pays for every page)
 *   benchio mkstubs SRC DST THREADS  the floor under `hsm populate`: for every regular file of the
 *                                    tree SRC, the same system calls a stub costs (lstat of the
 *                                    source, an O_TMPFILE in DST, ftruncate, one trusted.* xattr,
 *                                    fstat, fchmod if the umask changed the mode, futimens, linkat
 *                                    to its name), directories spread over THREADS threads, and no
 *                                    other work; prints seconds and the file count
 *
 * Every timer starts before open(2) / fork(2), so the open (FAN_OPEN_PERM) is part of the figure.
 * Output: one line, "SECONDS [EXTRA]". Exit status 1 on any error (with a message on stderr).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <sys/xattr.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
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

/* Open SRC for reading and create DST (truncated, sparse, SRC's size) for the copy floors. */
static int open_copy(const char *src, const char *dst, int *s, int *d, off_t *size)
{
    struct stat st;
    *s = open(src, O_RDONLY);
    if (*s < 0 || fstat(*s, &st) < 0)
        return die(src);
    *d = open(dst, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (*d < 0 || ftruncate(*d, st.st_size) < 0)
        return die(dst);
    *size = st.st_size;
    return 0;
}

static int copyseq(const char *src, const char *dst)
{
    const size_t chunk = 1 << 20, block = 128 * 1024, huge = 2 << 20;
    char *buf = malloc(block);
    int s, d;
    off_t size;
    if (!buf)
        return die("malloc");
    /* a 2 MiB-aligned huge page: a direct read into it is a few large segments (see hsm's
     * src/sys/mem.rs) */
    char *map = mmap(NULL, 2 * huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED)
        return die("mmap");
    char *piece = (char *)(((uintptr_t)map + huge - 1) & ~(uintptr_t)(huge - 1));
    madvise(piece, huge, MADV_HUGEPAGE);
    double t0 = now();
    if (open_copy(src, dst, &s, &d, &size))
        return 1;
    int direct = fcntl(s, F_SETFL, fcntl(s, F_GETFL) | O_DIRECT) == 0;
    unsigned long long total = 0;
    for (off_t off = 0; off < size; off += (off_t)chunk) {
        size_t n = (size_t)(size - off) < chunk ? (size_t)(size - off) : chunk;
        /* whole blocks for a direct read; the last piece may come back short, as it should */
        size_t want = direct ? (n + 4095) & ~(size_t)4095 : n;
        ssize_t got = pread(s, piece, want, off);
        if (got < 0 && errno == EINVAL && direct) {
            direct = 0;
            fcntl(s, F_SETFL, fcntl(s, F_GETFL) & ~O_DIRECT);
            got = pread(s, piece, n, off);
        }
        if (got < (ssize_t)n)
            return got < 0 ? die("pread source") : (errno = EIO, die("short source read"));
        for (size_t w = 0; w < n;) {
            ssize_t put = pwrite(d, piece + w, n - w, off + (off_t)w);
            if (put < 0 && errno == EINTR)
                continue;
            if (put <= 0)
                return die("pwrite");
            w += (size_t)put;
        }
        for (size_t r = 0; r < n; r += block) {
            ssize_t got = pread(d, buf, block, off + (off_t)r);
            if (got <= 0)
                return die("pread");
            total += (unsigned long long)got;
        }
    }
    close(s);
    close(d);
    double t1 = now();
    printf("%.6f %llu\n", t1 - t0, total);
    return 0;
}

/* `rand` (src NULL: COUNT 4 KiB preads of path) and `copyrand` (each page copied from src into
 * path, a new file of src's size, before it is read back). */
static int rnd(const char *src, const char *path, long count, uint64_t seed)
{
    char buf[4096];
    uint64_t state = seed ? seed : 1;
    int s = -1, fd;
    off_t size;
    double t0 = now();
    if (src) {
        if (open_copy(src, path, &s, &fd, &size))
            return 1;
    } else {
        struct stat st;
        fd = open(path, O_RDONLY);
        if (fd < 0 || fstat(fd, &st) < 0)
            return die(path);
        size = st.st_size;
    }
    uint64_t pages = (uint64_t)size / 4096;
    if (pages == 0) {
        errno = EINVAL;
        return die("file smaller than 4 KiB");
    }
    uint64_t sum = 0;
    for (long i = 0; i < count; i++) {
        off_t off = (off_t)(xorshift(&state) % pages) * 4096;
        if (src && (pread(s, buf, sizeof buf, off) != (ssize_t)sizeof buf ||
                    pwrite(fd, buf, sizeof buf, off) != (ssize_t)sizeof buf))
            return die("copy");
        if (pread(fd, buf, sizeof buf, off) != (ssize_t)sizeof buf)
            return die("pread");
        for (int j = 0; j < 4096; j += 512)
            sum += (unsigned char)buf[j];
    }
    if (src)
        close(s);
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

/* mkstubs: the directories of the tree (made in DST on the way), then their files on threads. */
struct dirlist {
    char **paths; /* relative to SRC, "" for the root */
    size_t len, cap;
    size_t next; /* next directory a thread takes */
    pthread_mutex_t lock;
    int src, dst;
    long files;
    int failed;
};

static void dl_push(struct dirlist *dl, const char *rel)
{
    if (dl->len == dl->cap) {
        dl->cap = dl->cap ? dl->cap * 2 : 256;
        dl->paths = realloc(dl->paths, dl->cap * sizeof(char *));
        if (!dl->paths)
            exit(die("realloc"));
    }
    dl->paths[dl->len++] = strdup(rel);
}

static int collect_dirs(struct dirlist *dl, const char *rel)
{
    int fd = openat(dl->src, *rel ? rel : ".", O_RDONLY | O_DIRECTORY);
    if (fd < 0)
        return die(rel);
    DIR *d = fdopendir(fd);
    if (!d)
        return die("fdopendir");
    dl_push(dl, rel);
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_type != DT_DIR || !strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        char sub[4096];
        snprintf(sub, sizeof sub, "%s%s%s", rel, *rel ? "/" : "", e->d_name);
        if (mkdirat(dl->dst, sub, 0700) && errno != EEXIST)
            return die(sub);
        if (collect_dirs(dl, sub))
            return 1;
    }
    closedir(d);
    return 0;
}

static void *stub_files(void *arg)
{
    struct dirlist *dl = arg;
    static const char record[64] = "a source record of about the size hsm writes for a stub";
    long made = 0;
    for (;;) {
        pthread_mutex_lock(&dl->lock);
        size_t i = dl->next++;
        pthread_mutex_unlock(&dl->lock);
        if (i >= dl->len)
            break;
        const char *rel = dl->paths[i];
        int sfd = openat(dl->src, *rel ? rel : ".", O_RDONLY | O_DIRECTORY);
        int dfd = openat(dl->dst, *rel ? rel : ".", O_RDONLY | O_DIRECTORY);
        DIR *d = sfd >= 0 ? fdopendir(sfd) : NULL;
        if (!d || dfd < 0) {
            __atomic_store_n(&dl->failed, die(rel), __ATOMIC_RELAXED);
            break;
        }
        struct dirent *e;
        while ((e = readdir(d))) {
            if (e->d_type != DT_REG)
                continue;
            struct stat st;
            if (fstatat(sfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW)) {
                __atomic_store_n(&dl->failed, die(e->d_name), __ATOMIC_RELAXED);
                continue;
            }
            /* Unnamed until whole, as hsm makes a stub: created with its mode (no fchmod when the
             * umask leaves it whole), then linked at its name. */
            int fd = openat(dfd, ".", O_TMPFILE | O_WRONLY | O_CLOEXEC, st.st_mode & 0777);
            struct timespec times[2] = {st.st_atim, st.st_mtim};
            struct stat made_st;
            if (fd < 0 || ftruncate(fd, st.st_size) ||
                fsetxattr(fd, "trusted.benchio", record, sizeof record, 0) || fstat(fd, &made_st) ||
                ((made_st.st_mode & 07777) != (st.st_mode & 07777) && fchmod(fd, st.st_mode & 07777)) ||
                futimens(fd, times) || linkat(fd, "", dfd, e->d_name, AT_EMPTY_PATH)) {
                __atomic_store_n(&dl->failed, die(e->d_name), __ATOMIC_RELAXED);
            }
            if (fd >= 0)
                close(fd);
            made++;
        }
        closedir(d);
        close(dfd);
    }
    pthread_mutex_lock(&dl->lock);
    dl->files += made;
    pthread_mutex_unlock(&dl->lock);
    return NULL;
}

static int mkstubs(const char *src, const char *dst, int threads)
{
    double t0 = now();
    struct dirlist dl = {.lock = PTHREAD_MUTEX_INITIALIZER};
    dl.src = open(src, O_RDONLY | O_DIRECTORY);
    if (dl.src < 0)
        return die(src);
    if (mkdir(dst, 0700) && errno != EEXIST)
        return die(dst);
    dl.dst = open(dst, O_RDONLY | O_DIRECTORY);
    if (dl.dst < 0)
        return die(dst);
    if (collect_dirs(&dl, ""))
        return 1;
    if (threads < 1)
        threads = 1;
    pthread_t t[64];
    if (threads > 64)
        threads = 64;
    for (int i = 0; i < threads; i++)
        if (pthread_create(&t[i], NULL, stub_files, &dl))
            return die("pthread_create");
    for (int i = 0; i < threads; i++)
        pthread_join(t[i], NULL);
    if (dl.failed)
        return 1;
    printf("%.6f %ld\n", now() - t0, dl.files);
    return 0;
}

static int touch(size_t mib)
{
    size_t size = mib << 20;
    volatile char *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return die("mmap");
    double pass[2];
    for (int p = 0; p < 2; p++) {
        double t0 = now();
        for (size_t o = 0; o < size; o += 4096)
            m[o] = (char)p;
        pass[p] = now() - t0;
    }
    printf("%.6f %.6f\n", pass[0], pass[1]);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 3 && !strcmp(argv[1], "seq"))
        return seq(argv[2], argc >= 4 ? strtoul(argv[3], 0, 0) : 128 * 1024);
    if (argc == 5 && !strcmp(argv[1], "rand"))
        return rnd(NULL, argv[2], strtol(argv[3], 0, 0), strtoull(argv[4], 0, 0));
    if (argc == 5 && !strcmp(argv[1], "mkstubs"))
        return mkstubs(argv[2], argv[3], atoi(argv[4]));
    if (argc == 4 && !strcmp(argv[1], "copyseq"))
        return copyseq(argv[2], argv[3]);
    if (argc == 6 && !strcmp(argv[1], "copyrand"))
        return rnd(argv[2], argv[3], strtol(argv[4], 0, 0), strtoull(argv[5], 0, 0));
    if (argc >= 3 && !strcmp(argv[1], "firstout"))
        return firstout(argv + 2);
    if (argc == 3 && !strcmp(argv[1], "touch"))
        return touch(strtoul(argv[2], 0, 0));
    fprintf(stderr, "usage: benchio seq|rand|copyseq|copyrand|firstout|touch|mkstubs ARGS... "
                    "(see the comment at the top of benchio.c)\n");
    return 2;
}
