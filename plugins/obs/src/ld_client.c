/* The livediffusion client core: see ld_client.h. Section numbers refer to docs/protocol.md. */
#include "ld_client.h"

#include "ld_msgpack.h"
#include "ld_ring.h"
#include "ld_schema.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#ifdef _WIN32
#define WIN32_LEAN_AND_MEAN
#include <windows.h>
#endif

#define MAX_CONTROL_BYTES (1u << 20)
#define STATS_INTERVAL 2.0
#define OPEN_RETRY 2.0

const char *const LD_PREFERRED_ENGINES[] = {"video",         "image",          "video-14b",
					    "image-sdxl-turbo", "image-sd15-lcm", "video-tiny",
					    "image-tiny",    "passthrough",    NULL};

enum { CONN_NONE, CONN_HELLO, CONN_READY };
enum { STREAM_NONE, STREAM_OPENING, STREAM_OPEN, STREAM_FAILED };

struct ld_client {
	void *ctx, *sock, *mon;
	int mon_count;
	int link_up; /* the monitor saw the connection up (section 5.3) */
	ld_settings cfg;
	int have_cfg;
	char token[33];
	int64_t next_id, hello_id, params_id, stats_id, close_id, presets_id;
	int conn;
	double last_heard, hello_sent, last_hb, last_stats, hb_interval, hb_timeout, busy_timeout;
	uint8_t *welcome_buf;
	ld_mp_doc welcome;
	const ld_mp_node *engines;
	unsigned welcome_gen;

	/* the daemon's presets: names, each followed by '\n' */
	char presets[8192];
	unsigned presets_gen;

	/* the stream */
	int sstate;
	int64_t open_id, stream_id;
	char engine[64];
	uint32_t src_w, src_h, in_w, in_h, in_stride, out_w, out_h;
	int inline_px;
	ld_ring rin, rout;
	uint64_t seq;
	double retry_at;
	double params_due; /* a typed text change waits for a pause (0 = nothing waits) */
	ld_mpw sent_params; /* the engine parameters last sent, encoded */

	/* the newest output notice and frame */
	int pending;
	uint32_t pend_slot;
	uint64_t pend_seq;
	int64_t pend_ts;
	uint8_t *pend_px;
	size_t pend_px_len, pend_px_cap;
	uint8_t *out;
	size_t out_cap;
	uint32_t ow, oh;
	uint64_t out_seq;

	/* status */
	double win_start;
	unsigned win_in, win_out;
	double fps_in, fps_out, latency_ms;
	uint64_t daemon_drops, local_drops;
	char error[256];
	int daemon_busy;
};

int64_t ld_now_ns(void)
{
#ifdef _WIN32
	static LARGE_INTEGER freq;
	LARGE_INTEGER t;
	if (!freq.QuadPart)
		QueryPerformanceFrequency(&freq);
	QueryPerformanceCounter(&t);
	return (int64_t)((double)t.QuadPart * 1e9 / (double)freq.QuadPart);
#else
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
#endif
}

static double now_s(void)
{
	return (double)ld_now_ns() / 1e9;
}

static void set_error(ld_client *c, const char *code, const char *message)
{
	snprintf(c->error, sizeof(c->error), "%s%s%s", code ? code : "", code && message ? ": " : "",
		 message ? message : "");
}

/* ---- sending ------------------------------------------------------------------------------ */

/* Sends w's bytes (a map whose first entries the caller wrote) as one part, or as part 1 of
 * two when px is given. 0 = sent, -1 = not sent. */
static int send_msg(ld_client *c, ld_mpw *w, const void *px, size_t px_len)
{
	if (!c->sock || w->failed)
		return -1;
	int flags = ZMQ_DONTWAIT | (px ? ZMQ_SNDMORE : 0);
	if (zmq_send(c->sock, w->buf, w->len, flags) < 0)
		return -1;
	if (px && zmq_send(c->sock, px, px_len, ZMQ_DONTWAIT) < 0)
		return -1;
	return 0;
}

/* Starts a message map of `extra` fields beyond v, type (and id when id > 0). */
static void begin(ld_mpw *w, const char *type, int64_t id, uint32_t extra)
{
	ld_mpw_reset(w);
	ld_mpw_map(w, 2 + (id > 0) + extra);
	ld_mpw_str(w, "v");
	ld_mpw_int(w, 1);
	ld_mpw_str(w, "type");
	ld_mpw_str(w, type);
	if (id > 0) {
		ld_mpw_str(w, "id");
		ld_mpw_int(w, id);
	}
}

static void send_simple(ld_client *c, const char *type, int64_t id)
{
	ld_mpw w;
	ld_mpw_init(&w);
	begin(&w, type, id, 0);
	send_msg(c, &w, NULL, 0);
	ld_mpw_free(&w);
}

static void send_hello(ld_client *c)
{
	ld_mpw w;
	ld_mpw_init(&w);
	c->hello_id = c->next_id++;
	begin(&w, "hello", c->hello_id, 2);
	ld_mpw_str(&w, "client");
	ld_mpw_str(&w, c->cfg.client_name[0] ? c->cfg.client_name : "c-client");
	ld_mpw_str(&w, "token");
	ld_mpw_str(&w, c->token);
	send_msg(c, &w, NULL, 0);
	ld_mpw_free(&w);
	c->hello_sent = now_s();
	c->conn = CONN_HELLO;
}

/* ---- engine capabilities -------------------------------------------------------------------- */

static const ld_mp_node *engine_caps(const ld_client *c, const char *engine)
{
	return ld_mp_get(c->engines, engine);
}

static void choose_engine(const ld_client *c, char *out, size_t len)
{
	if (strcmp(c->cfg.engine, "auto") != 0 && c->cfg.engine[0]) {
		snprintf(out, len, "%s", c->cfg.engine);
		return;
	}
	out[0] = '\0';
	for (int i = 0; LD_PREFERRED_ENGINES[i]; i++)
		if (engine_caps(c, LD_PREFERRED_ENGINES[i])) {
			snprintf(out, len, "%s", LD_PREFERRED_ENGINES[i]);
			return;
		}
	if (c->engines && c->engines->type == LD_MP_MAP && c->engines->len > 0)
		ld_mp_copy_str(&c->engines->v.items[0], out, len);
}

