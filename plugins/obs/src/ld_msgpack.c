/* msgpack subset used by the livediffusion protocol; see ld_msgpack.h. */
#include "ld_msgpack.h"

#include <stdlib.h>
#include <string.h>

#define LD_MP_MAX_DEPTH 64

/* ---- writer ------------------------------------------------------------------------------ */

void ld_mpw_init(ld_mpw *w)
{
	memset(w, 0, sizeof(*w));
}

void ld_mpw_free(ld_mpw *w)
{
	free(w->buf);
	memset(w, 0, sizeof(*w));
}

void ld_mpw_reset(ld_mpw *w)
{
	w->len = 0;
	w->failed = 0;
}

static int reserve(ld_mpw *w, size_t extra)
{
	if (w->failed)
		return 0;
	if (w->len + extra <= w->cap)
		return 1;
	size_t cap = w->cap ? w->cap : 256;
	while (cap < w->len + extra)
		cap *= 2;
	uint8_t *p = (uint8_t *)realloc(w->buf, cap);
	if (!p) {
		w->failed = 1;
		return 0;
	}
	w->buf = p;
	w->cap = cap;
	return 1;
}

void ld_mpw_raw(ld_mpw *w, const void *p, size_t n)
{
	if (!reserve(w, n))
		return;
	memcpy(w->buf + w->len, p, n);
	w->len += n;
}

static void put_be(ld_mpw *w, uint8_t tag, uint64_t v, int bytes)
{
	uint8_t b[9];
	b[0] = tag;
	for (int i = 0; i < bytes; i++)
		b[1 + i] = (uint8_t)(v >> (8 * (bytes - 1 - i)));
	ld_mpw_raw(w, b, (size_t)bytes + 1);
}

static void put_byte(ld_mpw *w, uint8_t b)
{
	ld_mpw_raw(w, &b, 1);
}

/* fixmap/fixarray below 16 entries, then the 16-bit and (tag16 + 1) 32-bit forms */
static void put_container(ld_mpw *w, uint8_t fix, uint8_t tag16, uint32_t n)
{
	if (n < 16)
		put_byte(w, (uint8_t)(fix | n));
	else if (n <= 0xffff)
		put_be(w, tag16, n, 2);
	else
		put_be(w, (uint8_t)(tag16 + 1), n, 4);
}

void ld_mpw_map(ld_mpw *w, uint32_t n)
{
	put_container(w, 0x80, 0xde, n);
}

void ld_mpw_array(ld_mpw *w, uint32_t n)
{
	put_container(w, 0x90, 0xdc, n);
}

void ld_mpw_strn(ld_mpw *w, const char *s, size_t n)
{
	if (n < 32)
		put_byte(w, (uint8_t)(0xa0 | n));
	else if (n <= 0xff)
		put_be(w, 0xd9, n, 1);
	else if (n <= 0xffff)
		put_be(w, 0xda, n, 2);
	else
		put_be(w, 0xdb, (uint64_t)n, 4);
	ld_mpw_raw(w, s, n);
}

void ld_mpw_str(ld_mpw *w, const char *s)
{
	ld_mpw_strn(w, s ? s : "", s ? strlen(s) : 0);
}

void ld_mpw_uint(ld_mpw *w, uint64_t v)
{
	if (v < 128)
		put_byte(w, (uint8_t)v);
	else if (v <= 0xff)
		put_be(w, 0xcc, v, 1);
	else if (v <= 0xffff)
		put_be(w, 0xcd, v, 2);
	else if (v <= 0xffffffffu)
		put_be(w, 0xce, v, 4);
	else
		put_be(w, 0xcf, v, 8);
}

void ld_mpw_int(ld_mpw *w, int64_t v)
{
	if (v >= 0) {
		ld_mpw_uint(w, (uint64_t)v);
		return;
	}
	if (v >= -32)
		put_byte(w, (uint8_t)(int8_t)v);
	else if (v >= INT8_MIN)
		put_be(w, 0xd0, (uint64_t)v & 0xff, 1);
	else if (v >= INT16_MIN)
		put_be(w, 0xd1, (uint64_t)v & 0xffff, 2);
	else if (v >= INT32_MIN)
		put_be(w, 0xd2, (uint64_t)v & 0xffffffffu, 4);
	else
		put_be(w, 0xd3, (uint64_t)v, 8);
}

void ld_mpw_double(ld_mpw *w, double v)
{
	uint64_t bits;
	memcpy(&bits, &v, 8);
	put_be(w, 0xcb, bits, 8);
}

void ld_mpw_bool(ld_mpw *w, int v)
{
	put_byte(w, v ? 0xc3 : 0xc2);
}

void ld_mpw_nil(ld_mpw *w)
{
	put_byte(w, 0xc0);
}

/* ---- reader ------------------------------------------------------------------------------ */

typedef struct cursor {
	const uint8_t *p;
	size_t len;
	size_t pos;
} cursor;

