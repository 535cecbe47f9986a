/* A small msgpack writer and reader: exactly what the livediffusion protocol needs
 * (docs/protocol.md section 2.2). No dependencies beyond the C standard library. */
#ifndef LD_MSGPACK_H
#define LD_MSGPACK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- writer ------------------------------------------------------------------------------ */

typedef struct ld_mpw {
	uint8_t *buf;
	size_t len;
	size_t cap;
	int failed; /* an allocation failed: the buffer is incomplete */
} ld_mpw;

void ld_mpw_init(ld_mpw *w);
void ld_mpw_free(ld_mpw *w);
void ld_mpw_reset(ld_mpw *w);
void ld_mpw_map(ld_mpw *w, uint32_t entries);
void ld_mpw_array(ld_mpw *w, uint32_t items);
void ld_mpw_str(ld_mpw *w, const char *s);
void ld_mpw_strn(ld_mpw *w, const char *s, size_t n);
void ld_mpw_int(ld_mpw *w, int64_t v); /* smallest format, as msgpack-python packs */
void ld_mpw_uint(ld_mpw *w, uint64_t v);
void ld_mpw_double(ld_mpw *w, double v); /* float 64 */
void ld_mpw_bool(ld_mpw *w, int v);
void ld_mpw_nil(ld_mpw *w);
void ld_mpw_raw(ld_mpw *w, const void *p, size_t n); /* already-encoded bytes */

/* ---- reader ------------------------------------------------------------------------------ */

typedef enum ld_mp_type {
	LD_MP_NIL,
	LD_MP_BOOL,
	LD_MP_INT, /* negative integers, held in v.i */
	LD_MP_UINT, /* non-negative integers, held in v.u */
	LD_MP_FLOAT,
	LD_MP_STR,
	LD_MP_BIN,
	LD_MP_ARRAY,
	LD_MP_MAP,
	LD_MP_EXT
} ld_mp_type;

typedef struct ld_mp_node {
	ld_mp_type type;
	uint32_t len; /* bytes of str/bin/ext, items of an array, pairs of a map */
	union {
		int b;
		int64_t i;
		uint64_t u;
		double f;
		const char *s;                /* str/bin/ext: points into the parsed buffer */
		struct ld_mp_node *items; /* array: len nodes; map: 2*len nodes, key then value */
	} v;
} ld_mp_node;

/* A parsed document. It points into the buffer it was parsed from: keep that alive. */
typedef struct ld_mp_doc {
	ld_mp_node *nodes; /* nodes[0] is the root */
	size_t count;
} ld_mp_doc;

/* Parses exactly one value that fills buf[0..len). Returns 0, or -1 when the bytes are not
 * one well-formed msgpack value (or nest deeper than 64, or memory ran out). */
int ld_mp_parse(ld_mp_doc *doc, const uint8_t *buf, size_t len);
void ld_mp_doc_free(ld_mp_doc *doc);

/* Lookups; every function accepts NULL and then answers "absent". */
const ld_mp_node *ld_mp_get(const ld_mp_node *map, const char *key);
int ld_mp_is_str(const ld_mp_node *n, const char *s);
/* 1 and *out set when n is an int (either sign) that fits, else 0. Booleans are not ints. */
int ld_mp_as_i64(const ld_mp_node *n, int64_t *out);
/* 1 and *out set when n is an int or a float. */
int ld_mp_as_double(const ld_mp_node *n, double *out);
/* Copies a str into dst (always NUL-terminated, cut to dstlen-1 bytes); 1 if n was a str. */
int ld_mp_copy_str(const ld_mp_node *n, char *dst, size_t dstlen);
/* Re-encodes a parsed value into w (used to forward maps such as capabilities). */
void ld_mp_write_node(ld_mpw *w, const ld_mp_node *n);

#ifdef __cplusplus
}
#endif
#endif