/* The schema entry of parameter `name` (or of which `name` is an alias, *alias then set). */
static const ld_mp_node *schema_entry(const ld_mp_node *caps, const char *name, int *alias)
{
	const ld_mp_node *schema = ld_mp_get(caps, "schema");
	if (alias)
		*alias = 0;
	if (!schema || schema->type != LD_MP_ARRAY)
		return NULL;
	for (uint32_t i = 0; i < schema->len; i++)
		if (ld_mp_is_str(ld_mp_get(&schema->v.items[i], "name"), name))
			return &schema->v.items[i];
	for (uint32_t i = 0; i < schema->len; i++) {
		const ld_mp_node *aliases = ld_mp_get(&schema->v.items[i], "aliases");
		for (uint32_t j = 0; aliases && aliases->type == LD_MP_ARRAY && j < aliases->len; j++)
			if (ld_mp_is_str(&aliases->v.items[j], name)) {
				if (alias)
					*alias = 1;
				return &schema->v.items[i];
			}
	}
	return NULL;
}

/* The first candidate of p->keys that the engine lists, copied into key (an alias of its
 * schema as the parameter's own name); 0 if none. */
static int engine_key(const ld_mp_node *caps, const ld_param *p, char *key, size_t len)
{
	const ld_mp_node *known = ld_mp_get(caps, "params");
	const char *k = p->keys;
	while (*k) {
		const char *bar = strchr(k, '|');
		size_t n = bar ? (size_t)(bar - k) : strlen(k);
		if (n && n < len) {
			int alias;
			memcpy(key, k, n);
			key[n] = '\0';
			if (ld_mp_get(known, key))
				return 1;
			const ld_mp_node *e = schema_entry(caps, key, &alias);
			if (e && alias && ld_mp_copy_str(ld_mp_get(e, "name"), key, len))
				return 1;
		}
		if (!bar)
			break;
		k = bar + 1;
	}
	return 0;
}

/* Encodes the engine parameters (a map) for the current engine into w. */
static void encode_params(const ld_client *c, ld_mpw *w)
{
	const ld_mp_node *caps = engine_caps(c, c->engine);
	char keys[LD_MAX_PARAMS][64];
	int idx[LD_MAX_PARAMS], n = 0;
	for (int i = 0; i < c->cfg.nparams && n < LD_MAX_PARAMS; i++) {
		if (!engine_key(caps, &c->cfg.params[i], keys[n], sizeof(keys[n])))
			continue;
		int dup = 0; /* a later parameter of the same key wins */
		for (int j = 0; j < n; j++)
			if (strcmp(keys[j], keys[n]) == 0) {
				idx[j] = i;
				dup = 1;
			}
		if (!dup)
			idx[n++] = i;
	}
	ld_mpw_map(w, (uint32_t)n);
	for (int j = 0; j < n; j++) {
		const ld_param *p = &c->cfg.params[idx[j]];
		ld_mpw_str(w, keys[j]);
		switch (p->type) {
		case LD_P_INT:
			ld_mpw_int(w, p->i);
			break;
		case LD_P_FLOAT:
			ld_mpw_double(w, p->f);
			break;
		case LD_P_BOOL:
			ld_mpw_bool(w, p->i != 0);
			break;
		default:
			ld_mpw_str(w, p->s);
		}
	}
}

void ld_fit_size(uint32_t sw, uint32_t sh, uint32_t min, uint32_t max, uint32_t multiple,
		 uint32_t *w, uint32_t *h)
{
	double fw = sw ? sw : 8, fh = sh ? sh : 8;
	double big = fw > fh ? fw : fh, small = fw < fh ? fw : fh;
	double scale = 1.0;
	if (max && big > max)
		scale = max / big;
	if (min && small * scale < min)
		scale = min / small;
	uint32_t m = multiple ? multiple : 1;
	uint32_t lo = min ? min : 8, hi = max ? max : 8192;
	if (lo < 8)
		lo = 8;
	if (hi > 8192)
		hi = 8192;
	double dims[2] = {fw * scale, fh * scale};
	uint32_t out[2];
	for (int i = 0; i < 2; i++) {
		uint32_t v = (uint32_t)floor(dims[i] / m + 0.5) * m;
		while (v < lo)
			v += m;
		while (v > hi && v > m)
			v -= m;
		out[i] = v;
	}
	*w = out[0];
	*h = out[1];
}

static void processing_size(const ld_client *c, uint32_t *w, uint32_t *h)
{
	const ld_mp_node *sizes = ld_mp_get(engine_caps(c, c->engine), "sizes");
	int64_t mn = 0, mx = 0, mult = 0;
	ld_mp_as_i64(ld_mp_get(sizes, "min"), &mn);
	ld_mp_as_i64(ld_mp_get(sizes, "max"), &mx);
	ld_mp_as_i64(ld_mp_get(sizes, "multiple"), &mult);
	uint32_t sw = c->cfg.fixed_w && c->cfg.fixed_h ? c->cfg.fixed_w : c->src_w;
	uint32_t sh = c->cfg.fixed_w && c->cfg.fixed_h ? c->cfg.fixed_h : c->src_h;
	ld_fit_size(sw, sh, (uint32_t)mn, (uint32_t)mx, (uint32_t)mult, w, h);
}

static int is_local(const char *endpoint)
{
	if (strncmp(endpoint, "ipc://", 6) == 0 || strncmp(endpoint, "inproc://", 9) == 0)
		return 1;
	const char *host = strstr(endpoint, "://");
	host = host ? host + 3 : endpoint;
	return strncmp(host, "127.", 4) == 0 || strncmp(host, "localhost", 9) == 0 ||
	       strncmp(host, "[::1]", 5) == 0;
}

/* ---- the stream ------------------------------------------------------------------------------ */

static void drop_stream(ld_client *c)
{
	ld_ring_detach(&c->rin);
	ld_ring_detach(&c->rout);
	c->sstate = STREAM_NONE;
	c->stream_id = 0;
	c->pending = 0;
}

static void close_stream(ld_client *c)
{
	if (c->sstate == STREAM_OPEN && c->conn == CONN_READY) {
		ld_mpw w;
		ld_mpw_init(&w);
		c->close_id = c->next_id++;
		begin(&w, "close", c->close_id, 1);
		ld_mpw_str(&w, "stream");
		ld_mpw_int(&w, c->stream_id);
		send_msg(c, &w, NULL, 0);
		ld_mpw_free(&w);
	}
	drop_stream(c);
}

/* The three spec fields of every frame this client sends and takes: BGRA u8, top row first
 * (what OBS stages and uploads). */