static int take(cursor *c, size_t n, const uint8_t **out)
{
	if (c->len - c->pos < n)
		return 0;
	*out = c->p + c->pos;
	c->pos += n;
	return 1;
}

static int take_be(cursor *c, int bytes, uint64_t *v)
{
	const uint8_t *b;
	if (!take(c, (size_t)bytes, &b))
		return 0;
	uint64_t x = 0;
	for (int i = 0; i < bytes; i++)
		x = (x << 8) | b[i];
	*v = x;
	return 1;
}

/* Reads one value's head. For containers, *children is the number of child values that
 * follow (items, or 2 * pairs). Fills n when it is not NULL. */
static int read_head(cursor *c, ld_mp_node *n, uint64_t *children)
{
	const uint8_t *t;
	uint64_t x = 0;
	ld_mp_node tmp;
	if (!n)
		n = &tmp;
	memset(n, 0, sizeof(*n));
	*children = 0;
	if (!take(c, 1, &t))
		return 0;
	uint8_t b = *t;
	int len_bytes = 0;
	if (b <= 0x7f) {
		n->type = LD_MP_UINT;
		n->v.u = b;
		return 1;
	}
	if (b >= 0xe0) {
		n->type = LD_MP_INT;
		n->v.i = (int8_t)b;
		return 1;
	}
	if ((b & 0xf0) == 0x80 || (b & 0xf0) == 0x90) {
		n->type = (b & 0xf0) == 0x80 ? LD_MP_MAP : LD_MP_ARRAY;
		n->len = b & 0x0f;
		*children = n->type == LD_MP_MAP ? 2ull * n->len : n->len;
		return 1;
	}
	if ((b & 0xe0) == 0xa0) {
		n->type = LD_MP_STR;
		n->len = b & 0x1f;
		return take(c, n->len, (const uint8_t **)&n->v.s);
	}
	switch (b) {
	case 0xc0:
		n->type = LD_MP_NIL;
		return 1;
	case 0xc2:
	case 0xc3:
		n->type = LD_MP_BOOL;
		n->v.b = b == 0xc3;
		return 1;
	case 0xcc: case 0xcd: case 0xce: case 0xcf:
		if (!take_be(c, 1 << (b - 0xcc), &x))
			return 0;
		n->type = LD_MP_UINT;
		n->v.u = x;
		return 1;
	case 0xd0: case 0xd1: case 0xd2: case 0xd3: {
		int bytes = 1 << (b - 0xd0);
		if (!take_be(c, bytes, &x))
			return 0;
		int64_t v;
		if (bytes == 1)
			v = (int8_t)x;
		else if (bytes == 2)
			v = (int16_t)x;
		else if (bytes == 4)
			v = (int32_t)x;
		else
			v = (int64_t)x;
		if (v >= 0) {
			n->type = LD_MP_UINT;
			n->v.u = (uint64_t)v;
		} else {
			n->type = LD_MP_INT;
			n->v.i = v;
		}
		return 1;
	}
	case 0xca: {
		if (!take_be(c, 4, &x))
			return 0;
		uint32_t u = (uint32_t)x;
		float f;
		memcpy(&f, &u, 4);
		n->type = LD_MP_FLOAT;
		n->v.f = f;
		return 1;
	}
	case 0xcb:
		if (!take_be(c, 8, &x))
			return 0;
		n->type = LD_MP_FLOAT;
		memcpy(&n->v.f, &x, 8);
		return 1;
	case 0xd9: case 0xda: case 0xdb:
		n->type = LD_MP_STR;
		len_bytes = 1 << (b - 0xd9);
		break;
	case 0xc4: case 0xc5: case 0xc6:
		n->type = LD_MP_BIN;
		len_bytes = 1 << (b - 0xc4);
		break;
	case 0xdc: case 0xdd:
		if (!take_be(c, b == 0xdc ? 2 : 4, &x))
			return 0;
		n->type = LD_MP_ARRAY;
		n->len = (uint32_t)x;
		*children = x;
		return 1;
	case 0xde: case 0xdf:
		if (!take_be(c, b == 0xde ? 2 : 4, &x))
			return 0;
		n->type = LD_MP_MAP;
		n->len = (uint32_t)x;
		*children = 2 * x;
		return 1;
	case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8: {
		const uint8_t *data;
		size_t size = (size_t)1 << (b - 0xd4);
		if (!take(c, 1 + size, &data)) /* type byte + data */
			return 0;
		n->type = LD_MP_EXT;
		n->len = (uint32_t)size;
		n->v.s = (const char *)data + 1;
		return 1;
	}
	case 0xc7: case 0xc8: case 0xc9: {
		const uint8_t *data;
		if (!take_be(c, 1 << (b - 0xc7), &x) || !take(c, 1 + (size_t)x, &data))
			return 0;
		n->type = LD_MP_EXT;
		n->len = (uint32_t)x;
		n->v.s = (const char *)data + 1;
		return 1;
	}
	default: /* 0xc1: never used */
		return 0;
	}
	if (!take_be(c, len_bytes, &x))
		return 0;
	n->len = (uint32_t)x;
	return take(c, (size_t)x, (const uint8_t **)&n->v.s);
}

