/*
 * A Lambda runtime client in C for the tests of container image functions: the only file of
 * an image built FROM scratch, so nothing of Lambent's (no Python, no shell) is in it.
 *
 * It speaks the Runtime API over TCP at AWS_LAMBDA_RUNTIME_API, as runtime clients in Lambda's
 * images do, and answers each event with what it saw. With FAIL_INIT set it reports an init
 * error instead.
 */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUFFER_BYTES (8 * 1024 * 1024)
#define API "/2018-06-01/runtime"

static char host[64];
static int port;
static char response[BUFFER_BYTES];
static char request_body[BUFFER_BYTES];

/* One request on a connection of its own; the answer (headers and body) lands in response. */
static size_t call(const char *method, const char *path, const char *headers, const char *body) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &address.sin_addr);
    if (connect(fd, (struct sockaddr *)&address, sizeof address) < 0) {
        perror("connect");
        exit(1);
    }
    size_t length = body ? strlen(body) : 0;
    dprintf(fd, "%s %s HTTP/1.1\r\nHost: runtime\r\nConnection: close\r\n%s"
                "Content-Length: %zu\r\n\r\n", method, path, headers, length);
    if (length) write(fd, body, length);
    size_t got = 0;
    ssize_t n;
    while (got < sizeof response - 1 && (n = read(fd, response + got, sizeof response - 1 - got)) > 0)
        got += n;
    response[got] = '\0';
    close(fd);
    return got;
}

static const char *header(const char *name) {
    static char value[256];
    char *line = strcasestr(response, name);
    if (!line) return "";
    line += strlen(name);
    while (*line == ' ') line++;
    size_t n = strcspn(line, "\r\n");
    if (n >= sizeof value) n = sizeof value - 1;
    memcpy(value, line, n);
    value[n] = '\0';
    return value;
}

int main(int argc, char **argv) {
    const char *api = getenv("AWS_LAMBDA_RUNTIME_API");
    const char *handler = getenv("_HANDLER") ? getenv("_HANDLER") : "";
    if (!api || sscanf(api, "%63[^:]:%d", host, &port) != 2) {
        fprintf(stderr, "no AWS_LAMBDA_RUNTIME_API\n");
        return 1;
    }
    printf("echo runtime starting: handler=%s argv1=%s\n", handler, argc > 1 ? argv[1] : "");
    fflush(stdout);

    if (getenv("FAIL_INIT")) {
        call("POST", API "/init/error",
             "Lambda-Runtime-Function-Error-Type: Runtime.EchoInitError\r\n",
             "{\"errorMessage\": \"asked to fail\", \"errorType\": \"Runtime.EchoInitError\"}");
        return 1;
    }

    char cwd[256];
    if (!getcwd(cwd, sizeof cwd)) strcpy(cwd, "?");
    for (;;) {
        call("GET", API "/invocation/next", "", NULL);
        char request_id[256];
        snprintf(request_id, sizeof request_id, "%s", header("lambda-runtime-aws-request-id:"));
        const char *event = strstr(response, "\r\n\r\n");
        event = event ? event + 4 : "null";
        printf("handling %s\n", request_id);
        fflush(stdout);

        snprintf(request_body, sizeof request_body,
                 "{\"runtime\": \"image\", \"handler\": \"%s\", \"uid\": %d, \"cwd\": \"%s\", "
                 "\"function\": \"%s\", \"event\": %s}",
                 handler, (int)getuid(), cwd, getenv("AWS_LAMBDA_FUNCTION_NAME"), event);
        char path[512];
        snprintf(path, sizeof path, API "/invocation/%s/response", request_id);
        call("POST", path, "", request_body);
    }
}