static void put_layout(ld_mpw *w)
{
	ld_mpw_str(w, "format");
	ld_mpw_str(w, "bgra");
	ld_mpw_str(w, "dtype");
	ld_mpw_str(w, "uint8");
	ld_mpw_str(w, "origin");
	ld_mpw_str(w, "top");
}

static void send_open(ld_client *c)
{
	choose_engine(c, c->engine, sizeof(c->engine));
	if (!c->engine[0]) {
		set_error(c, "no engine", "the daemon offers no engine");
		c->sstate = STREAM_FAILED;
		c->retry_at = now_s() + OPEN_RETRY;
		return;
	}
	processing_size(c, &c->in_w, &c->in_h);
	c->inline_px = strcmp(c->cfg.transport, "inline") == 0 ||
		       (strcmp(c->cfg.transport, "shm") != 0 && !is_local(c->cfg.endpoint));
	ld_mpw w;
	ld_mpw_init(&w);
	c->open_id = c->next_id++;
	begin(&w, "open", c->open_id, 11);
	ld_mpw_str(&w, "name");
	ld_mpw_str(&w, c->cfg.name);
	ld_mpw_str(&w, "width");
	ld_mpw_int(&w, c->in_w);
	ld_mpw_str(&w, "height");
	ld_mpw_int(&w, c->in_h);
	put_layout(&w);
	ld_mpw_str(&w, "fps");
	ld_mpw_double(&w, 30.0);
	ld_mpw_str(&w, "engine");
	ld_mpw_str(&w, c->engine);
	ld_mpw_str(&w, "params");
	ld_mpw_reset(&c->sent_params);
	encode_params(c, &c->sent_params);
	ld_mpw_raw(&w, c->sent_params.buf, c->sent_params.len);
	ld_mpw_str(&w, "output");
	ld_mpw_map(&w, 4);
	put_layout(&w);
	ld_mpw_str(&w, "stride");
	ld_mpw_int(&w, 0);
	ld_mpw_str(&w, "transport");
	ld_mpw_str(&w, c->inline_px ? "inline" : "shm");
	if (send_msg(c, &w, NULL, 0) == 0) {
		c->sstate = STREAM_OPENING;
	} else {
		c->sstate = STREAM_FAILED;
		c->retry_at = now_s() + 0.2;
	}
	ld_mpw_free(&w);
}

/* `"transition": {"seconds": T}` when T > 0 (one more field of the message). */
static void put_transition(ld_mpw *w, double seconds)
{
	if (!(seconds > 0))
		return;
	ld_mpw_str(w, "transition");
	ld_mpw_map(w, 1);
	ld_mpw_str(w, "seconds");
	ld_mpw_double(w, seconds);
}

void ld_encode_recall(ld_mpw *w, int64_t id, int64_t stream, const char *preset,
		      double transition)
{
	begin(w, "params", id, 2 + (transition > 0));
	ld_mpw_str(w, "stream");
	ld_mpw_int(w, stream);
	ld_mpw_str(w, "preset");
	ld_mpw_str(w, preset);
	put_transition(w, transition);
}

/* 1 when two parsed values encode to the same bytes. */
static int same_value(const ld_mp_node *a, const ld_mp_node *b)
{
	ld_mpw x, y;
	ld_mpw_init(&x);
	ld_mpw_init(&y);
	ld_mp_write_node(&x, a);
	ld_mp_write_node(&y, b);
	int same = !x.failed && !y.failed && x.len == y.len && memcmp(x.buf, y.buf, x.len) == 0;
	ld_mpw_free(&x);
	ld_mpw_free(&y);
	return same;
}

/* Into d: the entries of the new parameters `now` that differ from those last sent, and the
 * schema's default for each parameter sent before and no longer set. Returns how many. */
static uint32_t params_diff(const ld_client *c, const ld_mpw *now, ld_mpw *d)
{
	ld_mp_doc a, b;
	uint32_t n = 0;
	if (ld_mp_parse(&a, now->buf, now->len) != 0)
		return 0;
	if (ld_mp_parse(&b, c->sent_params.buf, c->sent_params.len) != 0)
		b.nodes = NULL;
	ld_mpw body;
	ld_mpw_init(&body);
	const ld_mp_node *na = a.nodes, *nb = b.nodes;
	for (uint32_t i = 0; i < na->len; i++) {
		const ld_mp_node *k = &na->v.items[2 * i], *v = &na->v.items[2 * i + 1];
		char key[64];
		ld_mp_copy_str(k, key, sizeof(key));
		const ld_mp_node *old = ld_mp_get(nb, key);
		if (old && same_value(old, v))
			continue;
		ld_mp_write_node(&body, k);
		ld_mp_write_node(&body, v);
		n++;
	}
	const ld_mp_node *caps = engine_caps(c, c->engine);
	for (uint32_t i = 0; nb && nb->type == LD_MP_MAP && i < nb->len; i++) {
		const ld_mp_node *k = &nb->v.items[2 * i];
		char key[64];
		ld_mp_copy_str(k, key, sizeof(key));
		const ld_mp_node *def = ld_mp_get(schema_entry(caps, key, NULL), "default");
		if (ld_mp_get(na, key) || !def)
			continue;
		ld_mp_write_node(&body, k);
		ld_mp_write_node(&body, def);
		n++;
	}
	ld_mpw_map(d, n);
	ld_mpw_raw(d, body.buf, body.len);
	ld_mpw_free(&body);
	ld_mp_doc_free(&a);
	if (b.nodes)
		ld_mp_doc_free(&b);
	return n;
}

static void send_params(ld_client *c)
{
	ld_mpw p, d;
	ld_mpw_init(&p);
	ld_mpw_init(&d);
	encode_params(c, &p);
	if ((p.len == c->sent_params.len && memcmp(p.buf, c->sent_params.buf, p.len) == 0) ||
	    params_diff(c, &p, &d) == 0) {
		ld_mpw_reset(&c->sent_params);
		ld_mpw_raw(&c->sent_params, p.buf, p.len);
		ld_mpw_free(&p);
		ld_mpw_free(&d);
		return;
	}
	ld_mpw w;
	ld_mpw_init(&w);
	c->params_id = c->next_id++;
	begin(&w, "params", c->params_id, 2 + (c->cfg.transition > 0));
	ld_mpw_str(&w, "stream");
	ld_mpw_int(&w, c->stream_id);
	ld_mpw_str(&w, "params");
	ld_mpw_raw(&w, d.buf, d.len);
	put_transition(&w, c->cfg.transition);
	if (send_msg(c, &w, NULL, 0) == 0) {
		ld_mpw_reset(&c->sent_params);
		ld_mpw_raw(&c->sent_params, p.buf, p.len);
	}
	ld_mpw_free(&w);
	ld_mpw_free(&p);
	ld_mpw_free(&d);
}

