/* Frame rings: see ld_ring.h and docs/protocol.md section 6. */
#include "ld_ring.h"

#include <stdio.h>
#include <string.h>

#ifdef _WIN32
#define WIN32_LEAN_AND_MEAN
#include <windows.h>
#else
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

#define RING_HEADER_SIZE 64
#define SLOT_HEADER_SIZE 64

/* 64-bit atomic loads/stores and fences on the seqlock words (protocol section 6.4). */
#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
static uint64_t load_acquire(const volatile uint64_t *p)
{
	uint64_t v = *p; /* aligned 64-bit volatile reads are atomic; /volatile:ms orders them */
	MemoryBarrier();
	return v;
}
static uint64_t load_relaxed(const volatile uint64_t *p)
{
	return *p;
}
static void store_release(volatile uint64_t *p, uint64_t v)
{
	MemoryBarrier();
	*p = v;
}
static void store_relaxed(volatile uint64_t *p, uint64_t v)
{
	*p = v;
}
static void fence_release(void)
{
	MemoryBarrier();
}
static void fence_acquire(void)
{
	MemoryBarrier();
}
#else
static uint64_t load_acquire(const volatile uint64_t *p)
{
	return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static uint64_t load_relaxed(const volatile uint64_t *p)
{
	return __atomic_load_n(p, __ATOMIC_RELAXED);
}
static void store_release(volatile uint64_t *p, uint64_t v)
{
	__atomic_store_n(p, v, __ATOMIC_RELEASE);
}
static void store_relaxed(volatile uint64_t *p, uint64_t v)
{
	__atomic_store_n(p, v, __ATOMIC_RELAXED);
}
static void fence_release(void)
{
	__atomic_thread_fence(__ATOMIC_RELEASE);
}
static void fence_acquire(void)
{
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
}
#endif

/* little-endian field access (the ring is little-endian on every host) */
static uint32_t rd32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t rd64(const uint8_t *p)
{
	return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32;
}
static void wr16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
}
static void wr32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}
static void wr64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t align64(uint32_t n)
{
	return (n + 63u) / 64u * 64u;
}

int ld_format_channels(int format)
{
	switch (format) {
	case LD_FMT_RGB:
	case LD_FMT_BGR:
		return 3;
	case LD_FMT_RGBA:
	case LD_FMT_BGRA:
		return 4;
	case LD_FMT_GRAY:
		return 1;
	default:
		return 0;
	}
}

int ld_dtype_size(int dtype)
{
	switch (dtype) {
	case LD_DT_UINT8:
		return 1;
	case LD_DT_UINT16:
	case LD_DT_FLOAT16:
		return 2;
	case LD_DT_FLOAT32:
		return 4;
	default:
		return 0;
	}
}

static const char *const FORMAT_NAMES[] = {"", "rgb", "bgr", "rgba", "bgra", "gray"};
static const char *const DTYPE_NAMES[] = {"", "uint8", "uint16", "float16", "float32"};

int ld_format_code(const char *name)
{
	for (int i = 1; i <= 5; i++)
		if (strcmp(name, FORMAT_NAMES[i]) == 0)
			return i;
	return 0;
}

int ld_dtype_code(const char *name)
{
	for (int i = 1; i <= 4; i++)
		if (strcmp(name, DTYPE_NAMES[i]) == 0)
			return i;
	return 0;
}

int ld_origin_code(const char *name)
{
	if (strcmp(name, "top") == 0)
		return LD_ORIGIN_TOP;
	if (strcmp(name, "bottom") == 0)
		return LD_ORIGIN_BOTTOM;
	return -1;
}

static int check_header(ld_ring *r, char *err, size_t errlen)
{
	const uint8_t *h = r->base;
	if (r->size < RING_HEADER_SIZE || memcmp(h, "LDRING01", 8) != 0 || rd32(h + 8) != 1 ||
	    rd32(h + 24) != SLOT_HEADER_SIZE) {
		snprintf(err, errlen, "not a livediffusion ring (magic, version or slot header size)");
		return -1;
	}
	r->slots = rd32(h + 12);
	r->slot_stride = rd32(h + 16);
	r->capacity = rd32(h + 20);
	if (r->slots == 0 || r->slot_stride < SLOT_HEADER_SIZE + align64(r->capacity) + 64 ||
	    (uint64_t)RING_HEADER_SIZE + (uint64_t)r->slots * r->slot_stride > r->size) {
		snprintf(err, errlen, "ring header does not fit the segment (%u slots of %u bytes)",
			 r->slots, r->slot_stride);
		return -1;
	}
	return 0;
}

int ld_ring_attach(ld_ring *r, const char *name, char *err, size_t errlen)
{
	memset(r, 0, sizeof(*r));
#ifdef _WIN32
	wchar_t wname[64];
	if (MultiByteToWideChar(CP_UTF8, 0, name, -1, wname, 64) == 0) {
		snprintf(err, errlen, "bad segment name %s", name);
		return -1;
	}
	HANDLE h = OpenFileMappingW(FILE_MAP_READ | FILE_MAP_WRITE, FALSE, wname);
	if (!h) {
		snprintf(err, errlen, "cannot open segment %s (error %lu)", name, GetLastError());
		return -1;
	}
	void *p = MapViewOfFile(h, FILE_MAP_READ | FILE_MAP_WRITE, 0, 0, 0);
	if (!p) {
		snprintf(err, errlen, "cannot map segment %s (error %lu)", name, GetLastError());
		CloseHandle(h);
		return -1;
	}
	MEMORY_BASIC_INFORMATION info;
	VirtualQuery(p, &info, sizeof(info));
	r->base = (uint8_t *)p;
	r->size = info.RegionSize;
	r->handle = h;
#else
	char path[64];
	snprintf(path, sizeof(path), "/%s", name);
	int fd = shm_open(path, O_RDWR, 0);
	if (fd < 0) {
		snprintf(err, errlen, "cannot open segment %s", name);
		return -1;
	}
	struct stat st;
	if (fstat(fd, &st) != 0 || st.st_size <= 0) {
		close(fd);
		snprintf(err, errlen, "cannot size segment %s", name);
		return -1;
	}
	void *p = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	if (p == MAP_FAILED) {
		snprintf(err, errlen, "cannot map segment %s", name);
		return -1;
	}
	r->base = (uint8_t *)p;
	r->size = (size_t)st.st_size;
#endif
	if (check_header(r, err, errlen) != 0) {
		ld_ring_detach(r);
		return -1;
	}
	return 0;
}

