/* The livediffusion client core in C: one connection to a daemon and one stream of BGRA
 * frames, written from docs/protocol.md alone. It knows nothing about OBS, so it is tested
 * on its own against a real daemon (tests/ld_selftest.c).
 *
 * Threading: one thread owns an ld_client and calls every function; ld_client_poll never
 * blocks longer than the timeout it is given. */
#ifndef LD_CLIENT_H
#define LD_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include "ld_msgpack.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LD_MAX_PARAMS 48
#define LD_PARAM_STR_MAX 2048
/* seconds a change of text parameters only (a prompt being typed) waits for more changes
 * before it is sent: a new prompt costs the engine a text encoding */
#define LD_TYPING_PAUSE 0.5

enum { LD_P_STR, LD_P_INT, LD_P_FLOAT, LD_P_BOOL };

/* One user-facing parameter. `keys` lists candidate engine parameter names separated by '|'
 * ("strength|noise_scale"): the first one the engine lists in its capabilities (a name, or an
 * alias in its schema, which is sent under the parameter's name) is sent; a parameter no
 * candidate of which the engine knows is left out. */
typedef struct ld_param {
	char keys[64];
	int type;
	char s[LD_PARAM_STR_MAX];
	int64_t i;
	double f;
} ld_param;

typedef struct ld_settings {
	char endpoint[256];   /* "tcp://127.0.0.1:5570" */
	char client_name[32]; /* for the daemon's log */
	char name[160];       /* stream name, unique in the daemon */
	char engine[64];      /* an engine name, or "auto" */
	char transport[8];    /* "shm", "inline", or "" = shm on this machine, inline beyond */
	char keys_dir[512];   /* "" or a `livediffusion keys init` folder: CURVE (protocol 9) */
	uint32_t fixed_w, fixed_h; /* processing size; 0 x 0 = the source's size */
	double transition;    /* > 0: params and recalls ask for a transition of this many seconds */
	int nparams;
	ld_param params[LD_MAX_PARAMS];
} ld_settings;

typedef struct ld_status {
	const char *state; /* "connecting", "no daemon", "daemon busy", "opening", "streaming",
			      "error", "off" */
	char engine[64];
	uint32_t width, height; /* processing size of the open stream */
	double fps_in, fps_out, latency_ms;
	uint64_t drops; /* daemon's dropped + torn, plus outputs this client skipped or lost */
	char error[256];
} ld_status;

typedef struct ld_client ld_client;

ld_client *ld_client_new(void);
/* Closes the stream politely (close, bye) and frees everything. */
void ld_client_free(ld_client *c);

/* Applies settings: a new endpoint reconnects, a new name / engine / size reopens the stream,
 * new parameters are sent as a `params` message (a change of text alone after
 * LD_TYPING_PAUSE seconds without another change). `open` carries every parameter; a `params`
 * message only those whose value changed, and the engine's default (from its schema) for a
 * parameter that is no longer set. */
void ld_client_configure(ld_client *c, const ld_settings *s);
/* The size of the picture the frames come from; 0 x 0 = none (no stream is opened). */
void ld_client_set_source_size(ld_client *c, uint32_t w, uint32_t h);

/* Reads everything the daemon sent, sends heartbeats, reconnects, (re)opens the stream.
 * Waits at most timeout_ms for something to arrive. Returns 1 when a new output frame is
 * ready (ld_client_output), else 0. */
int ld_client_poll(ld_client *c, int timeout_ms);

/* 1 and the stream's input size when a stream is open and takes frames. */
int ld_client_input_size(const ld_client *c, uint32_t *w, uint32_t *h);

/* Sends one BGRA (uint8, top row first) frame of the stream's input size. 0 = sent,
 * -1 = dropped (no open stream, wrong size, or the socket would block). */
int ld_client_send_frame(ld_client *c, const uint8_t *bgra, uint32_t stride, uint32_t w,
			 uint32_t h);

/* The newest output (BGRA, uint8, top row first, tightly packed), or NULL before the first. */
const uint8_t *ld_client_output(const ld_client *c, uint32_t *w, uint32_t *h, uint64_t *seq);

void ld_client_status(const ld_client *c, ld_status *st);
/* The daemon's engines, comma-separated ("" before the first welcome). */
void ld_client_engines(const ld_client *c, char *buf, size_t len);
/* The engine the stream uses (or would use now: "auto" resolved), "" before the first welcome. */
void ld_client_engine(const ld_client *c, char *buf, size_t len);
/* Bumped on every welcome: the engines and their schemas may have changed. */
unsigned ld_client_welcome_gen(const ld_client *c);
/* Encodes the schema array of an engine of the daemon into w (reset first); 0 = done,
 * -1 = the daemon has no such engine or it has no schema. */
int ld_client_schema(const ld_client *c, const char *engine, ld_mpw *w);

/* The daemon's presets, each name followed by '\n' ("" before the first answer); *gen is
 * bumped on every answer. The list is asked for after each welcome and by
 * ld_client_refresh_presets. */
void ld_client_presets(const ld_client *c, char *buf, size_t len, unsigned *gen);
void ld_client_refresh_presets(ld_client *c);
/* Recalls a daemon preset into the open stream (`params` with `preset`, and `transition` when
 * the settings ask for one). 0 = sent; -1 = no open stream (the error says so). A refusal
 * comes back as the status's error. */
int ld_client_recall(ld_client *c, const char *preset);
/* The recall message's bytes (what ld_client_recall sends). */
void ld_encode_recall(ld_mpw *w, int64_t id, int64_t stream, const char *preset,
		      double transition);

/* "streaming video-tiny 512x288 | in 30.0 fps | out 29.8 fps | 95 ms | drops 3" */
void ld_client_status_line(const ld_client *c, char *buf, size_t len);

/* The engine "auto" picks: the first of these the daemon offers (the same order as the
 * Python client's PREFERRED_ENGINES), else the daemon's first engine. */
extern const char *const LD_PREFERRED_ENGINES[];

/* Processing size for a source of sw x sh: the fixed size if given, else the source's size,
 * scaled to fit the engine's size limits (min, max, multiple; 0 = none) with the aspect kept,
 * and rounded to the multiple. */
void ld_fit_size(uint32_t sw, uint32_t sh, uint32_t min, uint32_t max, uint32_t multiple,
		 uint32_t *w, uint32_t *h);

/* Parses "key=value; key=value" (also newlines) into params of their own key. Values that look
 * like integers, numbers or true/false get those types; others are strings. Returns how many
 * were added (at most room). */
int ld_parse_extra_params(const char *text, ld_param *out, int room);

/* Monotonic clock in nanoseconds (the `ts` written into frames). */
int64_t ld_now_ns(void);

#ifdef __cplusplus
}
#endif
#endif