/* ---- connection ------------------------------------------------------------------------------ */

static void close_socket(ld_client *c)
{
	if (c->mon) {
		zmq_close(c->mon);
		c->mon = NULL;
	}
	if (c->sock) {
		zmq_socket_monitor(c->sock, NULL, 0);
		zmq_close(c->sock);
		c->sock = NULL;
	}
	c->link_up = 0;
}

static void forget_welcome(ld_client *c)
{
	ld_mp_doc_free(&c->welcome);
	free(c->welcome_buf);
	c->welcome_buf = NULL;
	c->engines = NULL;
}

/* The value of `name = "..."` in a ZPL certificate file (pyzmq's create_certificates). */
static int read_cert_key(const char *path, const char *name, char *out, size_t len)
{
	FILE *f = fopen(path, "r");
	char line[256];
	int found = 0;
	if (!f)
		return 0;
	while (!found && fgets(line, sizeof(line), f)) {
		char *k = strstr(line, name), *q1, *q2;
		if (k && (q1 = strchr(k, '"')) != NULL && (q2 = strchr(q1 + 1, '"')) != NULL &&
		    (size_t)(q2 - q1 - 1) < len) {
			memcpy(out, q1 + 1, (size_t)(q2 - q1 - 1));
			out[q2 - q1 - 1] = '\0';
			found = strlen(out) == 40; /* Z85 of 32 bytes */
		}
	}
	fclose(f);
	return found;
}

/* CURVE client keys from a `livediffusion keys init` folder: DIR/server.key (the daemon's
 * public key) and DIR/client/client.key_secret (this client's pair). 0 = set. */
static int set_curve_keys(ld_client *c)
{
	char path[600], server[48], pub[48], sec[48];
	snprintf(path, sizeof(path), "%s/server.key", c->cfg.keys_dir);
	if (!read_cert_key(path, "public-key", server, sizeof(server))) {
		set_error(c, "keys", "cannot read the daemon's public key (server.key) in the keys folder");
		return -1;
	}
	snprintf(path, sizeof(path), "%s/client/client.key_secret", c->cfg.keys_dir);
	if (!read_cert_key(path, "public-key", pub, sizeof(pub)) ||
	    !read_cert_key(path, "secret-key", sec, sizeof(sec))) {
		set_error(c, "keys", "cannot read client/client.key_secret in the keys folder");
		return -1;
	}
	if (zmq_setsockopt(c->sock, ZMQ_CURVE_SERVERKEY, server, 40) != 0 ||
	    zmq_setsockopt(c->sock, ZMQ_CURVE_PUBLICKEY, pub, 40) != 0 ||
	    zmq_setsockopt(c->sock, ZMQ_CURVE_SECRETKEY, sec, 40) != 0) {
		set_error(c, "keys", "this libzmq has no CURVE support");
		return -1;
	}
	return 0;
}

static void connect_daemon(ld_client *c)
{
	close_socket(c);
	c->conn = CONN_NONE;
	c->hello_sent = now_s(); /* also paces retries of an endpoint that fails to connect */
	if (!c->cfg.endpoint[0])
		return;
	c->sock = zmq_socket(c->ctx, ZMQ_DEALER);
	int linger = 0, hwm = 1000, ivl = 100, ivl_max = 1000;
	zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof(linger));
	zmq_setsockopt(c->sock, ZMQ_SNDHWM, &hwm, sizeof(hwm));
	zmq_setsockopt(c->sock, ZMQ_RCVHWM, &hwm, sizeof(hwm));
	zmq_setsockopt(c->sock, ZMQ_RECONNECT_IVL, &ivl, sizeof(ivl));
	zmq_setsockopt(c->sock, ZMQ_RECONNECT_IVL_MAX, &ivl_max, sizeof(ivl_max));
	char addr[64];
	snprintf(addr, sizeof(addr), "inproc://ld-monitor-%p-%d", (void *)c, c->mon_count++);
	if (zmq_socket_monitor(c->sock, addr, ZMQ_EVENT_CONNECTED | ZMQ_EVENT_DISCONNECTED) == 0) {
		c->mon = zmq_socket(c->ctx, ZMQ_PAIR);
		zmq_setsockopt(c->mon, ZMQ_LINGER, &linger, sizeof(linger));
		if (zmq_connect(c->mon, addr) != 0) {
			zmq_close(c->mon);
			c->mon = NULL;
		}
	}
	if (c->cfg.keys_dir[0] && set_curve_keys(c) != 0) {
		close_socket(c);
		return;
	}
	if (zmq_connect(c->sock, c->cfg.endpoint) != 0) {
		set_error(c, "bad endpoint", c->cfg.endpoint);
		close_socket(c);
		return;
	}
	c->last_heard = now_s();
	c->hb_timeout = 3.0;
	c->hb_interval = 1.0;
	send_hello(c);
}

static void lost(ld_client *c)
{
	drop_stream(c);
	forget_welcome(c);
	c->daemon_busy = 0;
	connect_daemon(c); /* new socket; hello with the same token; reopen after welcome */
}

/* ---- receiving ------------------------------------------------------------------------------ */

static void on_welcome(ld_client *c, const ld_mp_node *m, const uint8_t *buf, size_t len)
{
	int64_t re = 0, proto = 0;
	if (!ld_mp_as_i64(ld_mp_get(m, "re"), &re) || re != c->hello_id)
		return; /* the answer to an older hello */
	if (ld_mp_as_i64(ld_mp_get(m, "protocol"), &proto) && proto != 1) {
		char msg[64];
		snprintf(msg, sizeof(msg), "the daemon speaks protocol %lld, this plugin 1",
			 (long long)proto);
		set_error(c, "unsupported_version", msg);
	}
	ld_mp_as_double(ld_mp_get(m, "heartbeat_interval"), &c->hb_interval);
	ld_mp_as_double(ld_mp_get(m, "heartbeat_timeout"), &c->hb_timeout);
	/* keep the welcome (its capabilities) alive: the parsed doc points into it */
	forget_welcome(c);
	c->welcome_buf = (uint8_t *)malloc(len);
	if (!c->welcome_buf)
		return;
	memcpy(c->welcome_buf, buf, len);
	if (ld_mp_parse(&c->welcome, c->welcome_buf, len) != 0)
		return;
	c->engines = ld_mp_get(ld_mp_get(c->welcome.nodes, "capabilities"), "engines");
	c->conn = CONN_READY;
	c->welcome_gen++;
	c->last_hb = c->last_stats = now_s();
	c->sstate = STREAM_NONE; /* (re)opened by the next poll */
	ld_client_refresh_presets(c);
}

