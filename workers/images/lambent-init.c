/*
 * lambent-init: the first program of every Docker sandbox; it prepares the runtime's process,
 * then becomes the runtime.
 *
 *     lambent-init [--output PATH] [--relay HOST:PORT=SOCKET] -- COMMAND [ARG...]
 *
 * --output PATH   Sends stdout and stderr (and so the runtime's) to PATH, the FIFO the worker
 *                 reads the instance's output from. A pipe keeps the order of the Runtime API:
 *                 whatever the runtime wrote before it posted a reply is in the pipe when the
 *                 worker reads the reply, which Docker's log stream does not promise.
 * --relay ...     Listens on HOST:PORT, on the sandbox's loopback, and relays every connection
 *                 to the Unix socket SOCKET. It is bound before COMMAND starts, so a runtime that
 *                 connects at once to AWS_LAMBDA_RUNTIME_API finds it. Container images bring
 *                 their own runtime client, which speaks the Runtime API over TCP only; with
 *                 network "none" the Unix socket mounted into the container is the only way out.
 *
 * Then it execs COMMAND, which keeps this process's pid. It is statically linked and uses
 * nothing of the image it runs in, so it works in any image, distroless ones included.
 */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define CHUNK_BYTES 65536

static void usage(void) {
    fprintf(stderr,
            "usage: lambent-init [--output PATH] [--relay HOST:PORT=SOCKET] -- COMMAND [ARG...]\n");
    exit(2);
}

static void redirect_output(const char *path) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
        fprintf(stderr, "lambent-init: cannot open %s: %s\n", path, strerror(errno));
        exit(111);
    }
    if (dup2(fd, STDOUT_FILENO) < 0 || dup2(fd, STDERR_FILENO) < 0) {
        fprintf(stderr, "lambent-init: cannot redirect output: %s\n", strerror(errno));
        exit(111);
    }
    close(fd);
}

/* Copies both directions between two connected sockets until both ends are done. */
static void pump(int a, int b) {
    char buffer[CHUNK_BYTES];
    int open_a = 1, open_b = 1;
    while (open_a || open_b) {
        struct pollfd fds[2] = {{a, open_a ? POLLIN : 0, 0}, {b, open_b ? POLLIN : 0, 0}};
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            return;
        }
        for (int i = 0; i < 2; i++) {
            int from = i == 0 ? a : b, to = i == 0 ? b : a;
            int *still_open = i == 0 ? &open_a : &open_b;
            if (!*still_open || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            ssize_t got = read(from, buffer, sizeof buffer);
            if (got < 0 && errno == EINTR) continue;
            if (got <= 0) {
                /* The end of one direction is passed on; the other may still carry a reply. */
                shutdown(to, SHUT_WR);
                *still_open = 0;
                if (got < 0) return;
                continue;
            }
            for (ssize_t sent = 0; sent < got;) {
                ssize_t n = write(to, buffer + sent, got - sent);
                if (n < 0) {
                    if (errno == EINTR) continue;
                    return;
                }
                sent += n;
            }
        }
    }
}

static void serve_connection(int client, const char *socket_path) {
    int one = 1;
    /* HTTP clients wait for each small reply; Nagle's algorithm would hold them back. */
    setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int upstream = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    strncpy(address.sun_path, socket_path, sizeof address.sun_path - 1);
    if (upstream < 0 || connect(upstream, (struct sockaddr *)&address, sizeof address) < 0) {
        fprintf(stderr, "lambent-init: cannot reach %s: %s\n", socket_path, strerror(errno));
        _exit(1);
    }
    pump(client, upstream);
    _exit(0);
}

static void relay(int listener, const char *socket_path) {
    /* Connection handlers are reaped by the kernel. */
    struct sigaction ignore = {.sa_handler = SIG_IGN, .sa_flags = SA_NOCLDWAIT};
    sigaction(SIGCHLD, &ignore, NULL);
    for (;;) {
        int client = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (client < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            /* Usually out of descriptors or processes: wait for some to be released. */
            usleep(50000);
            continue;
        }
        pid_t pid = fork();
        if (pid == 0) {
            close(listener);
            serve_connection(client, socket_path);
        }
        close(client);
    }
}

static void start_relay(char *spec) {
    char *equals = strchr(spec, '=');
    char *colon = equals ? memrchr(spec, ':', equals - spec) : NULL;
    if (!equals || !colon) usage();
    *colon = '\0';
    *equals = '\0';
    const char *host = spec, *port = colon + 1, *socket_path = equals + 1;

    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons(atoi(port))};
    if (inet_pton(AF_INET, host, &address.sin_addr) != 1) {
        fprintf(stderr, "lambent-init: %s is not an IPv4 address\n", host);
        exit(2);
    }
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (listener < 0 || bind(listener, (struct sockaddr *)&address, sizeof address) < 0 ||
        listen(listener, 64) < 0) {
        fprintf(stderr, "lambent-init: cannot listen on %s:%s: %s\n", host, port, strerror(errno));
        exit(111);
    }

    pid_t runtime = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        fprintf(stderr, "lambent-init: cannot start the relay: %s\n", strerror(errno));
        exit(111);
    }
    if (pid == 0) {
        /* The relay ends with the runtime it serves. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != runtime) _exit(0);
        relay(listener, socket_path);
    }
    close(listener);
}

int main(int argc, char **argv) {
    int i = 1;
    for (; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0) {
            i++;
            break;
        } else if (strcmp(argv[i], "--output") == 0 && i + 1 < argc) {
            redirect_output(argv[++i]);
        } else if (strcmp(argv[i], "--relay") == 0 && i + 1 < argc) {
            start_relay(argv[++i]);
        } else {
            usage();
        }
    }
    if (i >= argc) usage();

    execvp(argv[i], argv + i);
    fprintf(stderr, "lambent-init: cannot run %s: %s\n", argv[i], strerror(errno));
    /* The shell's conventions: 127 for a missing command, 126 for one that cannot run. */
    return errno == ENOENT ? 127 : 126;
}
