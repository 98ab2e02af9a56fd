/* The bench's subscriber fleet in C: the same job and control protocol as bench/loadgen.py
 * (which documents them), at a fraction of the cost per read, so that the load generator is
 * never what bounds a fan-out measurement. Built by bench/run.py with the system's cc.
 *
 *   loadgen --port P --transport sse|ndjson|ws|nats-ws|grpc --path PATH --connections N
 *           [--sample-every K] [--ws-subscribe TOPIC] [--nats-subject SUBJ]
 *
 * grpc: one broker.v1.Broker/Subscribe call per connection (HTTP/2 with prior knowledge, the
 * topic from --ws-subscribe), with flow-control windows kept wide open; events are counted in
 * the DATA frames as for the other transports.
 *
 * stdin: "reset", "report", "quit" (one per line); stdout: one JSON object per line.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_SAMPLES 400000
#define RECV_BYTES 262144

enum { SSE, NDJSON, WS, NATS_WS, GRPC };

typedef struct {
    int fd, ready, closed, sampled, paused;
    long count;
    char head[8192];
    int head_len;
    /* HTTP chunked */
    int chunked;
    long chunk_left;
    int chunk_crlf;
    char chunk_line[32];
    int chunk_line_len;
    /* WebSocket */
    unsigned char ws_hdr[14];
    int ws_hdr_len;
    long ws_left;
    int ws_opcode;
    /* HTTP/2 */
    unsigned char h2_hdr[9];
    int h2_hdr_len;
    long h2_left;
    int h2_type, h2_flags;
    unsigned char h2_ping[8];
    int h2_ping_len;
    long h2_unacked;  /* DATA bytes since the last WINDOW_UPDATE */
    /* marker matching across reads: how many bytes of MARKER are matched so far */
    int match;
    /* sampled: digits of the stamp being read */
    int in_stamp;
    char stamp[32];
    int stamp_len;
} conn_t;

static const char MARKER[] = "{\"t\":";
static int transport, n_conns, sample_every = 10, port;
static char path[1024] = "/", ws_subscribe[256] = "bench", nats_subject[256] = "bench";
static conn_t *conns;
static double *samples;
static long n_samples, n_seen;
static double max_seen;  /* over every sample, kept or not */
static uint64_t rng = 0x9E3779B97F4A7C15u;

/* Keep a latency sample: the first MAX_SAMPLES, then each later one in place of a random kept
   one with probability MAX_SAMPLES / seen (reservoir sampling), so that the percentiles cover
   the whole step. Keeping the first ones only weighed a fast step's first second, where the
   server is still warming up, as if it were all of it. */
static void keep_sample(double value) {
    n_seen++;
    if (value > max_seen) max_seen = value;
    if (n_samples < MAX_SAMPLES) { samples[n_samples++] = value; return; }
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;  /* xorshift64 */
    uint64_t j = rng % (uint64_t)n_seen;
    if (j < MAX_SAMPLES) samples[j] = value;
}
static int failed;
static char first_error[256];

/* A template with "{i}" in it, for connection i (one topic per connection). */
static void expand(char *out, size_t size, const char *tmpl, int i) {
    const char *at = strstr(tmpl, "{i}");
    if (!at) { snprintf(out, size, "%s", tmpl); return; }
    snprintf(out, size, "%.*s%d%s", (int)(at - tmpl), tmpl, i, at + 3);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void fail(conn_t *c, const char *why) {
    if (!c->ready) failed++;
    if (!first_error[0]) snprintf(first_error, sizeof first_error, "%s", why);
    if (!c->closed) {
        c->closed = 1;
        close(c->fd);
    }
}

static void send_all(conn_t *c, const void *data, size_t len) {
    const char *p = data;
    while (len) {
        ssize_t n = send(c->fd, p, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) { usleep(100); continue; }
            fail(c, "send failed");
            return;
        }
        p += n;
        len -= (size_t)n;
    }
}

static size_t ws_frame(unsigned char *out, int opcode, const char *payload, size_t n) {
    size_t h = 0;
    out[h++] = 0x80 | opcode;
    if (n < 126) out[h++] = 0x80 | n;
    else { out[h++] = 0x80 | 126; out[h++] = n >> 8; out[h++] = n & 0xff; }
    memset(out + h, 0, 4);  /* a zero mask */
    h += 4;
    memcpy(out + h, payload, n);
    return h + n;
}

