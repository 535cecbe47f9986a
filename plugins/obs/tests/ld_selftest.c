/* Command-line driver of the C client core, used by tests/test_obs_plugin.py to check it
 * against the Python implementation and a real daemon:
 *
 *   ld_selftest encode                 hex of fixed messages, one "name hex" per line
 *   ld_selftest decode                 stdin: hex lines; stdout: one canonical dump each
 *   ld_selftest ring-write NAME SLOT SEQ W H TS   a BGRA test pattern into a ring
 *   ld_selftest ring-read NAME SLOT SEQ OUTFILE   a frame out of a ring
 *   ld_selftest ring-create NAME SLOTS CAPACITY SECONDS   (Windows) a named file mapping
 *        laid out as a daemon's ring (docs/protocol.md 6.2), held SECONDS: for the ring
 *        tests between processes under Wine, where no daemon creates Windows mappings
 *   ld_selftest fit SW SH MIN MAX MULTIPLE
 *   ld_selftest extra TEXT             ld_parse_extra_params
 *   ld_selftest engines                LD_PREFERRED_ENGINES
 *   ld_selftest schema                 stdin: hex of a schema array; stdout: one line per
 *        property description (ld_schema_props), fields separated by " | "
 *   ld_selftest presets                stdin: hex of a presets answer; stdout: the names
 *   ld_selftest recall ID STREAM PRESET TRANSITION   hex of the recall message
 *   ld_selftest bench ENDPOINT W H N   N passthrough round trips of a BGRA frame: one line
 *        "p50_ms X p99_ms Y fps Z"
 *   ld_selftest typing ENDPOINT OUTFILE   passthrough, mode typed letter by letter from
 *        "identity" to "invert" 50 ms apart; saves the last output; prints the status
 *   ld_selftest client ENDPOINT ENGINE W H N PARAMS THEN OUTPREFIX TIMEOUT
 *        streams the test pattern; after N outputs saves OUTPREFIX.1 (BGRA), applies THEN
 *        (extra-params text) and after N more saves OUTPREFIX.2; prints status lines.
 *        $LD_SELFTEST_TRANSPORT (shm, inline), $LD_SELFTEST_KEYS (a CURVE keys folder) and
 *        $LD_SELFTEST_FIXED (WxH) set the matching settings, for client and bench;
 *        $LD_SELFTEST_TRANSITION (seconds) too, and $LD_SELFTEST_RECALL (a preset name) is
 *        recalled after THEN is applied. At the end, "presets NAME,NAME," (the daemon's).
 */
#include "ld_client.h"
#include "ld_msgpack.h"
#include "ld_ring.h"
#include "ld_schema.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _WIN32
#include <windows.h>
static void sleep_ms(int ms)
{
	Sleep(ms);
}
#else
#include <unistd.h>
static void sleep_ms(int ms)
{
	usleep((useconds_t)ms * 1000);
}
#endif

static void print_hex(const char *name, const ld_mpw *w)
{
	printf("%s ", name);
	for (size_t i = 0; i < w->len; i++)
		printf("%02x", w->buf[i]);
	printf("\n");
}

static void header(ld_mpw *w, const char *type, int64_t id, uint32_t extra)
{
	ld_mpw_reset(w);
	ld_mpw_map(w, 2 + (id ? 1 : 0) + extra);
	ld_mpw_str(w, "v");
	ld_mpw_int(w, 1);
	ld_mpw_str(w, "type");
	ld_mpw_str(w, type);
	if (id) {
		ld_mpw_str(w, "id");
		ld_mpw_int(w, id);
	}
}

