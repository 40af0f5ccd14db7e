/* nodelay.so: TCP_NODELAY on every socket a server accepts, loaded with LD_PRELOAD.
 *
 * s3s-fs (the S3 server of bench/wan.py) leaves Nagle's algorithm on for the connections it
 * accepts: an answer written in two parts (headers, then body) waits for the client's delayed
 * ACK, 25-50 ms a request, which would make the S3 rows measure the server. Built by
 * bench/wan.py with `gcc -shared -fPIC -O2 -o nodelay.so nodelay.c -ldl`.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

static void nodelay(int fd)
{
    int one = 1;
    if (fd >= 0)
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* fails on non-TCP: fine */
}

int accept4(int s, struct sockaddr *addr, socklen_t *len, int flags)
{
    static int (*real)(int, struct sockaddr *, socklen_t *, int);
    if (!real)
        real = (int (*)(int, struct sockaddr *, socklen_t *, int))dlsym(RTLD_NEXT, "accept4");
    int fd = real(s, addr, len, flags);
    nodelay(fd);
    return fd;
}

int accept(int s, struct sockaddr *addr, socklen_t *len)
{
    static int (*real)(int, struct sockaddr *, socklen_t *);
    if (!real)
        real = (int (*)(int, struct sockaddr *, socklen_t *))dlsym(RTLD_NEXT, "accept");
    int fd = real(s, addr, len);
    nodelay(fd);
    return fd;
}