void ld_ring_detach(ld_ring *r)
{
	if (!r->base)
		return;
#ifdef _WIN32
	UnmapViewOfFile(r->base);
	if (r->handle)
		CloseHandle((HANDLE)r->handle);
#else
	munmap(r->base, r->size);
#endif
	memset(r, 0, sizeof(*r));
}

static uint8_t *slot_at(const ld_ring *r, uint32_t slot)
{
	return r->base + RING_HEADER_SIZE + (size_t)slot * r->slot_stride;
}

static volatile uint64_t *seq_end_of(const ld_ring *r, uint8_t *s)
{
	return (volatile uint64_t *)(s + SLOT_HEADER_SIZE + align64(r->capacity));
}

int ld_ring_write(ld_ring *r, uint32_t slot, uint64_t seq, const ld_frame_spec *spec,
		  const uint8_t *pixels, uint32_t src_stride, int64_t ts, int64_t t_write_ns,
		  uint64_t ref_seq)
{
	int ch = ld_format_channels(spec->format);
	uint32_t row = spec->width * (uint32_t)ch * (uint32_t)ld_dtype_size(spec->dtype);
	if (!r->base || slot >= r->slots || seq == 0 || row == 0 || spec->stride < row ||
	    (uint64_t)spec->stride * spec->height > r->capacity || src_stride < row)
		return -1;
	uint8_t *s = slot_at(r, slot);
	volatile uint64_t *begin = (volatile uint64_t *)s;
	store_relaxed(begin, seq);
	fence_release();
	uint8_t h[SLOT_HEADER_SIZE - 8];
	memset(h, 0, sizeof(h));
	/* offsets below are relative to byte 8 of the header */
	wr32(h + 0, spec->width);
	wr32(h + 4, spec->height);
	wr32(h + 8, spec->stride);
	wr16(h + 12, (uint16_t)ch);
	h[14] = spec->dtype;
	h[15] = spec->format;
	h[16] = spec->origin;
	wr32(h + 20, spec->stride * spec->height);
	wr64(h + 24, (uint64_t)ts);
	wr64(h + 32, (uint64_t)t_write_ns);
	wr64(h + 40, ref_seq);
	memcpy(s + 8, h, sizeof(h));
	uint8_t *dst = s + SLOT_HEADER_SIZE;
	for (uint32_t y = 0; y < spec->height; y++)
		memcpy(dst + (size_t)y * spec->stride, pixels + (size_t)y * src_stride, row);
	store_release(seq_end_of(r, s), seq);
	return 0;
}

int ld_ring_read(const ld_ring *r, uint32_t slot, uint64_t seq, ld_slot_info *info,
		 uint8_t *dst, size_t dst_size, uint32_t dst_stride)
{
	if (!r->base || slot >= r->slots || seq == 0)
		return LD_RING_BAD;
	uint8_t *s = slot_at(r, slot);
	volatile uint64_t *end = seq_end_of(r, s);
	uint64_t e = load_acquire(end);
	if (e == 0 || e != seq)
		return LD_RING_TORN;
	uint8_t h[SLOT_HEADER_SIZE];
	memcpy(h, s, sizeof(h));
	if (rd64(h) != e)
		return LD_RING_TORN;
	ld_frame_spec spec;
	spec.width = rd32(h + 8);
	spec.height = rd32(h + 12);
	spec.stride = rd32(h + 16);
	uint16_t ch = (uint16_t)(h[20] | h[21] << 8);
	spec.dtype = h[22];
	spec.format = h[23];
	spec.origin = h[24];
	int want_ch = ld_format_channels(spec.format);
	int isz = ld_dtype_size(spec.dtype);
	uint64_t row = (uint64_t)spec.width * (uint64_t)want_ch * (uint64_t)isz;
	/* a stride must be a whole number of samples, as the Python ring and the daemon ask */
	if (!want_ch || !isz || spec.origin > 1 || ch != want_ch || !spec.width || !spec.height ||
	    spec.stride < row || spec.stride % (uint32_t)isz ||
	    (uint64_t)spec.stride * spec.height > r->capacity)
		return LD_RING_BAD;
	if (dst_stride == 0)
		dst_stride = (uint32_t)row;
	if (dst_stride < row || (uint64_t)dst_stride * (spec.height - 1) + row > dst_size)
		return LD_RING_BAD;
	const uint8_t *src = s + SLOT_HEADER_SIZE;
	for (uint32_t y = 0; y < spec.height; y++)
		memcpy(dst + (size_t)y * dst_stride, src + (size_t)y * spec.stride, (size_t)row);
	fence_acquire();
	uint64_t b = load_relaxed((volatile uint64_t *)s);
	uint64_t e2 = load_relaxed(end);
	if (b != seq || e2 != seq)
		return LD_RING_TORN;
	if (info) {
		info->spec = spec;
		info->ts = (int64_t)rd64(h + 32);
		info->ref_seq = rd64(h + 48);
	}
	return LD_RING_OK;
}