static void on_presets(ld_client *c, const ld_mp_node *m)
{
	char names[sizeof(c->presets)];
	if (ld_parse_presets(m, names, sizeof(names)) < 0)
		return;
	memcpy(c->presets, names, sizeof(names));
	c->presets_gen++;
}

/* Maps the ring an `opened` message names (its ring_in or ring_out map). 0 = attached. */
static int attach_ring(ld_client *c, ld_ring *r, const ld_mp_node *ring)
{
	char name[64], err[160];
	ld_mp_copy_str(ld_mp_get(ring, "name"), name, sizeof(name));
	if (ld_ring_attach(r, name, err, sizeof(err)) == 0)
		return 0;
	set_error(c, "shm", err);
	return -1;
}

static void on_opened(ld_client *c, const ld_mp_node *m)
{
	int64_t re = 0, sid = 0;
	if (c->sstate != STREAM_OPENING || !ld_mp_as_i64(ld_mp_get(m, "re"), &re) ||
	    re != c->open_id || !ld_mp_as_i64(ld_mp_get(m, "stream"), &sid))
		return;
	const ld_mp_node *in = ld_mp_get(m, "input"), *out = ld_mp_get(m, "output");
	int64_t v;
	c->in_stride = ld_mp_as_i64(ld_mp_get(in, "stride"), &v) ? (uint32_t)v : c->in_w * 4;
	c->out_w = ld_mp_as_i64(ld_mp_get(out, "width"), &v) ? (uint32_t)v : c->in_w;
	c->out_h = ld_mp_as_i64(ld_mp_get(out, "height"), &v) ? (uint32_t)v : c->in_h;
	c->stream_id = sid;
	c->seq = 0;
	c->inline_px = ld_mp_is_str(ld_mp_get(m, "transport"), "inline");
	c->sstate = STREAM_OPEN; /* the daemon holds it open from here on */
	if (!c->inline_px && (attach_ring(c, &c->rin, ld_mp_get(m, "ring_in")) != 0 ||
			      attach_ring(c, &c->rout, ld_mp_get(m, "ring_out")) != 0)) {
		close_stream(c); /* tells the daemon, which frees the name, and detaches */
		c->sstate = STREAM_FAILED;
		c->retry_at = now_s() + OPEN_RETRY;
		return;
	}
	c->error[0] = '\0';
}

static void on_frame(ld_client *c, const ld_mp_node *m, const uint8_t *px, size_t px_len)
{
	int64_t sid = 0, seq = 0, slot = 0, ts = 0;
	if (c->sstate != STREAM_OPEN || !ld_mp_as_i64(ld_mp_get(m, "stream"), &sid) ||
	    sid != c->stream_id || !ld_mp_as_i64(ld_mp_get(m, "seq"), &seq))
		return;
	ld_mp_as_i64(ld_mp_get(m, "slot"), &slot);
	ld_mp_as_i64(ld_mp_get(m, "ts"), &ts);
	if (c->pending)
		c->local_drops++; /* newest wins (section 6.5) */
	c->pending = 1;
	c->pend_seq = (uint64_t)seq;
	c->pend_slot = (uint32_t)slot;
	c->pend_ts = ts;
	c->pend_px_len = 0;
	if (px) {
		if (px_len > c->pend_px_cap) {
			uint8_t *p = (uint8_t *)realloc(c->pend_px, px_len);
			if (!p) {
				c->pending = 0;
				return;
			}
			c->pend_px = p;
			c->pend_px_cap = px_len;
		}
		memcpy(c->pend_px, px, px_len);
		c->pend_px_len = px_len;
	}
}

static void on_error(ld_client *c, const ld_mp_node *m)
{
	char code[48], message[200];
	int64_t re = -1, sid = 0;
	ld_mp_copy_str(ld_mp_get(m, "code"), code, sizeof(code));
	ld_mp_copy_str(ld_mp_get(m, "message"), message, sizeof(message));
	ld_mp_as_i64(ld_mp_get(m, "re"), &re);
	if (strcmp(code, "no_session") == 0) {
		lost(c);
		return;
	}
	if (c->sstate == STREAM_OPENING && re == c->open_id) {
		set_error(c, code, message);
		c->sstate = STREAM_FAILED;
		/* a name still held by our previous session frees itself within seconds */
		c->retry_at = now_s() + (strcmp(code, "stream_exists") == 0 ? 1.0 : OPEN_RETRY);
		return;
	}
	if (re == c->close_id)
		return; /* closing a stream the daemon already forgot */
	if (re == c->presets_id && strcmp(code, "unknown_type") == 0)
		return; /* a daemon from before presets: there are none */
	if (ld_mp_as_i64(ld_mp_get(m, "stream"), &sid) && sid != c->stream_id && re != c->params_id)
		return; /* about a stream of ours that is gone */
	set_error(c, code, message);
}

static void on_stats(ld_client *c, const ld_mp_node *m)
{
	char key[24];
	snprintf(key, sizeof(key), "%lld", (long long)c->stream_id);
	const ld_mp_node *s = ld_mp_get(ld_mp_get(m, "streams"), key);
	int64_t dropped = 0, torn = 0;
	if (!s)
		return;
	ld_mp_as_i64(ld_mp_get(s, "dropped"), &dropped);
	ld_mp_as_i64(ld_mp_get(s, "torn"), &torn);
	c->daemon_drops = (uint64_t)(dropped + torn);
}

static void handle(ld_client *c, const uint8_t *buf, size_t len, const uint8_t *px, size_t px_len)
{
	ld_mp_doc doc;
	if (len > MAX_CONTROL_BYTES || ld_mp_parse(&doc, buf, len) != 0)
		return; /* undecodable: ignored (section 10) */
	const ld_mp_node *m = doc.nodes;
	const ld_mp_node *type = ld_mp_get(m, "type");
	if (ld_mp_is_str(type, "welcome"))
		on_welcome(c, m, buf, len);
	else if (ld_mp_is_str(type, "opened"))
		on_opened(c, m);
	else if (ld_mp_is_str(type, "frame"))
		on_frame(c, m, px, px_len);
	else if (ld_mp_is_str(type, "error"))
		on_error(c, m);
	else if (ld_mp_is_str(type, "stats"))
		on_stats(c, m);
	else if (ld_mp_is_str(type, "presets"))
		on_presets(c, m);
	ld_mp_doc_free(&doc);
}