static int cmd_encode(void)
{
	ld_mpw w;
	ld_mpw_init(&w);
	header(&w, "hello", 1, 1);
	ld_mpw_str(&w, "client");
	ld_mpw_str(&w, "obs");
	print_hex("hello", &w);

	header(&w, "heartbeat", 0, 0);
	print_hex("heartbeat", &w);

	header(&w, "frame", 0, 4);
	ld_mpw_str(&w, "stream");
	ld_mpw_int(&w, 1);
	ld_mpw_str(&w, "seq");
	ld_mpw_int(&w, 7);
	ld_mpw_str(&w, "slot");
	ld_mpw_int(&w, 1);
	ld_mpw_str(&w, "ts");
	ld_mpw_int(&w, 123456789);
	print_hex("frame", &w);

	header(&w, "params", 3, 2);
	ld_mpw_str(&w, "stream");
	ld_mpw_int(&w, 300);
	ld_mpw_str(&w, "params");
	ld_mpw_map(&w, 5);
	ld_mpw_str(&w, "prompt");
	ld_mpw_str(&w, "a watercolour forest, \xc3\xa9t\xc3\xa9 \xe2\x80\x94 long enough to need str8");
	ld_mpw_str(&w, "seed");
	ld_mpw_int(&w, 4294967296LL);
	ld_mpw_str(&w, "strength");
	ld_mpw_double(&w, 0.35);
	ld_mpw_str(&w, "enabled");
	ld_mpw_bool(&w, 1);
	ld_mpw_str(&w, "offsets");
	ld_mpw_array(&w, 8);
	int64_t ints[8] = {-1, -32, -33, -128, -129, -32768, -32769, -2147483649LL};
	for (int i = 0; i < 8; i++)
		ld_mpw_int(&w, ints[i]);
	print_hex("params", &w);

	header(&w, "numbers", 0, 1);
	ld_mpw_str(&w, "u");
	ld_mpw_array(&w, 9);
	uint64_t us[9] = {0, 127, 128, 255, 256, 65535, 65536, 4294967295ULL, 18446744073709551615ULL};
	for (int i = 0; i < 9; i++)
		ld_mpw_uint(&w, us[i]);
	print_hex("numbers", &w);

	/* str16, array16 and map16 boundaries */
	char big[300];
	memset(big, 'x', sizeof(big) - 1);
	big[sizeof(big) - 1] = '\0';
	header(&w, "sizes", 0, 3);
	ld_mpw_str(&w, "s");
	ld_mpw_str(&w, big);
	ld_mpw_str(&w, "a");
	ld_mpw_array(&w, 16);
	for (int i = 0; i < 16; i++)
		ld_mpw_nil(&w);
	ld_mpw_str(&w, "m");
	ld_mpw_map(&w, 16);
	for (int i = 0; i < 16; i++) {
		char k[8];
		snprintf(k, sizeof(k), "k%02d", i);
		ld_mpw_str(&w, k);
		ld_mpw_int(&w, i);
	}
	print_hex("sizes", &w);
	ld_mpw_free(&w);
	return 0;
}

/* Canonical text of a value; tests/test_obs_plugin.py writes the same from Python objects. */
static void dump(const ld_mp_node *n)
{
	switch (n->type) {
	case LD_MP_NIL:
		printf("null");
		break;
	case LD_MP_BOOL:
		printf(n->v.b ? "true" : "false");
		break;
	case LD_MP_INT:
		printf("%lld", (long long)n->v.i);
		break;
	case LD_MP_UINT:
		printf("%llu", (unsigned long long)n->v.u);
		break;
	case LD_MP_FLOAT:
		printf("%.17g", n->v.f);
		break;
	case LD_MP_STR:
		putchar('"');
		for (uint32_t i = 0; i < n->len; i++) {
			unsigned char ch = (unsigned char)n->v.s[i];
			if (ch == '"' || ch == '\\')
				printf("\\%c", ch);
			else if (ch < 0x20)
				printf("\\u%04x", ch);
			else
				putchar(ch);
		}
		putchar('"');
		break;
	case LD_MP_BIN:
	case LD_MP_EXT:
		printf(n->type == LD_MP_BIN ? "bin:" : "ext:");
		for (uint32_t i = 0; i < n->len; i++)
			printf("%02x", (unsigned char)n->v.s[i]);
		break;
	case LD_MP_ARRAY:
		putchar('[');
		for (uint32_t i = 0; i < n->len; i++) {
			if (i)
				putchar(',');
			dump(&n->v.items[i]);
		}
		putchar(']');
		break;
	case LD_MP_MAP:
		putchar('{');
		for (uint32_t i = 0; i < n->len; i++) {
			if (i)
				putchar(',');
			dump(&n->v.items[2 * i]);
			putchar(':');
			dump(&n->v.items[2 * i + 1]);
		}
		putchar('}');
		break;
	}
}

