/* Engine parameter schema -> property descriptions, and preset lists: see ld_schema.h. */
#include "ld_schema.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#define INT_LO -2147483648.0 /* OBS int properties hold 32 bits */
#define INT_HI 2147483647.0
#define INT_SLIDER_SPAN 100  /* an int range up to this wide gets a slider */

double ld_slider_step(double lo, double hi)
{
	double span = hi - lo;
	if (!(span > 0) || !isfinite(span))
		return 0.01;
	double step = pow(10.0, floor(log10(span / 100.0)));
	return step > 0 ? step : 0.01;
}

/* "noise_scale" -> "Noise scale" */
static void pretty(const char *name, char *out, size_t len)
{
	size_t i = 0;
	for (; name[i] && i + 1 < len; i++)
		out[i] = name[i] == '_' ? ' ' : name[i];
	out[i] = '\0';
	if (out[0])
		out[0] = (char)toupper((unsigned char)out[0]);
}

static double clampd(double v, double lo, double hi)
{
	return v < lo ? lo : v > hi ? hi : v;
}

static void describe(const ld_mp_node *e, ld_prop *p)
{
	char desc[300], effect[16], unit[32];
	double lo = 0, hi = 0;
	int has_lo = ld_mp_as_double(ld_mp_get(e, "lo"), &lo);
	int has_hi = ld_mp_as_double(ld_mp_get(e, "hi"), &hi);
	const ld_mp_node *def = ld_mp_get(e, "default");

	memset(p, 0, sizeof(*p));
	ld_mp_copy_str(ld_mp_get(e, "name"), p->name, sizeof(p->name));
	snprintf(p->key, sizeof(p->key), "p_%s", p->name);
	ld_mp_copy_str(ld_mp_get(e, "kind"), p->kind, sizeof(p->kind));
	ld_mp_copy_str(ld_mp_get(e, "description"), desc, sizeof(desc));
	ld_mp_copy_str(ld_mp_get(e, "effect"), effect, sizeof(effect));
	ld_mp_copy_str(ld_mp_get(e, "unit"), unit, sizeof(unit));

	pretty(p->name, p->label, sizeof(p->label));
	if (unit[0]) {
		size_t n = strlen(p->label);
		snprintf(p->label + n, sizeof(p->label) - n, " (%s)", unit);
	}
	if (strcmp(effect, "rebuild") == 0)
		snprintf(p->tooltip, sizeof(p->tooltip), "%s. A change rebuilds part of the stream's state.",
			 desc);
	else if (strcmp(effect, "restart") == 0)
		snprintf(p->tooltip, sizeof(p->tooltip), "%s. A change restarts the stream's history.",
			 desc);
	else
		snprintf(p->tooltip, sizeof(p->tooltip), "%s", desc);

	const ld_mp_node *aliases = ld_mp_get(e, "aliases");
	if (aliases && aliases->type == LD_MP_ARRAY)
		for (uint32_t i = 0; i < aliases->len; i++) {
			char a[64];
			size_t n = strlen(p->aliases);
			if (ld_mp_copy_str(&aliases->v.items[i], a, sizeof(a)) && a[0])
				snprintf(p->aliases + n, sizeof(p->aliases) - n, "%s%s", n ? "|" : "", a);
		}

	if (strcmp(p->kind, "float") == 0) {
		ld_mp_as_double(def, &p->def_f);
		if (has_lo && has_hi && isfinite(lo) && isfinite(hi) && hi > lo) {
			p->widget = LD_W_FLOAT_SLIDER;
			p->lo = lo;
			p->hi = hi;
			p->step = ld_slider_step(lo, hi);
		} else {
			p->widget = LD_W_FLOAT;
			p->lo = has_lo && isfinite(lo) ? lo : -1e9;
			p->hi = has_hi && isfinite(hi) ? hi : 1e9;
			p->step = 0.01;
		}
	} else if (strcmp(p->kind, "int") == 0) {
		ld_mp_as_i64(def, &p->def_i);
		p->lo = has_lo ? clampd(ceil(lo), INT_LO, INT_HI) : INT_LO;
		p->hi = has_hi ? clampd(floor(hi), INT_LO, INT_HI) : INT_HI;
		p->step = 1;
		p->widget = has_lo && has_hi && p->hi - p->lo <= INT_SLIDER_SPAN ? LD_W_INT_SLIDER
										 : LD_W_INT;
	} else if (strcmp(p->kind, "bool") == 0) {
		p->widget = LD_W_BOOL;
		p->def_i = def && def->type == LD_MP_BOOL && def->v.b;
	} else if (strcmp(p->kind, "choice") == 0) {
		const ld_mp_node *ch = ld_mp_get(e, "choices");
		p->widget = LD_W_LIST;
		ld_mp_copy_str(def, p->def_s, sizeof(p->def_s));
		if (ch && ch->type == LD_MP_ARRAY)
			for (uint32_t i = 0; i < ch->len && p->nchoices < LD_PROP_CHOICES; i++)
				if (ld_mp_copy_str(&ch->v.items[i], p->choices[p->nchoices],
						   sizeof(p->choices[0])))
					p->nchoices++;
	} else if (strcmp(p->kind, "text") == 0) {
		/* the prompt gets room to write in; other texts one line */
		p->widget = strcmp(p->name, "prompt") == 0 ? LD_W_TEXT_MULTILINE : LD_W_TEXT;
		ld_mp_copy_str(def, p->def_s, sizeof(p->def_s));
	} else {
		p->widget = LD_W_EXTRA; /* prompts, seeds, indices, or a kind unknown here */
	}
}

int ld_schema_props(const ld_mp_node *schema, ld_prop *out, int room)
{
	int n = 0;
	if (!schema || schema->type != LD_MP_ARRAY)
		return 0;
	for (uint32_t i = 0; i < schema->len && n < room; i++) {
		const ld_mp_node *e = &schema->v.items[i];
		const ld_mp_node *name = ld_mp_get(e, "name");
		if (!name || name->type != LD_MP_STR || name->len == 0 || name->len >= 64)
			continue;
		describe(e, &out[n++]);
	}
	return n;
}

int ld_parse_presets(const ld_mp_node *msg, char *names, size_t len)
{
	const ld_mp_node *map = ld_mp_get(msg, "presets");
	size_t used = 0;
	int n = 0;
	if (len)
		names[0] = '\0';
	if (!ld_mp_is_str(ld_mp_get(msg, "type"), "presets") || !map || map->type != LD_MP_MAP)
		return -1;
	for (uint32_t i = 0; i < map->len; i++) {
		const ld_mp_node *k = &map->v.items[2 * i];
		if (k->type != LD_MP_STR || k->len == 0 || memchr(k->v.s, '\n', k->len))
			continue;
		if (used + k->len + 2 > len)
			break;
		memcpy(names + used, k->v.s, k->len);
		used += k->len;
		names[used++] = '\n';
		names[used] = '\0';
		n++;
	}
	return n;
}