static void read_monitor(ld_client *c)
{
	for (;;) {
		zmq_msg_t ev, addr;
		zmq_msg_init(&ev);
		if (zmq_msg_recv(&ev, c->mon, ZMQ_DONTWAIT) < 0) {
			zmq_msg_close(&ev);
			return;
		}
		uint16_t event = 0;
		if (zmq_msg_size(&ev) >= 2)
			memcpy(&event, zmq_msg_data(&ev), 2);
		int more = zmq_msg_more(&ev);
		zmq_msg_close(&ev);
		if (more) {
			zmq_msg_init(&addr);
			zmq_msg_recv(&addr, c->mon, 0);
			zmq_msg_close(&addr);
		}
		if (event == ZMQ_EVENT_CONNECTED)
			c->link_up = 1;
		else if (event == ZMQ_EVENT_DISCONNECTED) {
			c->link_up = 0;
			if (c->conn == CONN_READY) {
				lost(c); /* the daemon went away: start over at once (section 5.3) */
				return;
			}
		}
	}
}

static void read_socket(ld_client *c)
{
	for (int n = 0; n < 10000 && c->sock; n++) {
		zmq_msg_t part1, part2;
		zmq_msg_init(&part1);
		if (zmq_msg_recv(&part1, c->sock, ZMQ_DONTWAIT) < 0) {
			zmq_msg_close(&part1);
			return;
		}
		c->last_heard = now_s();
		c->daemon_busy = 0;
		int two = 0;
		if (zmq_msg_more(&part1)) {
			zmq_msg_init(&part2);
			zmq_msg_recv(&part2, c->sock, 0);
			two = 1;
			while (zmq_msg_more(&part2)) { /* more than two parts: not ours to read */
				zmq_msg_t extra;
				zmq_msg_init(&extra);
				zmq_msg_recv(&extra, c->sock, 0);
				int more = zmq_msg_more(&extra);
				zmq_msg_close(&extra);
				if (!more)
					break;
			}
		}
		handle(c, (const uint8_t *)zmq_msg_data(&part1), zmq_msg_size(&part1),
		       two ? (const uint8_t *)zmq_msg_data(&part2) : NULL, two ? zmq_msg_size(&part2) : 0);
		zmq_msg_close(&part1);
		if (two)
			zmq_msg_close(&part2);
	}
}

/* Reads the newest announced output into c->out. 1 = a new frame. */
static int take_output(ld_client *c)
{
	if (!c->pending || c->sstate != STREAM_OPEN)
		return 0;
	c->pending = 0;
	size_t need = (size_t)c->out_w * c->out_h * 4;
	if (need > c->out_cap) {
		uint8_t *p = (uint8_t *)realloc(c->out, need);
		if (!p)
			return 0;
		c->out = p;
		c->out_cap = need;
	}
	int64_t ts = c->pend_ts;
	if (c->inline_px) {
		if (c->pend_px_len != need) {
			c->local_drops++;
			return 0;
		}
		memcpy(c->out, c->pend_px, need);
	} else {
		ld_slot_info info;
		int r = ld_ring_read(&c->rout, c->pend_slot, c->pend_seq, &info, c->out, c->out_cap,
				     c->out_w * 4);
		if (r != LD_RING_OK || info.spec.width != c->out_w || info.spec.height != c->out_h ||
		    info.spec.format != LD_FMT_BGRA || info.spec.dtype != LD_DT_UINT8 ||
		    info.spec.origin != LD_ORIGIN_TOP) {
			c->local_drops++;
			return 0;
		}
		ts = info.ts;
	}
	c->ow = c->out_w;
	c->oh = c->out_h;
	c->out_seq = c->pend_seq;
	if (ts > 0) {
		double ms = (double)(ld_now_ns() - ts) / 1e6;
		c->latency_ms = c->latency_ms > 0 ? 0.8 * c->latency_ms + 0.2 * ms : ms;
	}
	c->win_out++;
	return 1;
}

/* ---- public ------------------------------------------------------------------------------------ */

ld_client *ld_client_new(void)
{
	ld_client *c = (ld_client *)calloc(1, sizeof(ld_client));
	if (!c)
		return NULL;
	c->ctx = zmq_ctx_new();
	c->next_id = 1;
	c->busy_timeout = 120.0;
	ld_mpw_init(&c->sent_params);
	/* a random reconnect token (section 5.1; not a secret): clock, address and wall time
	 * stirred by xorshift, without touching the host process's rand() state */
	uint64_t x = (uint64_t)ld_now_ns() ^ (uint64_t)(uintptr_t)c ^ ((uint64_t)time(NULL) << 20);
	for (int i = 0; i < 32; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		c->token[i] = "0123456789abcdef"[(x >> 32) & 15];
	}
	c->win_start = now_s();
	return c;
}

void ld_client_free(ld_client *c)
{
	if (!c)
		return;
	close_stream(c);
	if (c->conn == CONN_READY)
		send_simple(c, "bye", 0);
	if (c->sock) {
		int linger = 100;
		zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof(linger));
	}
	close_socket(c);
	forget_welcome(c);
	zmq_ctx_term(c->ctx);
	ld_mpw_free(&c->sent_params);
	free(c->pend_px);
	free(c->out);
	free(c);
}

/* 1 when the two settings differ only in the text of string parameters (a prompt being
 * typed), so that the change can wait for a pause instead of going out per keystroke. */
static int only_text_changed(const ld_settings *a, const ld_settings *b)
{
	if (a->nparams != b->nparams)
		return 0;
	int text = 0;
	for (int i = 0; i < a->nparams; i++) {
		const ld_param *p = &a->params[i], *q = &b->params[i];
		if (p->type != q->type || strcmp(p->keys, q->keys) != 0)
			return 0;
		if (p->type == LD_P_STR)
			text |= strcmp(p->s, q->s) != 0;
		else if (p->i != q->i || p->f != q->f)
			return 0;
	}
	return text;
}