static int cmd_decode(void)
{
	static char line[1 << 22];
	static uint8_t buf[1 << 21];
	while (fgets(line, sizeof(line), stdin)) {
		size_t len = strcspn(line, "\r\n"), n = 0;
		for (size_t i = 0; i + 1 < len; i += 2) {
			unsigned v;
			sscanf(line + i, "%2x", &v);
			buf[n++] = (uint8_t)v;
		}
		ld_mp_doc doc;
		if (ld_mp_parse(&doc, buf, n) != 0) {
			printf("ERROR\n");
			continue;
		}
		dump(doc.nodes);
		/* the re-encoding of what was read must decode to the same */
		ld_mpw w;
		ld_mpw_init(&w);
		ld_mp_write_node(&w, doc.nodes);
		ld_mp_doc again;
		printf(ld_mp_parse(&again, w.buf, w.len) == 0 ? "\n" : " REENCODE-FAILED\n");
		ld_mp_doc_free(&again);
		ld_mpw_free(&w);
		ld_mp_doc_free(&doc);
	}
	return 0;
}

/* The test pattern: B = x + y + seq, G = 3x, R = 5y (mod 256), A = 255. */
static void pattern(uint8_t *px, uint32_t w, uint32_t h, uint64_t seq)
{
	for (uint32_t y = 0; y < h; y++)
		for (uint32_t x = 0; x < w; x++) {
			uint8_t *p = px + ((size_t)y * w + x) * 4;
			p[0] = (uint8_t)(x + y + seq);
			p[1] = (uint8_t)(3 * x);
			p[2] = (uint8_t)(5 * y);
			p[3] = 255;
		}
}

static int cmd_ring_write(char **a)
{
	ld_ring r;
	char err[160];
	if (ld_ring_attach(&r, a[0], err, sizeof(err)) != 0) {
		fprintf(stderr, "%s\n", err);
		return 2;
	}
	uint32_t slot = (uint32_t)atoi(a[1]), w = (uint32_t)atoi(a[3]), h = (uint32_t)atoi(a[4]);
	uint64_t seq = strtoull(a[2], NULL, 10);
	uint8_t *px = (uint8_t *)malloc((size_t)w * h * 4);
	pattern(px, w, h, seq);
	ld_frame_spec spec = {w, h, w * 4, LD_FMT_BGRA, LD_DT_UINT8, LD_ORIGIN_TOP};
	int rc = ld_ring_write(&r, slot, seq, &spec, px, w * 4, strtoll(a[5], NULL, 10), 5, 0);
	printf("slots %u capacity %u write %d\n", r.slots, r.capacity, rc);
	free(px);
	ld_ring_detach(&r);
	return rc == 0 ? 0 : 1;
}

static int cmd_ring_read(char **a)
{
	ld_ring r;
	char err[160];
	if (ld_ring_attach(&r, a[0], err, sizeof(err)) != 0) {
		fprintf(stderr, "%s\n", err);
		return 2;
	}
	uint8_t *dst = (uint8_t *)malloc(r.capacity);
	ld_slot_info info;
	memset(&info, 0, sizeof(info));
	int rc = ld_ring_read(&r, (uint32_t)atoi(a[1]), strtoull(a[2], NULL, 10), &info, dst,
			      r.capacity, 0);
	if (rc == LD_RING_OK) {
		uint32_t row = info.spec.width * (uint32_t)ld_format_channels(info.spec.format) *
			       (uint32_t)ld_dtype_size(info.spec.dtype);
		FILE *f = fopen(a[3], "wb");
		fwrite(dst, 1, (size_t)row * info.spec.height, f);
		fclose(f);
	}
	const char *names[] = {"ok", "torn", "bad"};
	printf("%s %u %u %u %u %u %u %lld %llu\n", names[rc], info.spec.width, info.spec.height,
	       info.spec.stride, info.spec.format, info.spec.dtype, info.spec.origin,
	       (long long)info.ts, (unsigned long long)info.ref_seq);
	free(dst);
	ld_ring_detach(&r);
	return 0;
}

