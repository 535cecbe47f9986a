/* Shared-memory frame rings of the livediffusion protocol (docs/protocol.md section 6):
 * attach to a segment the daemon created, write input frames and read output frames with
 * the per-slot seqlock. The daemon owns the segments: nothing here creates or unlinks one. */
#ifndef LD_RING_H
#define LD_RING_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { LD_FMT_RGB = 1, LD_FMT_BGR = 2, LD_FMT_RGBA = 3, LD_FMT_BGRA = 4, LD_FMT_GRAY = 5 };
enum { LD_DT_UINT8 = 1, LD_DT_UINT16 = 2, LD_DT_FLOAT16 = 3, LD_DT_FLOAT32 = 4 };
enum { LD_ORIGIN_TOP = 0, LD_ORIGIN_BOTTOM = 1 };
enum { LD_RING_OK = 0, LD_RING_TORN = 1, LD_RING_BAD = 2 };

typedef struct ld_frame_spec {
	uint32_t width, height, stride; /* stride: bytes per row */
	uint8_t format, dtype, origin;  /* codes above */
} ld_frame_spec;

typedef struct ld_slot_info {
	ld_frame_spec spec;
	int64_t ts;
	uint64_t ref_seq;
} ld_slot_info;

typedef struct ld_ring {
	uint8_t *base;
	size_t size;
	uint32_t slots, slot_stride, capacity;
	void *handle; /* Windows: the file mapping */
} ld_ring;

int ld_format_channels(int format); /* 0 for an unknown code */
int ld_dtype_size(int dtype);       /* 0 for an unknown code */
int ld_format_code(const char *name);
int ld_dtype_code(const char *name);
int ld_origin_code(const char *name); /* -1 for an unknown name */

/* Maps the segment called `name` (as given in `opened`) and checks its header. Returns 0, or
 * -1 with a one-line reason in err. */
int ld_ring_attach(ld_ring *r, const char *name, char *err, size_t errlen);
void ld_ring_detach(ld_ring *r);

/* Publishes one frame as seq in slot (seqlock writer). `pixels` rows are src_stride bytes
 * apart; the slot keeps spec->stride. Returns 0, or -1 if it does not fit. */
int ld_ring_write(ld_ring *r, uint32_t slot, uint64_t seq, const ld_frame_spec *spec,
		  const uint8_t *pixels, uint32_t src_stride, int64_t ts, int64_t t_write_ns,
		  uint64_t ref_seq);

/* Reads the frame announced as (slot, seq) into dst (rows dst_stride bytes apart, 0 = tightly
 * packed; at most
 * dst_size bytes). LD_RING_OK, LD_RING_TORN (overwritten or not yet complete: skip it) or
 * LD_RING_BAD (impossible header, or dst too small). */
int ld_ring_read(const ld_ring *r, uint32_t slot, uint64_t seq, ld_slot_info *info,
		 uint8_t *dst, size_t dst_size, uint32_t dst_stride);

#ifdef __cplusplus
}
#endif
#endif