void ld_client_configure(ld_client *c, const ld_settings *s)
{
	int first = !c->have_cfg;
	int reconnect = first || strcmp(s->endpoint, c->cfg.endpoint) != 0 ||
			strcmp(s->keys_dir, c->cfg.keys_dir) != 0;
	int reopen = strcmp(s->name, c->cfg.name) != 0 || strcmp(s->engine, c->cfg.engine) != 0 ||
		     strcmp(s->transport, c->cfg.transport) != 0 ||
		     s->fixed_w != c->cfg.fixed_w || s->fixed_h != c->cfg.fixed_h;
	if (!reconnect && reopen)
		close_stream(c);
	int typing = !first && only_text_changed(&c->cfg, s);
	c->cfg = *s;
	c->have_cfg = 1;
	c->error[0] = '\0';
	if (reconnect) {
		drop_stream(c);
		forget_welcome(c);
		connect_daemon(c);
	} else if (c->sstate == STREAM_OPEN && typing) {
		c->params_due = now_s() + LD_TYPING_PAUSE;
	} else if (c->sstate == STREAM_OPEN) {
		send_params(c);
		c->params_due = 0;
	} else if (c->sstate == STREAM_FAILED) {
		c->retry_at = 0; /* new settings: try again now */
	}
}

void ld_client_set_source_size(ld_client *c, uint32_t w, uint32_t h)
{
	if (w == c->src_w && h == c->src_h)
		return;
	c->src_w = w;
	c->src_h = h;
	if (c->cfg.fixed_w && c->cfg.fixed_h)
		return;
	if (c->sstate == STREAM_OPEN || c->sstate == STREAM_OPENING || c->sstate == STREAM_FAILED)
		close_stream(c); /* reopened at the new size by the next poll */
}

int ld_client_poll(ld_client *c, int timeout_ms)
{
	if (!c->have_cfg)
		return 0;
	if (c->sock) {
		zmq_pollitem_t items[2] = {{c->sock, 0, ZMQ_POLLIN, 0}, {c->mon, 0, ZMQ_POLLIN, 0}};
		zmq_poll(items, c->mon ? 2 : 1, timeout_ms);
		if (c->mon)
			read_monitor(c);
		read_socket(c);
	}
	double t = now_s();
	if (t - c->win_start >= 1.0) {
		c->fps_in = c->win_in / (t - c->win_start);
		c->fps_out = c->win_out / (t - c->win_start);
		c->win_in = c->win_out = 0;
		c->win_start = t;
	}
	if (!c->sock) {
		if (c->cfg.endpoint[0] && t - c->hello_sent > 1.0)
			connect_daemon(c);
		return 0;
	}
	double silent = t - c->last_heard;
	if (c->conn == CONN_READY) {
		if (t - c->last_hb >= c->hb_interval) {
			c->last_hb = t;
			send_simple(c, "heartbeat", 0);
		}
		if (c->sstate == STREAM_OPEN && t - c->last_stats >= STATS_INTERVAL) {
			ld_mpw w;
			ld_mpw_init(&w);
			c->last_stats = t;
			c->stats_id = c->next_id++;
			begin(&w, "stats", c->stats_id, 1);
			ld_mpw_str(&w, "stream");
			ld_mpw_int(&w, c->stream_id);
			send_msg(c, &w, NULL, 0);
			ld_mpw_free(&w);
		}
		/* silence with the connection up is a long engine round, not a lost daemon */
		double limit = c->link_up || !c->mon ? c->busy_timeout : c->hb_timeout;
		c->daemon_busy = c->link_up && silent > c->hb_timeout;
		if (silent > limit) {
			lost(c);
			return 0;
		}
		if (c->params_due && t >= c->params_due) {
			c->params_due = 0;
			if (c->sstate == STREAM_OPEN)
				send_params(c);
		}
		if (c->src_w && c->src_h && c->cfg.name[0] &&
		    (c->sstate == STREAM_NONE || (c->sstate == STREAM_FAILED && t >= c->retry_at)))
			send_open(c);
	} else if (t - c->hello_sent > 1.0) {
		if (silent > c->hb_timeout && !c->link_up) {
			lost(c); /* new socket: a fresh connection attempt */
			return 0;
		}
		send_hello(c); /* hello again every second until welcome (section 5.1) */
	}
	return take_output(c);
}

int ld_client_input_size(const ld_client *c, uint32_t *w, uint32_t *h)
{
	if (c->sstate != STREAM_OPEN)
		return 0;
	*w = c->in_w;
	*h = c->in_h;
	return 1;
}

int ld_client_send_frame(ld_client *c, const uint8_t *bgra, uint32_t stride, uint32_t w,
			 uint32_t h)
{
	if (c->sstate != STREAM_OPEN || w != c->in_w || h != c->in_h || stride < w * 4) {
		c->local_drops++;
		return -1;
	}
	uint64_t seq = c->seq + 1;
	int64_t ts = ld_now_ns();
	uint32_t slot = 0;
	if (!c->inline_px) { /* pixels into the ring first; the notice names the slot */
		slot = (uint32_t)(seq % c->rin.slots);
		ld_frame_spec spec = {w, h, c->in_stride, LD_FMT_BGRA, LD_DT_UINT8, LD_ORIGIN_TOP};
		if (ld_ring_write(&c->rin, slot, seq, &spec, bgra, stride, ts, ts, 0) != 0) {
			c->local_drops++;
			return -1;
		}
	}
	ld_mpw m;
	ld_mpw_init(&m);
	begin(&m, "frame", 0, 4);
	ld_mpw_str(&m, "stream");
	ld_mpw_int(&m, c->stream_id);
	ld_mpw_str(&m, "seq");
	ld_mpw_uint(&m, seq);
	ld_mpw_str(&m, "ts");
	ld_mpw_int(&m, ts);
	/* inline: the pixels are part 2, rows `stride` apart (section 3.2.4) */
	ld_mpw_str(&m, c->inline_px ? "stride" : "slot");
	ld_mpw_int(&m, c->inline_px ? stride : slot);
	int rc = send_msg(c, &m, c->inline_px ? bgra : NULL, c->inline_px ? (size_t)stride * h : 0);
	ld_mpw_free(&m);
	if (rc != 0) {
		c->local_drops++;
		return -1;
	}
	c->seq = seq;
	c->win_in++;
	return 0;
}

const uint8_t *ld_client_output(const ld_client *c, uint32_t *w, uint32_t *h, uint64_t *seq)
{
	if (!c->out_seq)
		return NULL;
	if (w)
		*w = c->ow;
	if (h)
		*h = c->oh;
	if (seq)
		*seq = c->out_seq;
	return c->out;
}