static void save(const char *prefix, const char *suffix, const uint8_t *px, uint32_t w, uint32_t h)
{
	char path[512];
	snprintf(path, sizeof(path), "%s%s", prefix, suffix);
	FILE *f = fopen(path, "wb");
	fwrite(px, 1, (size_t)w * h * 4, f);
	fclose(f);
	printf("saved %s %u %u\n", path, w, h);
}

/* Polls and streams the pattern for `ms` milliseconds. */
static void stream_for(ld_client *c, uint8_t *px, uint64_t *seq, int ms)
{
	int64_t end = ld_now_ns() + (int64_t)ms * 1000000;
	while (ld_now_ns() < end) {
		uint32_t w, h;
		ld_client_poll(c, 5);
		if (ld_client_input_size(c, &w, &h)) {
			pattern(px, w, h, ++*seq);
			ld_client_send_frame(c, px, w * 4, w, h);
		}
		sleep_ms(5);
	}
}

/* $LD_SELFTEST_TRANSPORT (shm, inline), $LD_SELFTEST_KEYS (a CURVE keys folder) and
 * $LD_SELFTEST_FIXED (WxH: a fixed processing size) */
static void env_settings(ld_settings *s)
{
	const char *transport = getenv("LD_SELFTEST_TRANSPORT"), *keys = getenv("LD_SELFTEST_KEYS");
	const char *fixed = getenv("LD_SELFTEST_FIXED"), *transition = getenv("LD_SELFTEST_TRANSITION");
	s->transition = transition ? atof(transition) : 0.0;
	snprintf(s->transport, sizeof(s->transport), "%s", transport ? transport : "");
	snprintf(s->keys_dir, sizeof(s->keys_dir), "%s", keys ? keys : "");
	if (fixed && sscanf(fixed, "%ux%u", &s->fixed_w, &s->fixed_h) != 2)
		s->fixed_w = s->fixed_h = 0;
}

static int cmd_client(char **a)
{
	ld_settings *s = (ld_settings *)calloc(1, sizeof(ld_settings));
	snprintf(s->endpoint, sizeof(s->endpoint), "%s", a[0]);
	snprintf(s->engine, sizeof(s->engine), "%s", a[1]);
	snprintf(s->name, sizeof(s->name), "selftest");
	env_settings(s);
	snprintf(s->client_name, sizeof(s->client_name), "ld_selftest");
	uint32_t sw = (uint32_t)atoi(a[2]), sh = (uint32_t)atoi(a[3]);
	int want = atoi(a[4]);
	s->nparams = ld_parse_extra_params(a[5], s->params, LD_MAX_PARAMS);
	double timeout = atof(a[8]);
	ld_client *c = ld_client_new();
	ld_client_configure(c, s);
	ld_client_set_source_size(c, sw, sh);
	uint8_t *px = (uint8_t *)malloc((size_t)8192 * 8192 * 4 / 16);
	int64_t start = ld_now_ns();
	int outs = 0, phase = 1;
	uint64_t seq = 0;
	char line[512], last[512] = "";
	while ((ld_now_ns() - start) / 1e9 < timeout) {
		int fresh = ld_client_poll(c, 5);
		ld_client_status_line(c, line, sizeof(line));
		if (strncmp(line, last, 12) != 0) {
			printf("status %s\n", line);
			fflush(stdout);
			snprintf(last, sizeof(last), "%s", line);
		}
		uint32_t w, h;
		if (ld_client_input_size(c, &w, &h)) {
			pattern(px, w, h, ++seq);
			ld_client_send_frame(c, px, w * 4, w, h);
		}
		if (fresh && ++outs >= want) {
			uint64_t oseq;
			const uint8_t *out = ld_client_output(c, &w, &h, &oseq);
			save(a[7], phase == 1 ? ".1" : ".2", out, w, h);
			if (phase == 2)
				break;
			phase = 2;
			s->nparams = ld_parse_extra_params(a[6], s->params, LD_MAX_PARAMS);
			ld_client_configure(c, s);
			if (getenv("LD_SELFTEST_RECALL")) {
				ld_client_poll(c, 5);
				printf("recall %d\n", ld_client_recall(c, getenv("LD_SELFTEST_RECALL")));
			}
			/* a change of text alone waits LD_TYPING_PAUSE before it is sent */
			stream_for(c, px, &seq, (int)(LD_TYPING_PAUSE * 1000) + 300);
			outs = 0;
		}
		sleep_ms(10);
	}
	ld_client_status_line(c, line, sizeof(line));
	printf("final %s\n", line);
	char names[2048];
	ld_client_presets(c, names, sizeof(names), NULL);
	for (char *nl = strchr(names, '\n'); nl; nl = strchr(nl, '\n'))
		*nl = ',';
	printf("presets %s\n", names);
	ld_client_free(c);
	free(px);
	free(s);
	return phase == 2 && outs >= want ? 0 : 1;
}