/* First pass: checks the bytes and counts nodes. */
static int count_nodes(cursor *c, int depth, size_t *count)
{
	uint64_t children;
	if (depth > LD_MP_MAX_DEPTH || !read_head(c, NULL, &children))
		return 0;
	(*count)++;
	/* every child takes at least one byte: refuse counts the buffer cannot hold */
	if (children > c->len - c->pos)
		return 0;
	for (uint64_t i = 0; i < children; i++)
		if (!count_nodes(c, depth + 1, count))
			return 0;
	return 1;
}

/* Second pass: fills node *n; children are allocated from *next. */
static void fill_node(cursor *c, ld_mp_node *n, ld_mp_node **next)
{
	uint64_t children;
	read_head(c, n, &children);
	if (n->type != LD_MP_ARRAY && n->type != LD_MP_MAP)
		return;
	ld_mp_node *items = *next;
	*next += children;
	n->v.items = items;
	for (uint64_t i = 0; i < children; i++)
		fill_node(c, &items[i], next);
}

int ld_mp_parse(ld_mp_doc *doc, const uint8_t *buf, size_t len)
{
	memset(doc, 0, sizeof(*doc));
	cursor c = {buf, len, 0};
	size_t count = 0;
	if (!count_nodes(&c, 0, &count) || c.pos != len)
		return -1;
	doc->nodes = (ld_mp_node *)calloc(count, sizeof(ld_mp_node));
	if (!doc->nodes)
		return -1;
	doc->count = count;
	cursor c2 = {buf, len, 0};
	ld_mp_node *next = doc->nodes + 1;
	fill_node(&c2, doc->nodes, &next);
	return 0;
}

void ld_mp_doc_free(ld_mp_doc *doc)
{
	free(doc->nodes);
	memset(doc, 0, sizeof(*doc));
}

int ld_mp_is_str(const ld_mp_node *n, const char *s)
{
	if (!n || n->type != LD_MP_STR)
		return 0;
	size_t l = strlen(s);
	return l == n->len && memcmp(n->v.s, s, l) == 0;
}

const ld_mp_node *ld_mp_get(const ld_mp_node *map, const char *key)
{
	if (!map || map->type != LD_MP_MAP)
		return NULL;
	for (uint32_t i = 0; i < map->len; i++)
		if (ld_mp_is_str(&map->v.items[2 * i], key))
			return &map->v.items[2 * i + 1];
	return NULL;
}

int ld_mp_as_i64(const ld_mp_node *n, int64_t *out)
{
	if (!n)
		return 0;
	if (n->type == LD_MP_INT) {
		*out = n->v.i;
		return 1;
	}
	if (n->type == LD_MP_UINT && n->v.u <= (uint64_t)INT64_MAX) {
		*out = (int64_t)n->v.u;
		return 1;
	}
	return 0;
}

int ld_mp_as_double(const ld_mp_node *n, double *out)
{
	if (!n)
		return 0;
	switch (n->type) {
	case LD_MP_FLOAT:
		*out = n->v.f;
		return 1;
	case LD_MP_INT:
		*out = (double)n->v.i;
		return 1;
	case LD_MP_UINT:
		*out = (double)n->v.u;
		return 1;
	default:
		return 0;
	}
}

int ld_mp_copy_str(const ld_mp_node *n, char *dst, size_t dstlen)
{
	if (!dstlen)
		return 0;
	dst[0] = '\0';
	if (!n || n->type != LD_MP_STR)
		return 0;
	size_t l = n->len < dstlen - 1 ? n->len : dstlen - 1;
	memcpy(dst, n->v.s, l);
	dst[l] = '\0';
	return 1;
}

void ld_mp_write_node(ld_mpw *w, const ld_mp_node *n)
{
	switch (n->type) {
	case LD_MP_NIL:
		ld_mpw_nil(w);
		break;
	case LD_MP_BOOL:
		ld_mpw_bool(w, n->v.b);
		break;
	case LD_MP_INT:
		ld_mpw_int(w, n->v.i);
		break;
	case LD_MP_UINT:
		ld_mpw_uint(w, n->v.u);
		break;
	case LD_MP_FLOAT:
		ld_mpw_double(w, n->v.f);
		break;
	case LD_MP_STR:
		ld_mpw_strn(w, n->v.s, n->len);
		break;
	case LD_MP_BIN:
	case LD_MP_EXT: /* not used by the protocol; forwarded as nil */
		ld_mpw_nil(w);
		break;
	case LD_MP_ARRAY:
		ld_mpw_array(w, n->len);
		for (uint32_t i = 0; i < n->len; i++)
			ld_mp_write_node(w, &n->v.items[i]);
		break;
	case LD_MP_MAP:
		ld_mpw_map(w, n->len);
		for (uint32_t i = 0; i < 2 * n->len; i++)
			ld_mp_write_node(w, &n->v.items[i]);
		break;
	}
}