void ld_client_status(const ld_client *c, ld_status *st)
{
	memset(st, 0, sizeof(*st));
	if (!c->have_cfg || !c->cfg.endpoint[0])
		st->state = "off";
	else if (c->conn != CONN_READY)
		st->state = c->link_up ? "connecting" : "no daemon";
	else if (c->daemon_busy)
		st->state = "daemon busy";
	else if (c->sstate == STREAM_OPEN)
		st->state = "streaming";
	else if (c->sstate == STREAM_FAILED)
		st->state = "error";
	else
		st->state = "opening";
	snprintf(st->engine, sizeof(st->engine), "%s", c->engine);
	if (c->sstate == STREAM_OPEN) {
		st->width = c->in_w;
		st->height = c->in_h;
	}
	st->fps_in = c->fps_in;
	st->fps_out = c->fps_out;
	st->latency_ms = c->latency_ms;
	st->drops = c->daemon_drops + c->local_drops;
	snprintf(st->error, sizeof(st->error), "%s", c->error);
}

void ld_client_engines(const ld_client *c, char *buf, size_t len)
{
	size_t used = 0;
	if (len)
		buf[0] = '\0';
	if (!c->engines || c->engines->type != LD_MP_MAP)
		return;
	for (uint32_t i = 0; i < c->engines->len; i++) {
		char name[64];
		ld_mp_copy_str(&c->engines->v.items[2 * i], name, sizeof(name));
		int n = snprintf(buf + used, len - used, "%s%s", used ? "," : "", name);
		if (n < 0 || (size_t)n >= len - used)
			break;
		used += (size_t)n;
	}
}

void ld_client_engine(const ld_client *c, char *buf, size_t len)
{
	if (c->sstate == STREAM_OPEN || c->sstate == STREAM_OPENING)
		snprintf(buf, len, "%s", c->engine);
	else if (c->engines)
		choose_engine(c, buf, len);
	else if (len)
		buf[0] = '\0';
}

unsigned ld_client_welcome_gen(const ld_client *c)
{
	return c->welcome_gen;
}

int ld_client_schema(const ld_client *c, const char *engine, ld_mpw *w)
{
	const ld_mp_node *schema = ld_mp_get(engine_caps(c, engine), "schema");
	ld_mpw_reset(w);
	if (!schema || schema->type != LD_MP_ARRAY)
		return -1;
	ld_mp_write_node(w, schema);
	return w->failed ? -1 : 0;
}

void ld_client_presets(const ld_client *c, char *buf, size_t len, unsigned *gen)
{
	snprintf(buf, len, "%s", c->presets);
	if (gen)
		*gen = c->presets_gen;
}

void ld_client_refresh_presets(ld_client *c)
{
	if (c->conn != CONN_READY)
		return; /* asked for after the next welcome anyway */
	ld_mpw w;
	ld_mpw_init(&w);
	c->presets_id = c->next_id++;
	begin(&w, "presets", c->presets_id, 1);
	ld_mpw_str(&w, "op");
	ld_mpw_str(&w, "list");
	send_msg(c, &w, NULL, 0);
	ld_mpw_free(&w);
}

int ld_client_recall(ld_client *c, const char *preset)
{
	if (c->sstate != STREAM_OPEN || c->conn != CONN_READY) {
		set_error(c, "preset", "no open stream to recall it into");
		return -1;
	}
	ld_mpw w;
	ld_mpw_init(&w);
	c->params_id = c->next_id++;
	ld_encode_recall(&w, c->params_id, c->stream_id, preset, c->cfg.transition);
	int rc = send_msg(c, &w, NULL, 0);
	ld_mpw_free(&w);
	if (rc == 0)
		c->error[0] = '\0';
	return rc;
}

void ld_client_status_line(const ld_client *c, char *buf, size_t len)
{
	ld_status st;
	ld_client_status(c, &st);
	int n;
	if (strcmp(st.state, "streaming") == 0)
		n = snprintf(buf, len, "streaming %s %ux%u | in %.1f fps | out %.1f fps | %.0f ms | drops %llu",
			     st.engine, st.width, st.height, st.fps_in, st.fps_out, st.latency_ms,
			     (unsigned long long)st.drops);
	else if (strcmp(st.state, "no daemon") == 0)
		n = snprintf(buf, len, "no daemon at %s (showing the source)", c->cfg.endpoint);
	else
		n = snprintf(buf, len, "%s", st.state);
	if (st.error[0] && n >= 0 && (size_t)n < len)
		snprintf(buf + n, len - (size_t)n, " | %s", st.error);
}

/* ---- extra parameters ------------------------------------------------------------------------ */

static char *trim(char *s)
{
	while (isspace((unsigned char)*s))
		s++;
	char *e = s + strlen(s);
	while (e > s && isspace((unsigned char)e[-1]))
		*--e = '\0';
	return s;
}

int ld_parse_extra_params(const char *text, ld_param *out, int room)
{
	int n = 0;
	char *copy = (char *)malloc(strlen(text) + 1);
	if (!copy)
		return 0;
	strcpy(copy, text);
	char *item = copy;
	while (item && n < room) {
		char *next = item + strcspn(item, ";\n");
		char *sep = *next ? next : NULL;
		if (sep)
			*sep = '\0';
		char *eq = strchr(item, '=');
		if (eq) {
			*eq = '\0';
			char *key = trim(item), *val = trim(eq + 1);
			if (*key && strlen(key) < sizeof(out[n].keys)) {
				ld_param *p = &out[n++];
				memset(p, 0, sizeof(*p));
				snprintf(p->keys, sizeof(p->keys), "%s", key);
				char *end;
				long long iv = strtoll(val, &end, 10);
				if (*val && !*end) {
					p->type = LD_P_INT;
					p->i = iv;
				} else {
					double fv = strtod(val, &end);
					if (*val && !*end) {
						p->type = LD_P_FLOAT;
						p->f = fv;
					} else if (strcmp(val, "true") == 0 || strcmp(val, "false") == 0) {
						p->type = LD_P_BOOL;
						p->i = val[0] == 't';
					} else {
						p->type = LD_P_STR;
						snprintf(p->s, sizeof(p->s), "%s", val);
					}
				}
			}
		}
		item = sep ? sep + 1 : NULL;
	}
	free(copy);
	return n;
}