static int cmd_typing(char **a)
{
	ld_settings *s = (ld_settings *)calloc(1, sizeof(ld_settings));
	snprintf(s->endpoint, sizeof(s->endpoint), "%s", a[0]);
	snprintf(s->engine, sizeof(s->engine), "passthrough");
	snprintf(s->name, sizeof(s->name), "typing");
	s->nparams = ld_parse_extra_params("mode=identity", s->params, LD_MAX_PARAMS);
	ld_client *c = ld_client_new();
	uint8_t *px = (uint8_t *)malloc(32 * 24 * 4);
	uint64_t seq = 0;
	ld_client_configure(c, s);
	ld_client_set_source_size(c, 32, 24);
	stream_for(c, px, &seq, 1500);
	const char *typed[] = {"mode=i", "mode=in", "mode=inv", "mode=inve", "mode=inver",
			       "mode=invert"};
	for (int i = 0; i < 6; i++) {
		s->nparams = ld_parse_extra_params(typed[i], s->params, LD_MAX_PARAMS);
		ld_client_configure(c, s);
		stream_for(c, px, &seq, 50);
	}
	stream_for(c, px, &seq, 1500);
	char line[512];
	ld_client_status_line(c, line, sizeof(line));
	printf("final %s\n", line);
	uint32_t w, h;
	const uint8_t *out = ld_client_output(c, &w, &h, NULL);
	if (out)
		save(a[1], "", out, w, h);
	ld_client_free(c);
	free(px);
	free(s);
	return out ? 0 : 1;
}

/* Reads one hex line from stdin into buf; returns its byte count, or -1. */
static long read_hex(uint8_t *buf, size_t cap)
{
	static char line[1 << 20];
	if (!fgets(line, sizeof(line), stdin))
		return -1;
	size_t len = strcspn(line, "\r\n"), n = 0;
	for (size_t i = 0; i + 1 < len && n < cap; i += 2) {
		unsigned v;
		sscanf(line + i, "%2x", &v);
		buf[n++] = (uint8_t)v;
	}
	return (long)n;
}

static const char *const WIDGETS[] = {"extra", "float_slider", "float", "int_slider", "int",
				      "bool", "list", "text", "text_multiline"};

static int cmd_schema(void)
{
	static uint8_t buf[1 << 19];
	static ld_prop props[LD_PROP_MAX];
	long n = read_hex(buf, sizeof(buf));
	ld_mp_doc doc;
	if (n < 0 || ld_mp_parse(&doc, buf, (size_t)n) != 0) {
		printf("ERROR\n");
		return 1;
	}
	int count = ld_schema_props(doc.nodes, props, LD_PROP_MAX);
	for (int i = 0; i < count; i++) {
		const ld_prop *p = &props[i];
		printf("%s | %s | %s | %s | %.17g %.17g %.17g | ", p->key, p->kind,
		       WIDGETS[p->widget], p->label, p->lo, p->hi, p->step);
		if (p->widget == LD_W_FLOAT_SLIDER || p->widget == LD_W_FLOAT)
			printf("%.17g", p->def_f);
		else if (p->widget == LD_W_INT_SLIDER || p->widget == LD_W_INT || p->widget == LD_W_BOOL)
			printf("%lld", (long long)p->def_i);
		else
			printf("%s", p->def_s);
		printf(" | ");
		for (int j = 0; j < p->nchoices; j++)
			printf("%s%s", j ? "," : "", p->choices[j]);
		printf(" | %s | %s\n", p->aliases, p->tooltip);
	}
	ld_mp_doc_free(&doc);
	return 0;
}