/* The application bytes: count markers, read the stamps after them on sampled connections.
 * memchr finds each '{' (the payload's padding has none), and the marker and stamp are read
 * byte by byte from there, carrying partial ones across reads: ~6 ns per event, where memmem
 * took ~50 (half of this core at 9 M events/s). */
static void app_bytes(conn_t *c, const char *p, size_t n, double t) {
    const char *end = p + n;
    while (p < end) {
        if (c->in_stamp) {
            while (p < end && ((*p >= '0' && *p <= '9') || *p == '.')) {
                if (c->stamp_len < 30) c->stamp[c->stamp_len++] = *p;
                p++;
            }
            if (p == end) return;
            c->stamp[c->stamp_len] = 0;
            keep_sample(t - strtod(c->stamp, NULL));
            c->in_stamp = 0;
        }
        if (c->match) {
            if (*p != MARKER[c->match]) {
                c->match = 0;  /* and this byte is looked at again, as a '{' perhaps */
                continue;
            }
            p++;
            if (++c->match == 5) {
                c->count++;
                c->match = 0;
                if (c->sampled) { c->in_stamp = 1; c->stamp_len = 0; }
            }
            continue;
        }
        const char *hit = memchr(p, '{', (size_t)(end - p));
        if (!hit) return;
        if (end - hit >= 5) {  /* the whole marker is here, or no marker is */
            p = hit + 1;
            if (memcmp(hit + 1, MARKER + 1, 4) != 0) continue;
            c->count++;
            p = hit + 5;
            if (c->sampled) { c->in_stamp = 1; c->stamp_len = 0; }
            continue;
        }
        c->match = 1;
        p = hit + 1;
    }
}

/* Frames are walked for their heads only (a close ends the connection); the markers are then
 * counted in the whole read at once, heads and all, as for SSE. No marker can take in a head: a
 * head is 2-4 bytes starting with 0x81/0x82 (its length bytes may read '{' or '"'), and the
 * payload after it starts with '{' or a NATS verb, never with the rest of a marker.
 * (Counting frame by frame made a WebSocket step cost the load generator ~40 % more than SSE.) */
static void ws_bytes(conn_t *c, const char *p, size_t n, double t) {
    size_t i = 0;
    while (i < n) {
        if (c->ws_left > 0) {
            size_t take = (size_t)c->ws_left < n - i ? (size_t)c->ws_left : n - i;
            i += take;
            c->ws_left -= (long)take;
            continue;
        }
        if (!c->ws_hdr_len && n - i >= 4) {  /* the usual case: a whole short head is here */
            const unsigned char *h = (const unsigned char *)p + i;
            int len7 = h[1] & 0x7f;
            if (len7 < 127) {
                c->ws_opcode = h[0] & 0x0f;
                if (c->ws_opcode == 8) { fail(c, "websocket closed by the server"); return; }
                c->ws_left = len7 < 126 ? len7 : (h[2] << 8) | h[3];
                i += len7 < 126 ? 2 : 4;
                continue;
            }
        }
        c->ws_hdr[c->ws_hdr_len++] = (unsigned char)p[i++];
        if (c->ws_hdr_len < 2) continue;
        int len7 = c->ws_hdr[1] & 0x7f;
        int need = len7 < 126 ? 2 : (len7 == 126 ? 4 : 10);
        if (c->ws_hdr_len < need) continue;
        long length = len7;
        if (len7 == 126) length = (c->ws_hdr[2] << 8) | c->ws_hdr[3];
        else if (len7 == 127) {
            length = 0;
            for (int k = 2; k < 10; k++) length = (length << 8) | c->ws_hdr[k];
        }
        c->ws_opcode = c->ws_hdr[0] & 0x0f;
        c->ws_hdr_len = 0;
        c->ws_left = length;
        if (c->ws_opcode == 8) { fail(c, "websocket closed by the server"); return; }
    }
    app_bytes(c, p, n, t);
    if (transport != NATS_WS) return;
    /* the server's PING wants a PONG (memchr for 'P': memmem cost ~50 ns per event) */
    for (const char *q = p; (q = memchr(q, 'P', (size_t)(p + n - q))) != NULL; q++) {
        if ((size_t)(p + n - q) >= 6 && !memcmp(q, "PING\r\n", 6)) {
            unsigned char frame[64];
            send_all(c, frame, ws_frame(frame, 1, "PONG\r\n", 6));
            break;
        }
    }
}

