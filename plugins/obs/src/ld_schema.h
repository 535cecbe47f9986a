/* The engine parameter schema of a daemon's welcome (docs/protocol.md section 3.3.1,
 * capabilities.engines.<engine>.schema) turned into property descriptions, and the preset list
 * of a `presets` answer (section 3.2.5b). Pure functions without OBS, so that the mapping is
 * tested on its own (tests/ld_selftest.c); ld_filter.c makes OBS properties of them. */
#ifndef LD_SCHEMA_H
#define LD_SCHEMA_H

#include <stddef.h>
#include <stdint.h>

#include "ld_msgpack.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LD_PROP_MAX 48
#define LD_PROP_CHOICES 16
#define LD_PROP_TEXT_MAX 512

/* How a parameter is shown. LD_W_EXTRA: a list kind (prompts, seeds, indices) or a kind this
 * plugin does not know; it has no property of its own and is set through "Extra". */
enum {
	LD_W_EXTRA,
	LD_W_FLOAT_SLIDER,
	LD_W_FLOAT,
	LD_W_INT_SLIDER,
	LD_W_INT,
	LD_W_BOOL,
	LD_W_LIST,
	LD_W_TEXT,
	LD_W_TEXT_MULTILINE
};

typedef struct ld_prop {
	char name[64];       /* the engine parameter's name */
	char key[72];        /* the settings key: "p_<name>", stable across engines and sessions */
	char kind[16];       /* the schema's kind */
	char label[96];      /* "Noise scale", "Cache frames (latent frames)" */
	char tooltip[400];   /* the description, and what a change does unless it is "live" */
	int widget;          /* LD_W_* */
	double lo, hi, step; /* numbers: the range shown (ints within 32 bits) and the step */
	double def_f;        /* float default */
	int64_t def_i;       /* int and bool default */
	char def_s[LD_PROP_TEXT_MAX]; /* text and choice default */
	int nchoices;
	char choices[LD_PROP_CHOICES][64];
	char aliases[128];   /* other accepted names, '|'-separated */
} ld_prop;

/* Fills out[0..room) with one description per schema entry (an array of maps), in the
 * engine's order; entries without a name are skipped. Returns how many were written. */
int ld_schema_props(const ld_mp_node *schema, ld_prop *out, int room);

/* The slider step for a range: a power of ten near a hundredth of it (0..1 -> 0.01). */
double ld_slider_step(double lo, double hi);

/* The preset names of a `presets` answer, each followed by '\n', into names (cut at len).
 * Returns how many, or -1 when msg is not a presets answer with a `presets` map. */
int ld_parse_presets(const ld_mp_node *msg, char *names, size_t len);

#ifdef __cplusplus
}
#endif
#endif