static int cmd_presets(void)
{
	static uint8_t buf[1 << 19];
	char names[8192];
	long n = read_hex(buf, sizeof(buf));
	ld_mp_doc doc;
	if (n < 0 || ld_mp_parse(&doc, buf, (size_t)n) != 0) {
		printf("ERROR\n");
		return 1;
	}
	int count = ld_parse_presets(doc.nodes, names, sizeof(names));
	printf("count %d\n%s", count, names);
	ld_mp_doc_free(&doc);
	return 0;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static int cmd_bench(char **a)
{
	ld_settings *s = (ld_settings *)calloc(1, sizeof(ld_settings));
	snprintf(s->endpoint, sizeof(s->endpoint), "%s", a[0]);
	snprintf(s->engine, sizeof(s->engine), "passthrough");
	snprintf(s->name, sizeof(s->name), "c-bench");
	snprintf(s->client_name, sizeof(s->client_name), "ld_selftest");
	env_settings(s);
	uint32_t w = (uint32_t)atoi(a[1]), h = (uint32_t)atoi(a[2]);
	int n = atoi(a[3]), warmup = 20;
	ld_client *c = ld_client_new();
	ld_client_configure(c, s);
	ld_client_set_source_size(c, w, h);
	uint8_t *px = (uint8_t *)malloc((size_t)w * h * 4);
	pattern(px, w, h, 1);
	double *times = (double *)malloc(sizeof(double) * (size_t)n);
	uint32_t iw = 0, ih = 0;
	int64_t deadline = ld_now_ns() + 20000000000LL;
	while (!ld_client_input_size(c, &iw, &ih) && ld_now_ns() < deadline)
		ld_client_poll(c, 5);
	int rc = 1;
	if (iw == w && ih == h) {
		int64_t started = 0;
		int i;
		for (i = 0; i < warmup + n; i++) {
			if (i == warmup)
				started = ld_now_ns();
			int64_t t0 = ld_now_ns();
			if (ld_client_send_frame(c, px, w * 4, w, h) != 0)
				break;
			while (!ld_client_poll(c, 1) && ld_now_ns() - t0 < 5000000000LL)
				;
			if (ld_now_ns() - t0 >= 5000000000LL)
				break;
			if (i >= warmup)
				times[i - warmup] = (double)(ld_now_ns() - t0) / 1e6;
		}
		if (i == warmup + n) {
			double secs = (double)(ld_now_ns() - started) / 1e9;
			qsort(times, (size_t)n, sizeof(double), cmp_double);
			printf("p50_ms %.4f p99_ms %.4f fps %.1f\n", times[n / 2],
			       times[(int)(0.99 * (n - 1))], n / secs);
			rc = 0;
		}
	}
	ld_client_free(c);
	free(times);
	free(px);
	free(s);
	return rc;
}

#ifdef _WIN32
/* A Windows named mapping with a ring header: magic, version, slots, slot stride, capacity,
 * slot header size (the layout FrameRing.create writes), every slot empty. */
static int cmd_ring_create(char **a)
{
	wchar_t wname[64];
	uint32_t slots = (uint32_t)atoi(a[1]), capacity = (uint32_t)atoi(a[2]);
	int seconds = atoi(a[3]);
	uint32_t stride = 64 + ((capacity + 63) / 64) * 64 + 64;
	uint64_t size = 64 + (uint64_t)slots * stride;
	if (MultiByteToWideChar(CP_UTF8, 0, a[0], -1, wname, 64) == 0)
		return 1;
	HANDLE h = CreateFileMappingW(INVALID_HANDLE_VALUE, NULL, PAGE_READWRITE,
				      (DWORD)(size >> 32), (DWORD)size, wname);
	if (!h) {
		fprintf(stderr, "CreateFileMappingW failed (error %lu)\n", GetLastError());
		return 1;
	}
	uint8_t *p = MapViewOfFile(h, FILE_MAP_READ | FILE_MAP_WRITE, 0, 0, 0);
	if (!p)
		return 1;
	memset(p, 0, (size_t)size);
	uint32_t fields[5] = {1, slots, stride, capacity, 64};
	memcpy(p, "LDRING01", 8);
	memcpy(p + 8, fields, sizeof(fields)); /* little-endian, as the protocol says */
	printf("created %s %lu\n", a[0], (unsigned long)size);
	fflush(stdout);
	sleep_ms(seconds * 1000);
	UnmapViewOfFile(p);
	CloseHandle(h);
	return 0;
}
#endif

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: see the comment at the top of ld_selftest.c\n");
		return 2;
	}
	const char *cmd = argv[1];
	if (strcmp(cmd, "encode") == 0)
		return cmd_encode();
	if (strcmp(cmd, "decode") == 0)
		return cmd_decode();
	if (strcmp(cmd, "ring-write") == 0 && argc == 8)
		return cmd_ring_write(argv + 2);
	if (strcmp(cmd, "ring-read") == 0 && argc == 6)
		return cmd_ring_read(argv + 2);