static size_t h2_frame(unsigned char *out, int type, int flags, uint32_t stream, size_t n) {
    out[0] = (unsigned char)(n >> 16); out[1] = (unsigned char)(n >> 8); out[2] = (unsigned char)n;
    out[3] = (unsigned char)type; out[4] = (unsigned char)flags;
    out[5] = (unsigned char)(stream >> 24); out[6] = (unsigned char)(stream >> 16);
    out[7] = (unsigned char)(stream >> 8); out[8] = (unsigned char)stream;
    return 9;
}

static void h2_window_update(conn_t *c, uint32_t stream, uint32_t increment) {
    unsigned char f[13];
    h2_frame(f, 8, 0, stream, 4);
    f[9] = (unsigned char)(increment >> 24); f[10] = (unsigned char)(increment >> 16);
    f[11] = (unsigned char)(increment >> 8); f[12] = (unsigned char)increment;
    send_all(c, f, sizeof f);
}

static size_t hpack_literal(unsigned char *out, const char *name, const char *value) {
    size_t n = strlen(name), v = strlen(value), i = 0;
    out[i++] = 0;  /* literal without indexing, new name, no Huffman (lengths < 127) */
    out[i++] = (unsigned char)n; memcpy(out + i, name, n); i += n;
    out[i++] = (unsigned char)v; memcpy(out + i, value, v); i += v;
    return i;
}

/* The connection preface, our SETTINGS (windows and frames as large as allowed), the
 * connection window opened, and the Subscribe call: HEADERS, then its one message. */
static size_t grpc_request(unsigned char *out, const char *topic) {
    size_t i = 0;
    memcpy(out, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 24); i += 24;
    i += h2_frame(out + i, 4, 0, 0, 12);
    const unsigned char settings[12] = {0, 4, 0x7f, 0xff, 0xff, 0xff,   /* INITIAL_WINDOW_SIZE */
                                        0, 5, 0x00, 0xff, 0xff, 0xff};  /* MAX_FRAME_SIZE */
    memcpy(out + i, settings, 12); i += 12;
    i += h2_frame(out + i, 8, 0, 0, 4);
    uint32_t more = 0x7fffffff - 65535;
    out[i++] = (unsigned char)(more >> 24); out[i++] = (unsigned char)(more >> 16);
    out[i++] = (unsigned char)(more >> 8); out[i++] = (unsigned char)more;
    unsigned char block[512];
    size_t b = 0;
    block[b++] = 0x83;  /* :method POST (static table) */
    block[b++] = 0x86;  /* :scheme http */
    b += hpack_literal(block + b, ":path", "/broker.v1.Broker/Subscribe");
    b += hpack_literal(block + b, ":authority", "127.0.0.1");
    b += hpack_literal(block + b, "content-type", "application/grpc");
    b += hpack_literal(block + b, "te", "trailers");
    i += h2_frame(out + i, 1, 0x4, 1, b);  /* END_HEADERS */
    memcpy(out + i, block, b); i += b;
    size_t t = strlen(topic);
    size_t message = 2 + t;  /* SubscribeRequest: field 1 (topics), one string */
    i += h2_frame(out + i, 0, 0x1, 1, 5 + message);  /* END_STREAM */
    out[i++] = 0; out[i++] = 0; out[i++] = 0; out[i++] = 0; out[i++] = (unsigned char)message;
    out[i++] = 0x0a; out[i++] = (unsigned char)t;
    memcpy(out + i, topic, t); i += t;
    return i;
}

/* Frames are walked for their heads: SETTINGS and PING are acknowledged, the end of the stream
 * (trailers, RST_STREAM, GOAWAY) ends the connection, DATA is counted and its window given
 * back; events are then counted in the whole read at once, as for WebSocket (a frame is a whole
 * message: MAX_FRAME_SIZE is 16 MiB, a Delivery at most 1 MiB). */
