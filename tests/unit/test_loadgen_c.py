"""The C load generator's counting: every marker counted and every sampled stamp read, however
the reads cut the stream (a miscount would show as loss, or hide it); past its sample limit,
the samples kept still cover the whole step."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

HARNESS = r"""
#define main loadgen_main
#include "%s"
#undef main
typedef void (*reader_t)(conn_t *, const char *, size_t, double);

/* A connection fed ``n`` bytes cut at random (into 1-4 bytes every 7th trial), read at t=1000. */
static conn_t feed(reader_t read, const char *data, size_t n, int trial, size_t most) {
    conn_t c;
    memset(&c, 0, sizeof c);
    c.sampled = trial %% 2;
    c.fd = -1;
    n_samples = 0;
    for (size_t i = 0; i < n;) {
        size_t step = 1 + (size_t)rand() %% (trial %% 7 == 0 ? 4 : most);
        if (i + step > n) step = n - i;
        read(&c, data + i, step, 1000.0);
        i += step;
    }
    return c;
}

int main(void) {
    samples = malloc(sizeof(double) * MAX_SAMPLES);
    static char buf[40000];
    size_t n = 0;
    /* SSE-like events whose padding has '{', '{"t' and '"t"' in it, and WebSocket-like frames */
    for (int k = 0; k < 100; k++)
        n += (size_t)sprintf(buf + n,
                             "id: x:%%d\ndata: {\"t\":%%d.5,\"p\":\"{{\\\"t{\\\"x\"}\n\n", k, k);
    for (int k = 100; k < 150; k++)
        n += (size_t)sprintf(buf + n,
                             "\x81\x7b{\"type\":\"event\",\"data\":{\"t\":%%d.5,\"p\":\"{\"}}", k);
    for (int k = 150; k < 200; k++)  /* a marker right after a '{' */
        n += (size_t)sprintf(buf + n, "data: {{\"t\":%%d.5}}\n\n", k);
    srand(1);
    for (int trial = 0; trial < 3000; trial++) {
        conn_t c = feed(app_bytes, buf, n, trial, 300);
        if (c.count != 200) { printf("trial %%d: counted %%ld\n", trial, c.count); return 1; }
        if (!c.sampled) continue;
        if (n_samples != 200) { printf("trial %%d: %%ld samples\n", trial, n_samples); return 1; }
        for (int j = 0; j < 200; j++)
            if (samples[j] != 1000.0 - (j + 0.5)) {
                printf("sample %%d: %%f\n", j, samples[j]);
                return 1;
            }
    }
    /* WebSocket frames: short and 126-extended lengths, cut anywhere; a close frame fails */
    transport = WS;
    static char frames[200000];
    size_t m = 0;
    for (int k = 0; k < 300; k++) {
        char body[400];
        char pad[300];
        memset(pad, 'x', sizeof pad);
        int len = sprintf(body, "{\"type\":\"event\",\"data\":{\"t\":%%d.5,\"p\":\"%%.*s\"}}",
                          k, (k * 37) %% 250, pad);
        frames[m++] = (char)0x81;
        if (len < 126) frames[m++] = (char)len;
        else {
            frames[m++] = 126;
            frames[m++] = (char)(len >> 8);
            frames[m++] = (char)(len & 0xff);
        }
        memcpy(frames + m, body, (size_t)len);
        m += (size_t)len;
    }
    for (int trial = 0; trial < 3000; trial++) {
        conn_t c = feed(ws_bytes, frames, m, trial, 3000);
        if (c.count != 300 || c.closed || (c.sampled && n_samples != 300)) {
            printf("ws trial %%d: counted %%ld, %%ld samples\n", trial, c.count, n_samples);
            return 1;
        }
        ws_bytes(&c, "\x88\x00", 2, 1000.0);
        if (!c.closed) { printf("a close frame was not noticed\n"); return 1; }
    }
    /* gRPC: DATA frames of Delivery messages (events' payloads hold the markers), cut anywhere;
       a HEADERS frame that ends the stream (the trailers) fails the connection */
    transport = GRPC;
    m = 0;
    for (int k = 0; k < 300; k++) {
        char payload[300];
        int len = sprintf(payload, "{\"t\":%%d.5,\"p\":\"%%.*s\"}", k, (k * 37) %% 200,
                          "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
                          "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
                          "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
        /* Delivery { events { seq: k, payload } }: 0x0a len { 0x08 k 0x22 len payload } */
        size_t event = 2 + 2 + (size_t)len + (len > 127);
        size_t message = 2 + event + (event > 127);
        m += h2_frame((unsigned char *)frames + m, 0, 0, 1, 5 + message);
        frames[m++] = 0; frames[m++] = 0; frames[m++] = 0;
        frames[m++] = (char)(message >> 8); frames[m++] = (char)message;
        frames[m++] = 0x0a;
        if (event > 127) {
            frames[m++] = (char)(0x80 | (event & 0x7f));
            frames[m++] = (char)(event >> 7);
        } else frames[m++] = (char)event;
        frames[m++] = 0x08; frames[m++] = (char)(k & 0x7f);
        frames[m++] = 0x22;
        if (len > 127) {
            frames[m++] = (char)(0x80 | (len & 0x7f));
            frames[m++] = (char)(len >> 7);
        } else frames[m++] = (char)len;
        memcpy(frames + m, payload, (size_t)len);
        m += (size_t)len;
    }
    for (int trial = 0; trial < 3000; trial++) {
        conn_t c = feed(grpc_bytes, frames, m, trial, 3000);
        if (c.count != 300 || c.closed || !c.ready || (c.sampled && n_samples != 300)) {
            printf("grpc trial %%d: counted %%ld, %%ld samples\n", trial, c.count, n_samples);
            return 1;
        }
        unsigned char trailers[9];
        h2_frame(trailers, 1, 0x5, 1, 0);
        grpc_bytes(&c, (const char *)trailers, 9, 1000.0);
        if (!c.closed) { printf("the end of the stream was not noticed\n"); return 1; }
    }
    /* Past MAX_SAMPLES, the kept samples stand for the whole run (reservoir), not its start:
       of 3 x MAX_SAMPLES samples valued by arrival, about 2/3 of those kept are from after the
       first MAX_SAMPLES; the max is over all of them */
    n_samples = n_seen = 0;
    max_seen = 0;
    for (long i = 0; i < 3L * MAX_SAMPLES; i++) keep_sample((double)i);
    long later = 0;
    for (long i = 0; i < n_samples; i++) later += samples[i] >= MAX_SAMPLES;
    if (n_samples != MAX_SAMPLES || n_seen != 3L * MAX_SAMPLES
        || later < 0.64 * MAX_SAMPLES || later > 0.69 * MAX_SAMPLES
        || max_seen != 3.0 * MAX_SAMPLES - 1) {
        printf("reservoir: %%ld kept, %%ld seen, %%ld later, max %%f\n", n_samples, n_seen, later,
               max_seen);
        return 1;
    }
    printf("ok\n");
    return 0;
}
"""


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")
def test_markers_and_stamps_are_counted_across_any_split_of_the_reads(tmp_path: Path) -> None:
    source = tmp_path / "harness.c"
    source.write_text(HARNESS % (ROOT / "bench" / "loadgen.c"))
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler is not None
    binary = tmp_path / "harness"
    built = subprocess.run([compiler, "-O2", "-o", str(binary), str(source)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    ran = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stdout