#ifdef _WIN32
	if (strcmp(cmd, "ring-create") == 0 && argc == 6)
		return cmd_ring_create(argv + 2);
#endif
	if (strcmp(cmd, "fit") == 0 && argc == 7) {
		uint32_t w, h;
		ld_fit_size((uint32_t)atoi(argv[2]), (uint32_t)atoi(argv[3]), (uint32_t)atoi(argv[4]),
			    (uint32_t)atoi(argv[5]), (uint32_t)atoi(argv[6]), &w, &h);
		printf("%u %u\n", w, h);
		return 0;
	}
	if (strcmp(cmd, "extra") == 0 && argc == 3) {
		ld_param p[LD_MAX_PARAMS];
		int n = ld_parse_extra_params(argv[2], p, LD_MAX_PARAMS);
		for (int i = 0; i < n; i++) {
			if (p[i].type == LD_P_INT)
				printf("%s int %lld\n", p[i].keys, (long long)p[i].i);
			else if (p[i].type == LD_P_FLOAT)
				printf("%s float %.17g\n", p[i].keys, p[i].f);
			else if (p[i].type == LD_P_BOOL)
				printf("%s bool %s\n", p[i].keys, p[i].i ? "true" : "false");
			else
				printf("%s str %s\n", p[i].keys, p[i].s);
		}
		return 0;
	}
	if (strcmp(cmd, "engines") == 0) {
		for (int i = 0; LD_PREFERRED_ENGINES[i]; i++)
			printf("%s\n", LD_PREFERRED_ENGINES[i]);
		return 0;
	}
	if (strcmp(cmd, "schema") == 0)
		return cmd_schema();
	if (strcmp(cmd, "presets") == 0)
		return cmd_presets();
	if (strcmp(cmd, "recall") == 0 && argc == 6) {
		ld_mpw w;
		ld_mpw_init(&w);
		ld_encode_recall(&w, atoll(argv[2]), atoll(argv[3]), argv[4], atof(argv[5]));
		print_hex("recall", &w);
		ld_mpw_free(&w);
		return 0;
	}
	if (strcmp(cmd, "typing") == 0 && argc == 4)
		return cmd_typing(argv + 2);
	if (strcmp(cmd, "bench") == 0 && argc == 6)
		return cmd_bench(argv + 2);
	if (strcmp(cmd, "client") == 0 && argc == 11)
		return cmd_client(argv + 2);
	fprintf(stderr, "unknown command or wrong arguments: %s\n", cmd);
	return 2;
}