static void grpc_bytes(conn_t *c, const char *p, size_t n, double t) {
    size_t i = 0;
    long data = 0;
    while (i < n) {
        if (c->h2_left > 0) {
            size_t take = (size_t)c->h2_left < n - i ? (size_t)c->h2_left : n - i;
            if (c->h2_type == 6 && !(c->h2_flags & 1))
                for (size_t k = 0; k < take && c->h2_ping_len < 8; k++)
                    c->h2_ping[c->h2_ping_len++] = (unsigned char)p[i + k];
            if (c->h2_type == 0) data += (long)take;
            i += take;
            c->h2_left -= (long)take;
            if (!c->h2_left && c->h2_type == 6 && !(c->h2_flags & 1)) {
                unsigned char f[17];
                h2_frame(f, 6, 1, 0, 8);
                memcpy(f + 9, c->h2_ping, 8);
                send_all(c, f, sizeof f);
            }
            continue;
        }
        c->h2_hdr[c->h2_hdr_len++] = (unsigned char)p[i++];
        if (c->h2_hdr_len < 9) continue;
        c->h2_hdr_len = 0;
        const unsigned char *h = c->h2_hdr;
        c->h2_left = (h[0] << 16) | (h[1] << 8) | h[2];
        c->h2_type = h[3];
        c->h2_flags = h[4];
        c->h2_ping_len = 0;
        if (c->h2_type == 0 && !c->ready) c->ready = 1;  /* the greeting (subscribed) */
        if (c->h2_type == 4 && !(c->h2_flags & 1)) {
            unsigned char f[9];
            send_all(c, f, h2_frame(f, 4, 1, 0, 0));
        }
        if ((c->h2_type == 1 || c->h2_type == 0) && (c->h2_flags & 1)) {
            fail(c, "the server ended the call");
            return;
        }
        if (c->h2_type == 3 || c->h2_type == 7) { fail(c, "the server reset the call"); return; }
    }
    c->h2_unacked += data;
    if (c->h2_unacked > (64L << 20)) {  /* 64 MiB read: give it back (windows are ~2 GiB) */
        h2_window_update(c, 1, (uint32_t)c->h2_unacked);
        h2_window_update(c, 0, (uint32_t)c->h2_unacked);
        c->h2_unacked = 0;
    }
    if (c->ready) app_bytes(c, p, n, t);
}

static void body_bytes(conn_t *c, const char *p, size_t n, double t) {
    if (transport == WS || transport == NATS_WS) { ws_bytes(c, p, n, t); return; }
    if (transport == GRPC) { grpc_bytes(c, p, n, t); return; }
    if (!c->chunked) { app_bytes(c, p, n, t); return; }
    size_t i = 0;
    while (i < n) {
        if (c->chunk_left > 0) {
            size_t take = (size_t)c->chunk_left < n - i ? (size_t)c->chunk_left : n - i;
            app_bytes(c, p + i, take, t);
            i += take;
            c->chunk_left -= (long)take;
            if (!c->chunk_left) c->chunk_crlf = 2;
        } else if (c->chunk_crlf) {
            i++;
            c->chunk_crlf--;
        } else {
            char ch = p[i++];
            if (ch == '\n') {
                c->chunk_line[c->chunk_line_len] = 0;
                c->chunk_left = strtol(c->chunk_line, NULL, 16);
                c->chunk_line_len = 0;
                if (!c->chunk_left) c->chunk_crlf = 2;
            } else if (ch != '\r' && c->chunk_line_len < 30) {
                c->chunk_line[c->chunk_line_len++] = ch;
            }
        }
    }
}

static void readable(conn_t *c, char *buf) {
    ssize_t n = recv(c->fd, buf, RECV_BYTES, 0);
    if (n < 0) { if (errno != EAGAIN) fail(c, "recv failed"); return; }
    if (n == 0) { fail(c, "closed by the server"); return; }
    double t = c->sampled ? now() : 0;
    if (c->ready || transport == GRPC) { body_bytes(c, buf, (size_t)n, t); return; }
    size_t room = sizeof c->head - 1 - (size_t)c->head_len;
    size_t take = (size_t)n < room ? (size_t)n : room;
    memcpy(c->head + c->head_len, buf, take);
    c->head_len += (int)take;
    c->head[c->head_len] = 0;
    char *end = strstr(c->head, "\r\n\r\n");
    if (!end) return;
    if (strncmp(c->head + 9, "200", 3) != 0 && strncmp(c->head + 9, "101", 3) != 0) {
        char why[128];
        snprintf(why, sizeof why, "status %.3s", c->head + 9);
        fail(c, why);
        return;
    }
    c->ready = 1;
    c->chunked = strcasestr(c->head, "transfer-encoding: chunked") != NULL;
    size_t head_bytes = (size_t)(end + 4 - c->head);
    /* what came after the head, in this read */
    size_t consumed_before = (size_t)c->head_len - take;
    size_t rest_from = head_bytes > consumed_before ? head_bytes - consumed_before : 0;
    if (transport == WS) {
        char op[512];
        unsigned char frame[600];
        char topic[300];
        expand(topic, sizeof topic, ws_subscribe, (int)(c - conns));
        int len = snprintf(op, sizeof op, "{\"op\":\"subscribe\",\"topics\":[\"%s\"]}", topic);
        send_all(c, frame, ws_frame(frame, 1, op, (size_t)len));
    } else if (transport == NATS_WS) {
        char op[512];
        unsigned char frame[600];
        int len = snprintf(op, sizeof op,
                           "CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1}\r\n"
                           "SUB %s %d\r\n", nats_subject, (int)(c - conns) + 1);
        send_all(c, frame, ws_frame(frame, 1, op, (size_t)len));
    }
    if ((size_t)n > rest_from) body_bytes(c, buf + rest_from, (size_t)n - rest_from, t);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* "report": counts and latency percentiles (sorts every sample: tens of ms with 400,000);
   "count": the counts alone, cheap enough to poll while connections are being read. */
static void report(int percentiles) {
    long total = 0, mn = -1, mx = 0, paused_total = 0, paused_min = -1;
    int open = 0, closed = 0;
    for (int i = 0; i < n_conns; i++) {
        total += conns[i].count;
        if (conns[i].paused) {
            paused_total += conns[i].count;
            if (paused_min < 0 || conns[i].count < paused_min) paused_min = conns[i].count;
        }
        if (mn < 0 || conns[i].count < mn) mn = conns[i].count;
        if (conns[i].count > mx) mx = conns[i].count;
        if (conns[i].closed) closed++;
        else if (conns[i].ready) open++;
    }
    printf("{\"received\": %ld, \"per_connection_min\": %ld, \"per_connection_max\": %ld, "
           "\"open\": %d, \"closed\": %d, \"latency\": ", total, mn < 0 ? 0 : mn, mx, open, closed);
    if (!n_samples || !percentiles) printf("{\"count\": %ld, \"seen\": %ld}", n_samples, n_seen);
    else {
        double *sorted = malloc(sizeof(double) * (size_t)n_samples);
        memcpy(sorted, samples, sizeof(double) * (size_t)n_samples);
        qsort(sorted, (size_t)n_samples, sizeof(double), cmp_double);
        long last = n_samples - 1, i50 = n_samples / 2, i99 = (long)(0.99 * n_samples);
        if (i99 > last) i99 = last;
        printf("{\"count\": %ld, \"seen\": %ld, \"p50_ms\": %.3f, \"p99_ms\": %.3f, "
               "\"max_ms\": %.3f}", n_samples, n_seen, sorted[i50] * 1000, sorted[i99] * 1000,
               max_seen * 1000);
        free(sorted);
    }
    printf(", \"paused_received\": %ld, \"paused_min\": %ld", paused_total,
           paused_min < 0 ? 0 : paused_min);
    printf(", \"errors\": [");
    if (first_error[0]) printf("\"%s\"", first_error);
    printf("]}\n");
    fflush(stdout);
}

int main(int argc, char **argv) {
    const char *tname = "sse";
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--transport")) tname = argv[i + 1];
        else if (!strcmp(argv[i], "--path")) snprintf(path, sizeof path, "%s", argv[i + 1]);
        else if (!strcmp(argv[i], "--connections")) n_conns = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--sample-every")) sample_every = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--ws-subscribe"))
            snprintf(ws_subscribe, sizeof ws_subscribe, "%s", argv[i + 1]);
        else if (!strcmp(argv[i], "--nats-subject"))
            snprintf(nats_subject, sizeof nats_subject, "%s", argv[i + 1]);
    }
    transport = !strcmp(tname, "ndjson") ? NDJSON : !strcmp(tname, "ws") ? WS
              : !strcmp(tname, "nats-ws") ? NATS_WS : !strcmp(tname, "grpc") ? GRPC : SSE;
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    conns = calloc((size_t)n_conns, sizeof(conn_t));
    samples = malloc(sizeof(double) * MAX_SAMPLES);
    char *buf = malloc(RECV_BYTES);
    int ep = epoll_create1(0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    char request[2048], target[1100];
    const char *accept = transport == NDJSON ? "application/x-ndjson" : "text/event-stream";
    struct epoll_event events[4096];
    /* connect in batches; each waits for its response head */
    for (int start = 0; start < n_conns; start += 256) {
        int stop = start + 256 < n_conns ? start + 256 : n_conns;
        for (int i = start; i < stop; i++) {
            conn_t *c = &conns[i];
            c->sampled = sample_every > 0 && i % sample_every == 0;
            c->fd = socket(AF_INET, SOCK_STREAM, 0);
            int one = 1;
            setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0) { fail(c, "connect failed"); continue; }
            expand(target, sizeof target, path, i);
            int rlen;
            if (transport == GRPC) {
                char topic[300];
                unsigned char h2req[1024];
                expand(topic, sizeof topic, ws_subscribe, i);
                send_all(c, h2req, grpc_request(h2req, topic));
                rlen = 0;
            } else if (transport == SSE || transport == NDJSON)
                rlen = snprintf(request, sizeof request, "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                                "Accept: %s\r\nUser-Agent: broker-bench-c\r\n\r\n", target, port,
                                accept);
            else
                rlen = snprintf(request, sizeof request, "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                "Sec-WebSocket-Version: 13\r\n%s\r\n", target, port,
                                transport == WS ? "Sec-WebSocket-Protocol: broker.v1.json\r\n" : "");
            if (rlen) send_all(c, request, (size_t)rlen);
            fcntl(c->fd, F_SETFL, O_NONBLOCK);
            struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
            epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
        }
        double deadline = now() + 30;
        for (;;) {
            int waiting = 0;
            for (int i = start; i < stop; i++) waiting += !conns[i].ready && !conns[i].closed;
            if (!waiting || now() > deadline) break;
            int k = epoll_wait(ep, events, 4096, 50);
            for (int j = 0; j < k; j++) readable(&conns[events[j].data.u32], buf);
        }
    }
    int ready = 0;
    for (int i = 0; i < n_conns; i++) ready += conns[i].ready && !conns[i].closed;
    printf("{\"ready\": %d, \"failed\": %d, \"errors\": [%s%s%s]}\n", ready, n_conns - ready,
           first_error[0] ? "\"" : "", first_error, first_error[0] ? "\"" : "");
    fflush(stdout);
    fcntl(0, F_SETFL, O_NONBLOCK);
    struct epoll_event sev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &sev);
    char line[256];
    int line_len = 0;
    for (;;) {
        int k = epoll_wait(ep, events, 4096, 1000);
        for (int j = 0; j < k; j++) {
            if (events[j].data.u32 != UINT32_MAX) {
                conn_t *c = &conns[events[j].data.u32];
                if (!c->closed) readable(c, buf);
                continue;
            }
            char in[256];
            ssize_t n = read(0, in, sizeof in);
            if (n == 0) return 0;
            for (ssize_t q = 0; q < n; q++) {
                if (in[q] != '\n') { if (line_len < 255) line[line_len++] = in[q]; continue; }
                line[line_len] = 0;
                line_len = 0;
                if (!strcmp(line, "reset")) {
                    for (int i = 0; i < n_conns; i++) conns[i].count = 0;
                    n_samples = n_seen = 0;
                    max_seen = 0;
                    printf("{\"ok\": true}\n");
                    fflush(stdout);
                } else if (!strcmp(line, "report")) report(1);
                else if (!strcmp(line, "count")) report(0);
                else if (!strncmp(line, "pause ", 6)) {
                    /* stop reading every k-th connection (not the sampled ones): a slow reader */
                    int k = atoi(line + 6), paused = 0;
                    for (int i = 0; i < n_conns; i++) conns[i].paused = 0;  /* a new group */
                    for (int i = 0; k > 0 && i < n_conns; i++) {
                        conn_t *c = &conns[i];
                        if (i % k != k / 2 || c->closed || c->sampled) continue;
                        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                        c->paused = 1;
                        paused++;
                    }
                    printf("{\"paused\": %d}\n", paused);
                    fflush(stdout);
                } else if (!strcmp(line, "resume")) {
                    for (int i = 0; i < n_conns; i++) {
                        conn_t *c = &conns[i];
                        if (!c->paused || c->closed) continue;
                        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
                        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
                    }
                    printf("{\"ok\": true}\n");
                    fflush(stdout);
                }
                else if (!strcmp(line, "quit")) return 0;
            }
        }
    }
}
