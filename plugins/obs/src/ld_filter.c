/* The livediffusion OBS filter: renders its parent source, hands the picture (BGRA) to a
 * worker thread that streams it through the livediffusion daemon, and draws the newest
 * processed frame in place of the source. The render thread never touches the network: the
 * worker owns the ZeroMQ socket (ld_client). With no daemon, or a daemon that stopped
 * answering, the filter shows the source (or the last output, if the user chose that). */
#include <obs-module.h>
#include <graphics/vec4.h>
#include <util/bmem.h>
#include <util/platform.h>
#include <util/threading.h>

#include <stdio.h>
#include <string.h>

#include "ld_client.h"
#include "ld_schema.h"

OBS_DECLARE_MODULE()
OBS_MODULE_USE_DEFAULT_LOCALE("livediffusion", "en-US")

#define T(s) obs_module_text(s)
#define STALE_NS 2000000000ULL /* an output older than this counts as "daemon slow" */
#define STATUS_EVERY_NS 1000000000ULL
#define STATUS_LEN 240 /* characters of the status kept in the settings */
#define MAX_ENGINES 16
#define MAX_HOTKEYS 64
#define PRESETS_LEN 8192
#define HOTKEY_PREFIX "livediffusion.preset."

/* The last schema seen for one engine (encoded msgpack): kept while disconnected. */
struct schema_cache {
	char engine[64];
	uint8_t *buf;
	size_t len;
};

struct preset_hotkey {
	obs_hotkey_id id;
	char name[72];
};

/* A pixel buffer that the render and worker threads hand to each other by swapping. */
struct pixbuf {
	uint8_t *p;
	size_t cap;
	uint32_t w, h;
};

static bool pixbuf_fit(struct pixbuf *b, uint32_t w, uint32_t h)
{
	size_t need = (size_t)w * h * 4;
	if (need > b->cap) {
		uint8_t *p = brealloc(b->p, need);
		if (!p)
			return false;
		b->p = p;
		b->cap = need;
	}
	b->w = w;
	b->h = h;
	return true;
}

struct ld_filter {
	obs_source_t *self;

	/* render thread only */
	gs_texrender_t *render;
	gs_stagesurf_t *stage[2];
	bool staged[2];
	int stage_next;
	uint32_t stage_w, stage_h;
	gs_texture_t *out_tex;
	uint32_t tex_w, tex_h;
	uint64_t out_time_ns;
	bool captured_this_tick;
	struct pixbuf grab, shown;
	char stream_name[200]; /* written here, read by filter_update under lock */
	uint64_t status_written_ns;
	char status_written[512];

	/* shared: under lock */
	pthread_mutex_t lock;
	ld_settings *settings;
	bool settings_dirty;
	bool bypass, show_last;
	uint32_t src_w, src_h;
	struct pixbuf in;
	bool in_new;
	struct pixbuf out;
	uint64_t out_seq;
	bool out_new;
	bool streaming;
	uint32_t proc_w, proc_h;
	char status[512];
	double latency_ms; /* while streaming, else 0 */
	char engines[512];
	struct schema_cache schemas[MAX_ENGINES];
	unsigned schema_gen;  /* bumped by the worker when a schema arrives */
	char engine_now[64];  /* the engine the client uses, or would ("auto" resolved) */
	char presets[PRESETS_LEN]; /* the daemon's preset names, each followed by '\n' */
	unsigned presets_gen;
	char recall[72];      /* a preset to recall, handed to the worker (hotkeys, button) */
	bool recall_pending, presets_refresh;
	struct preset_hotkey hotkeys[MAX_HOTKEYS]; /* read by the hotkey thread */
	int nhotkeys;

	char props_engine[64]; /* the engine the properties were last built for (UI thread) */

	/* video tick only */
	obs_source_t *hotkey_parent; /* the source the preset hotkeys are registered on */
	unsigned schema_seen, presets_seen;
	char engine_seen[64];

	pthread_t thread;
	bool thread_started;
	volatile bool stop;
};

/* ---- the worker thread ------------------------------------------------------------------- */

/* Keeps (or replaces) the schema of one engine; takes the lock. */
static void cache_schema(struct ld_filter *f, const char *engine, const uint8_t *buf, size_t len)
{
	uint8_t *copy = bmemdup(buf, len);
	pthread_mutex_lock(&f->lock);
	struct schema_cache *slot = NULL;
	for (int i = 0; i < MAX_ENGINES && !slot; i++)
		if (strcmp(f->schemas[i].engine, engine) == 0 || !f->schemas[i].engine[0])
			slot = &f->schemas[i];
	if (!slot)
		slot = &f->schemas[MAX_ENGINES - 1];
	if (slot->len == len && slot->buf && memcmp(slot->buf, buf, len) == 0) {
		bfree(copy);
	} else {
		bfree(slot->buf);
		snprintf(slot->engine, sizeof(slot->engine), "%s", engine);
		slot->buf = copy;
		slot->len = len;
		f->schema_gen++;
	}
	pthread_mutex_unlock(&f->lock);
}

static void *worker_main(void *data)
{
	struct ld_filter *f = data;
	os_set_thread_name("livediffusion-filter");
	ld_client *client = ld_client_new();
	ld_settings *local = bzalloc(sizeof(ld_settings));
	struct pixbuf frame = {0}, out = {0};
	uint64_t last_status = 0;
	unsigned welcome_seen = 0, presets_seen = 0;
	char *presets = bzalloc(PRESETS_LEN);
	ld_mpw schema;
	ld_mpw_init(&schema);

	while (!os_atomic_load_bool(&f->stop)) {
		bool dirty = false, have_frame = false, recall = false, refresh = false;
		char preset[72];
		pthread_mutex_lock(&f->lock);
		if (f->recall_pending) {
			snprintf(preset, sizeof(preset), "%s", f->recall);
			f->recall_pending = false;
			recall = true;
		}
		refresh = f->presets_refresh;
		f->presets_refresh = false;
		if (f->settings_dirty) {
			memcpy(local, f->settings, sizeof(*local));
			f->settings_dirty = false;
			dirty = true;
		}
		uint32_t sw = f->src_w, sh = f->src_h;
		if (f->in_new) {
			struct pixbuf t = frame;
			frame = f->in;
			f->in = t;
			f->in_new = false;
			have_frame = true;
		}
		pthread_mutex_unlock(&f->lock);

		if (dirty)
			ld_client_configure(client, local);
		if (recall)
			ld_client_recall(client, preset);
		if (refresh)
			ld_client_refresh_presets(client);
		ld_client_set_source_size(client, sw, sh);
		if (have_frame)
			ld_client_send_frame(client, frame.p, frame.w * 4, frame.w, frame.h);
		int fresh = ld_client_poll(client, 4);

		uint32_t ow = 0, oh = 0;
		uint64_t seq = 0;
		const uint8_t *px = fresh ? ld_client_output(client, &ow, &oh, &seq) : NULL;
		if (px && pixbuf_fit(&out, ow, oh))
			memcpy(out.p, px, (size_t)ow * oh * 4);

		unsigned presets_gen = 0;
		ld_client_presets(client, presets, PRESETS_LEN, &presets_gen);
		if (ld_client_welcome_gen(client) != welcome_seen) {
			welcome_seen = ld_client_welcome_gen(client);
			char names[512];
			ld_client_engines(client, names, sizeof(names));
			for (char *e = names; e && *e;) {
				char *comma = strchr(e, ',');
				if (comma)
					*comma = '\0';
				if (ld_client_schema(client, e, &schema) == 0)
					cache_schema(f, e, schema.buf, schema.len);
				e = comma ? comma + 1 : NULL;
			}
		}

		uint64_t now = os_gettime_ns();
		pthread_mutex_lock(&f->lock);
		if (presets_gen != presets_seen) {
			presets_seen = presets_gen;
			memcpy(f->presets, presets, PRESETS_LEN);
			f->presets_gen++;
		}
		ld_client_engine(client, f->engine_now, sizeof(f->engine_now));
		f->streaming = ld_client_input_size(client, &f->proc_w, &f->proc_h) != 0;
		if (px && out.p) {
			struct pixbuf t = f->out;
			f->out = out;
			out = t;
			f->out_seq = seq;
			f->out_new = true;
		}
		if (now - last_status >= STATUS_EVERY_NS / 2) {
			last_status = now;
			ld_client_status_line(client, f->status, sizeof(f->status));
			ld_status st;
			ld_client_status(client, &st);
			f->latency_ms = strcmp(st.state, "streaming") == 0 ? st.latency_ms : 0.0;
			ld_client_engines(client, f->engines, sizeof(f->engines));
		}
		pthread_mutex_unlock(&f->lock);
	}
	ld_client_free(client); /* close, bye */
	ld_mpw_free(&schema);
	bfree(presets);
	bfree(frame.p);
	bfree(out.p);
	bfree(local);
	return NULL;
}

/* ---- presets ------------------------------------------------------------------------------- */

/* Hands a recall to the worker, which owns the client (from the UI or the hotkey thread). */
static void queue_recall(struct ld_filter *f, const char *preset)
{
	if (!preset || !*preset)
		return;
	pthread_mutex_lock(&f->lock);
	snprintf(f->recall, sizeof(f->recall), "%s", preset);
	f->recall_pending = true;
	pthread_mutex_unlock(&f->lock);
}

/* On OBS's hotkey thread. */
static void hotkey_pressed(void *data, obs_hotkey_id id, obs_hotkey_t *hotkey, bool pressed)
{
	UNUSED_PARAMETER(hotkey);
	struct ld_filter *f = data;
	char name[72] = "";
	if (!pressed)
		return;
	pthread_mutex_lock(&f->lock);
	for (int i = 0; i < f->nhotkeys; i++)
		if (f->hotkeys[i].id == id)
			snprintf(name, sizeof(name), "%s", f->hotkeys[i].name);
	pthread_mutex_unlock(&f->lock);
	queue_recall(f, name);
}

static bool listed_preset(const char *names, const char *name)
{
	size_t n = strlen(name);
	for (const char *p = names; *p;) {
		const char *nl = strchr(p, '\n');
		if (!nl)
			break;
		if ((size_t)(nl - p) == n && memcmp(p, name, n) == 0)
			return true;
		p = nl + 1;
	}
	return false;
}

/* One hotkey per daemon preset ("livediffusion.preset.<name>") on the filter's source (OBS
 * refuses hotkeys on filters, which are private sources; they show under the source in
 * Settings > Hotkeys and are saved with it): registers the new ones, unregisters those of
 * presets that are gone. Never holds the lock while calling into the hotkey system (whose
 * thread takes the lock in hotkey_pressed). */
static void sync_hotkeys(struct ld_filter *f, const char *names)
{
	struct preset_hotkey *keep = bzalloc(sizeof(f->hotkeys)), *drop = bzalloc(sizeof(f->hotkeys));
	int nkeep = 0, ndrop = 0;
	pthread_mutex_lock(&f->lock);
	for (int i = 0; i < f->nhotkeys; i++) {
		if (listed_preset(names, f->hotkeys[i].name))
			keep[nkeep++] = f->hotkeys[i];
		else
			drop[ndrop++] = f->hotkeys[i];
	}
	pthread_mutex_unlock(&f->lock);
	for (int i = 0; i < ndrop; i++)
		obs_hotkey_unregister(drop[i].id);
	for (const char *p = names; *p && nkeep < MAX_HOTKEYS;) {
		const char *nl = strchr(p, '\n');
		if (!nl)
			break;
		char name[72], id[96], desc[128];
		snprintf(name, sizeof(name), "%.*s", (int)(nl - p), p);
		p = nl + 1;
		bool known = false;
		for (int i = 0; i < nkeep && !known; i++)
			known = strcmp(keep[i].name, name) == 0;
		if (known)
			continue;
		snprintf(id, sizeof(id), HOTKEY_PREFIX "%s", name);
		snprintf(desc, sizeof(desc), "livediffusion: recall preset %s", name);
		obs_hotkey_id hk = obs_hotkey_register_source(f->hotkey_parent, id, desc,
							      hotkey_pressed, f);
		if (hk == OBS_INVALID_HOTKEY_ID) {
			blog(LOG_WARNING, "[livediffusion] could not register hotkey '%s'", id);
			continue;
		}
		blog(LOG_INFO, "[livediffusion] hotkey '%s' on '%s'", id,
		     obs_source_get_name(f->hotkey_parent));
		keep[nkeep].id = hk;
		snprintf(keep[nkeep].name, sizeof(keep[nkeep].name), "%s", name);
		nkeep++;
	}
	pthread_mutex_lock(&f->lock);
	memcpy(f->hotkeys, keep, sizeof(f->hotkeys));
	f->nhotkeys = nkeep;
	pthread_mutex_unlock(&f->lock);
	bfree(keep);
	bfree(drop);
}

static void unregister_hotkeys(struct ld_filter *f)
{
	pthread_mutex_lock(&f->lock);
	int n = f->nhotkeys;
	struct preset_hotkey hk[MAX_HOTKEYS];
	memcpy(hk, f->hotkeys, sizeof(hk));
	f->nhotkeys = 0;
	pthread_mutex_unlock(&f->lock);
	for (int i = 0; i < n; i++)
		obs_hotkey_unregister(hk[i].id);
}

/* ---- settings ------------------------------------------------------------------------------ */

static void add_param(ld_settings *s, const char *keys, int type, const char *str, int64_t i,
		      double f)
{
	if (s->nparams >= LD_MAX_PARAMS)
		return;
	ld_param *p = &s->params[s->nparams++];
	memset(p, 0, sizeof(*p));
	snprintf(p->keys, sizeof(p->keys), "%s", keys);
	p->type = type;
	if (str)
		snprintf(p->s, sizeof(p->s), "%s", str);
	p->i = i;
	p->f = f;
}

/* Stream name in the daemon: "obs:<source>", or "obs:<source>:<filter>" for a filter not
 * called "livediffusion" (so that two such filters on one source do not collide).
 * `livediffusion params NAME prompt=...` and `livediffusion obs prompt` use it. */
static void stream_name_for(struct ld_filter *f, char *out, size_t len)
{
	obs_source_t *parent = obs_filter_get_parent(f->self);
	const char *src = parent ? obs_source_get_name(parent) : NULL;
	const char *mine = obs_source_get_name(f->self);
	if (!src) {
		out[0] = '\0';
		return;
	}
	if (mine && strcmp(mine, "livediffusion") != 0)
		snprintf(out, len, "obs:%s:%s", src, mine);
	else
		snprintf(out, len, "obs:%s", src);
}

/* The engine whose schema the properties show and the settings are typed with: the chosen
 * one, or for "auto" the one the client uses (or, before, the first of the preferred order
 * among the engines seen). "" when none is known. Under lock. */
static void schema_engine_locked(struct ld_filter *f, const char *chosen, char *out, size_t len)
{
	out[0] = '\0';
	if (chosen[0] && strcmp(chosen, "auto") != 0) {
		snprintf(out, len, "%s", chosen);
		return;
	}
	if (f->engine_now[0]) {
		snprintf(out, len, "%s", f->engine_now);
		return;
	}
	for (int i = 0; LD_PREFERRED_ENGINES[i]; i++)
		for (int j = 0; j < MAX_ENGINES; j++)
			if (strcmp(f->schemas[j].engine, LD_PREFERRED_ENGINES[i]) == 0) {
				snprintf(out, len, "%s", LD_PREFERRED_ENGINES[i]);
				return;
			}
	snprintf(out, len, "%s", f->schemas[0].engine);
}

/* The property descriptions of the cached schema of `engine`; -1 when none is known. Under
 * lock. */
static int schema_props_locked(struct ld_filter *f, const char *engine, ld_prop *props, int room)
{
	for (int i = 0; engine[0] && i < MAX_ENGINES; i++) {
		struct schema_cache *c = &f->schemas[i];
		ld_mp_doc doc;
		if (strcmp(c->engine, engine) != 0 || !c->buf || ld_mp_parse(&doc, c->buf, c->len) != 0)
			continue;
		int n = ld_schema_props(doc.nodes, props, room);
		ld_mp_doc_free(&doc);
		return n;
	}
	return -1;
}

static const ld_prop *find_prop(const ld_prop *props, int n, const char *key)
{
	for (int i = 0; i < n; i++)
		if (strcmp(props[i].key, key) == 0)
			return &props[i];
	return NULL;
}

/* Moves a user value from one settings key to another (replacing what the other held). */
static void move_value(obs_data_t *settings, const char *from, const char *to)
{
	obs_data_item_t *item = obs_data_item_byname(settings, from);
	if (!item)
		return;
	switch (obs_data_item_gettype(item)) {
	case OBS_DATA_STRING:
		obs_data_set_string(settings, to, obs_data_item_get_string(item));
		break;
	case OBS_DATA_BOOLEAN:
		obs_data_set_bool(settings, to, obs_data_item_get_bool(item));
		break;
	case OBS_DATA_NUMBER:
		if (obs_data_item_numtype(item) == OBS_DATA_NUM_INT)
			obs_data_set_int(settings, to, obs_data_item_get_int(item));
		else
			obs_data_set_double(settings, to, obs_data_item_get_double(item));
		break;
	default:
		break;
	}
	obs_data_item_release(&item);
	obs_data_erase(settings, from);
}

/* Scenes saved before the properties came from the engine's schema, and `livediffusion obs
 * setup` / `obs prompt`, use the keys prompt, negative_prompt, seed, strength and steps: a value
 * set there moves to its "p_" key (seed -1 and steps 0 meant "the engine's own": dropped). */
static void migrate_old_keys(obs_data_t *settings)
{
	static const char *const old[] = {"prompt", "negative_prompt", "seed", "strength", "steps"};
	for (size_t i = 0; i < sizeof(old) / sizeof(old[0]); i++) {
		char key[32];
		if (!obs_data_has_user_value(settings, old[i]))
			continue;
		snprintf(key, sizeof(key), "p_%s", old[i]);
		bool keep = true;
		if (strcmp(old[i], "prompt") == 0)
			keep = obs_data_get_string(settings, old[i])[0] != '\0';
		else if (strcmp(old[i], "seed") == 0)
			keep = obs_data_get_int(settings, old[i]) >= 0;
		else if (strcmp(old[i], "steps") == 0)
			keep = obs_data_get_int(settings, old[i]) > 0;
		if (keep)
			move_value(settings, old[i], key);
		else
			obs_data_erase(settings, old[i]);
	}
}

/* A value set under an alias of a parameter (p_strength for the video engines' noise_scale)
 * moves to the parameter's own key, which the properties show. */
static void migrate_aliases(obs_data_t *settings, const ld_prop *props, int n)
{
	for (int i = 0; i < n; i++) {
		char aliases[128];
		snprintf(aliases, sizeof(aliases), "%s", props[i].aliases);
		for (char *a = aliases; a && *a;) {
			char *bar = strchr(a, '|'), key[72];
			if (bar)
				*bar = '\0';
			snprintf(key, sizeof(key), "p_%s", a);
			if (obs_data_has_user_value(settings, key))
				move_value(settings, key, props[i].key);
			a = bar ? bar + 1 : NULL;
		}
	}
}

/* One "p_<name>" setting as an engine parameter: typed by its schema entry when known, else by
 * how OBS holds it. */
static void add_setting_param(ld_settings *s, const char *name, const ld_prop *p,
			      obs_data_item_t *item)
{
	enum obs_data_type type = obs_data_item_gettype(item);
	if (p && p->widget == LD_W_EXTRA)
		return; /* the list kinds go through Extra */
	if (p && (p->widget == LD_W_FLOAT || p->widget == LD_W_FLOAT_SLIDER))
		add_param(s, name, LD_P_FLOAT, NULL, 0, obs_data_item_get_double(item));
	else if (p && (p->widget == LD_W_INT || p->widget == LD_W_INT_SLIDER))
		add_param(s, name, LD_P_INT, NULL, obs_data_item_get_int(item), 0);
	else if (p && p->widget == LD_W_BOOL)
		add_param(s, name, LD_P_BOOL, NULL, obs_data_item_get_bool(item), 0);
	else if (type == OBS_DATA_STRING) {
		const char *v = obs_data_item_get_string(item);
		if (strcmp(name, "prompt") != 0 || (v && *v)) /* an empty prompt keeps the engine's */
			add_param(s, name, LD_P_STR, v, 0, 0);
	} else if (type == OBS_DATA_BOOLEAN)
		add_param(s, name, LD_P_BOOL, NULL, obs_data_item_get_bool(item), 0);
	else if (type == OBS_DATA_NUMBER && obs_data_item_numtype(item) == OBS_DATA_NUM_INT)
		add_param(s, name, LD_P_INT, NULL, obs_data_item_get_int(item), 0);
	else if (type == OBS_DATA_NUMBER)
		add_param(s, name, LD_P_FLOAT, NULL, 0, obs_data_item_get_double(item));
}

static void filter_update(void *data, obs_data_t *settings)
{
	struct ld_filter *f = data;
	ld_settings *s = bzalloc(sizeof(ld_settings));
	snprintf(s->endpoint, sizeof(s->endpoint), "%s", obs_data_get_string(settings, "endpoint"));
	snprintf(s->client_name, sizeof(s->client_name), "obs");
	snprintf(s->keys_dir, sizeof(s->keys_dir), "%s", obs_data_get_string(settings, "keys_dir"));
	snprintf(s->engine, sizeof(s->engine), "%s", obs_data_get_string(settings, "engine"));
	if (!s->engine[0])
		snprintf(s->engine, sizeof(s->engine), "auto");
	if (strcmp(obs_data_get_string(settings, "resolution"), "fixed") == 0) {
		s->fixed_w = (uint32_t)obs_data_get_int(settings, "width");
		s->fixed_h = (uint32_t)obs_data_get_int(settings, "height");
	}
	s->transition = obs_data_get_double(settings, "transition");

	/* the engine's parameters: every "p_<name>" the user set (untouched ones keep the
	 * engine's own value), typed by the engine's schema when it is known */
	migrate_old_keys(settings);
	ld_prop *props = bzalloc(sizeof(ld_prop) * LD_PROP_MAX);
	char engine[64];
	pthread_mutex_lock(&f->lock);
	schema_engine_locked(f, s->engine, engine, sizeof(engine));
	int nprops = schema_props_locked(f, engine, props, LD_PROP_MAX);
	pthread_mutex_unlock(&f->lock);
	migrate_aliases(settings, props, nprops);
	for (obs_data_item_t *item = obs_data_first(settings); item; obs_data_item_next(&item)) {
		const char *key = obs_data_item_get_name(item);
		if (strncmp(key, "p_", 2) == 0 && key[2] && obs_data_item_has_user_value(item))
			add_setting_param(s, key + 2, find_prop(props, nprops, key), item);
	}
	bfree(props);
	/* extra "key=value" lines come last, so they override the fields above */
	s->nparams += ld_parse_extra_params(obs_data_get_string(settings, "extra"),
					    s->params + s->nparams, LD_MAX_PARAMS - s->nparams);

	pthread_mutex_lock(&f->lock);
	snprintf(s->name, sizeof(s->name), "%s", f->stream_name);
	memcpy(f->settings, s, sizeof(*s));
	f->settings_dirty = true;
	f->bypass = obs_data_get_bool(settings, "bypass");
	f->show_last = strcmp(obs_data_get_string(settings, "when_absent"), "last") == 0;
	pthread_mutex_unlock(&f->lock);
	bfree(s);
}

static void filter_defaults(obs_data_t *settings)
{
	obs_data_set_default_string(settings, "endpoint", "tcp://127.0.0.1:5570");
	obs_data_set_default_string(settings, "keys_dir", "");
	obs_data_set_default_string(settings, "engine", "auto");
	/* the fixed set shown before any schema is known; the schema's defaults replace these */
	obs_data_set_default_int(settings, "p_seed", 42);
	obs_data_set_default_double(settings, "p_strength", 0.5);
	obs_data_set_default_int(settings, "p_steps", 1);
	obs_data_set_default_string(settings, "preset", "");
	obs_data_set_default_double(settings, "transition", 0.0);
	obs_data_set_default_string(settings, "resolution", "follow");
	obs_data_set_default_int(settings, "width", 512);
	obs_data_set_default_int(settings, "height", 512);
	obs_data_set_default_string(settings, "extra", "");
	obs_data_set_default_string(settings, "when_absent", "source");
	obs_data_set_default_bool(settings, "bypass", false);
	obs_data_set_default_string(settings, "status", "");
	obs_data_set_default_int(settings, "latency_ms", 0);
}

static bool resolution_changed(obs_properties_t *props, obs_property_t *p, obs_data_t *settings)
{
	UNUSED_PARAMETER(p);
	bool fixed = strcmp(obs_data_get_string(settings, "resolution"), "fixed") == 0;
	obs_property_set_visible(obs_properties_get(props, "width"), fixed);
	obs_property_set_visible(obs_properties_get(props, "height"), fixed);
	return true;
}

static bool refresh_clicked(obs_properties_t *props, obs_property_t *p, void *data)
{
	UNUSED_PARAMETER(props);
	UNUSED_PARAMETER(p);
	UNUSED_PARAMETER(data);
	return true; /* rebuild the properties: shows the current status */
}

static const char *settings_engine(struct ld_filter *f, char *out, size_t len)
{
	obs_data_t *settings = obs_source_get_settings(f->self);
	snprintf(out, len, "%s", settings ? obs_data_get_string(settings, "engine") : "");
	obs_data_release(settings);
	return out;
}

/* A new engine picked in the dialog: the properties are rebuilt from its schema. */
static bool engine_changed(void *data, obs_properties_t *props, obs_property_t *p,
			   obs_data_t *settings)
{
	UNUSED_PARAMETER(props);
	UNUSED_PARAMETER(p);
	struct ld_filter *f = data;
	char engine[64];
	pthread_mutex_lock(&f->lock);
	schema_engine_locked(f, obs_data_get_string(settings, "engine"), engine, sizeof(engine));
	bool other = strcmp(engine, f->props_engine) != 0;
	pthread_mutex_unlock(&f->lock);
	if (other)
		obs_source_update_properties(f->self);
	return false;
}

/* The fixed set, for an engine whose schema is not known yet (never connected). */
static void add_fallback_properties(obs_properties_t *props)
{
	obs_properties_add_text(props, "p_prompt", T("Prompt"), OBS_TEXT_MULTILINE);
	obs_properties_add_text(props, "p_negative_prompt", T("NegativePrompt"), OBS_TEXT_DEFAULT);
	obs_property_t *seed = obs_properties_add_int(props, "p_seed", T("Seed"), 0, 2147483647, 1);
	obs_property_set_long_description(seed, T("Seed.Description"));
	obs_properties_add_float_slider(props, "p_strength", T("Strength"), 0.0, 1.0, 0.01);
	obs_property_t *steps = obs_properties_add_int_slider(props, "p_steps", T("Steps"), 1, 4, 1);
	obs_property_set_long_description(steps, T("Steps.Description"));
}

/* The engine's parameters, one property each, from its schema (ld_schema_props); the list
 * kinds are named in `listed` for the Extra field's tooltip. The schema's defaults become the
 * settings' defaults, so that an untouched property shows the engine's value. */
static void add_engine_properties(struct ld_filter *f, obs_properties_t *props, char *listed,
				  size_t len)
{
	ld_prop *pp = bzalloc(sizeof(ld_prop) * LD_PROP_MAX);
	char chosen[64], engine[64];
	int n = -1;
	if (f) {
		settings_engine(f, chosen, sizeof(chosen));
		pthread_mutex_lock(&f->lock);
		schema_engine_locked(f, chosen, engine, sizeof(engine));
		n = schema_props_locked(f, engine, pp, LD_PROP_MAX);
		snprintf(f->props_engine, sizeof(f->props_engine), "%s", n >= 0 ? engine : "");
		pthread_mutex_unlock(&f->lock);
	}
	if (n < 0) {
		add_fallback_properties(props);
		bfree(pp);
		return;
	}
	obs_data_t *settings = obs_source_get_settings(f->self);
	size_t used = 0;
	for (int i = 0; i < n; i++) {
		const ld_prop *p = &pp[i];
		obs_property_t *prop = NULL;
		switch (p->widget) {
		case LD_W_FLOAT_SLIDER:
		case LD_W_FLOAT:
			prop = p->widget == LD_W_FLOAT_SLIDER
				       ? obs_properties_add_float_slider(props, p->key, p->label, p->lo,
									 p->hi, p->step)
				       : obs_properties_add_float(props, p->key, p->label, p->lo, p->hi,
								  p->step);
			obs_data_set_default_double(settings, p->key, p->def_f);
			break;
		case LD_W_INT_SLIDER:
		case LD_W_INT:
			prop = p->widget == LD_W_INT_SLIDER
				       ? obs_properties_add_int_slider(props, p->key, p->label, (int)p->lo,
								       (int)p->hi, 1)
				       : obs_properties_add_int(props, p->key, p->label, (int)p->lo,
								(int)p->hi, 1);
			obs_data_set_default_int(settings, p->key, p->def_i);
			break;
		case LD_W_BOOL:
			prop = obs_properties_add_bool(props, p->key, p->label);
			obs_data_set_default_bool(settings, p->key, p->def_i != 0);
			break;
		case LD_W_LIST:
			prop = obs_properties_add_list(props, p->key, p->label, OBS_COMBO_TYPE_LIST,
						       OBS_COMBO_FORMAT_STRING);
			for (int j = 0; j < p->nchoices; j++)
				obs_property_list_add_string(prop, p->choices[j], p->choices[j]);
			obs_data_set_default_string(settings, p->key, p->def_s);
			break;
		case LD_W_TEXT:
		case LD_W_TEXT_MULTILINE:
			prop = obs_properties_add_text(props, p->key, p->label,
						       p->widget == LD_W_TEXT ? OBS_TEXT_DEFAULT
									      : OBS_TEXT_MULTILINE);
			/* no default: an empty prompt keeps the engine's own (its default in the tooltip) */
			break;
		default: { /* a list kind: through Extra */
			int w = snprintf(listed + used, len - used, "%s%s", used ? ", " : "", p->name);
			if (w > 0 && (size_t)w < len - used)
				used += (size_t)w;
			break;
		}
		}
		if (!prop)
			continue;
		char tip[LD_PROP_TEXT_MAX + 480];
		if ((p->widget == LD_W_TEXT || p->widget == LD_W_TEXT_MULTILINE) && p->def_s[0])
			snprintf(tip, sizeof(tip), "%s (%s: %s)", p->tooltip, T("EngineDefault"), p->def_s);
		else
			snprintf(tip, sizeof(tip), "%s", p->tooltip);
		obs_property_set_long_description(prop, tip);
	}
	if (used && used < len) {
		char head[64];
		snprintf(head, sizeof(head), "%s ", T("Extra.Lists"));
		size_t h = strlen(head);
		if (used + h < len) {
			memmove(listed + h, listed, used + 1);
			memcpy(listed, head, h);
		}
	}
	obs_data_release(settings);
	bfree(pp);
}

static bool recall_clicked(obs_properties_t *props, obs_property_t *p, void *data)
{
	UNUSED_PARAMETER(props);
	UNUSED_PARAMETER(p);
	struct ld_filter *f = data;
	obs_data_t *settings = obs_source_get_settings(f->self);
	queue_recall(f, obs_data_get_string(settings, "preset"));
	obs_data_release(settings);
	return false;
}

static bool refresh_presets_clicked(obs_properties_t *props, obs_property_t *p, void *data)
{
	UNUSED_PARAMETER(props);
	UNUSED_PARAMETER(p);
	struct ld_filter *f = data;
	pthread_mutex_lock(&f->lock);
	f->presets_refresh = true; /* the new list rebuilds the properties when it arrives */
	pthread_mutex_unlock(&f->lock);
	return false;
}

/* Preset list, Recall, Refresh and the transition time. */
static void add_preset_properties(struct ld_filter *f, obs_properties_t *props)
{
	obs_property_t *list = obs_properties_add_list(props, "preset", T("Preset"),
						       OBS_COMBO_TYPE_LIST, OBS_COMBO_FORMAT_STRING);
	obs_property_set_long_description(list, T("Preset.Description"));
	char *names = bzalloc(PRESETS_LEN);
	if (f) {
		pthread_mutex_lock(&f->lock);
		memcpy(names, f->presets, PRESETS_LEN);
		pthread_mutex_unlock(&f->lock);
	}
	for (char *n = names; *n;) {
		char *nl = strchr(n, '\n');
		if (!nl)
			break;
		*nl = '\0';
		obs_property_list_add_string(list, n, n);
		n = nl + 1;
	}
	bfree(names);
	obs_properties_add_button(props, "recall_preset", T("RecallPreset"), recall_clicked);
	obs_properties_add_button(props, "refresh_presets", T("RefreshPresets"),
				  refresh_presets_clicked);
	obs_property_t *tr = obs_properties_add_float(props, "transition", T("Transition"), 0.0,
						      600.0, 0.1);
	obs_property_set_long_description(tr, T("Transition.Description"));
}

static obs_properties_t *filter_properties(void *data)
{
	struct ld_filter *f = data;
	obs_properties_t *props = obs_properties_create();
	obs_properties_add_text(props, "status", T("Status"), OBS_TEXT_INFO);
	obs_properties_add_button(props, "refresh", T("RefreshStatus"), refresh_clicked);
	obs_properties_add_text(props, "endpoint", T("Endpoint"), OBS_TEXT_DEFAULT);
	obs_property_t *keys = obs_properties_add_path(props, "keys_dir", T("KeysDir"),
						       OBS_PATH_DIRECTORY, NULL, NULL);
	obs_property_set_long_description(keys, T("KeysDir.Description"));

	obs_property_t *engine = obs_properties_add_list(props, "engine", T("Engine"),
							 OBS_COMBO_TYPE_EDITABLE,
							 OBS_COMBO_FORMAT_STRING);
	obs_property_list_add_string(engine, T("EngineAuto"), "auto");
	char engines[512] = "";
	if (f) {
		pthread_mutex_lock(&f->lock);
		snprintf(engines, sizeof(engines), "%s", f->engines);
		pthread_mutex_unlock(&f->lock);
	}
	if (engines[0]) { /* what the daemon offers */
		for (char *e = engines; e && *e;) {
			char *comma = strchr(e, ',');
			if (comma)
				*comma = '\0';
			obs_property_list_add_string(engine, e, e);
			e = comma ? comma + 1 : NULL;
		}
	} else {
		for (int i = 0; LD_PREFERRED_ENGINES[i]; i++)
			obs_property_list_add_string(engine, LD_PREFERRED_ENGINES[i],
						     LD_PREFERRED_ENGINES[i]);
	}

	obs_property_set_modified_callback2(engine, engine_changed, f);
	char listed[512] = "";
	add_engine_properties(f, props, listed, sizeof(listed));
	add_preset_properties(f, props);

	obs_property_t *res = obs_properties_add_list(props, "resolution", T("Resolution"),
						      OBS_COMBO_TYPE_LIST, OBS_COMBO_FORMAT_STRING);
	obs_property_list_add_string(res, T("Resolution.Follow"), "follow");
	obs_property_list_add_string(res, T("Resolution.Fixed"), "fixed");
	obs_property_set_modified_callback(res, resolution_changed);
	obs_properties_add_int(props, "width", T("Width"), 32, 4096, 8);
	obs_properties_add_int(props, "height", T("Height"), 32, 4096, 8);

	obs_property_t *extra = obs_properties_add_text(props, "extra", T("Extra"), OBS_TEXT_MULTILINE);
	char tip[768];
	snprintf(tip, sizeof(tip), "%s%s%s", T("Extra.Description"), listed[0] ? " " : "", listed);
	obs_property_set_long_description(extra, tip);
	obs_property_t *absent = obs_properties_add_list(props, "when_absent", T("WhenAbsent"),
							 OBS_COMBO_TYPE_LIST, OBS_COMBO_FORMAT_STRING);
	obs_property_list_add_string(absent, T("WhenAbsent.Source"), "source");
	obs_property_list_add_string(absent, T("WhenAbsent.Last"), "last");
	obs_properties_add_bool(props, "bypass", T("Bypass"));
	return props;
}

/* ---- life cycle ------------------------------------------------------------------------------ */

static const char *filter_name(void *unused)
{
	UNUSED_PARAMETER(unused);
	return T("LivediffusionFilter");
}

static void *filter_create(obs_data_t *settings, obs_source_t *source)
{
	struct ld_filter *f = bzalloc(sizeof(struct ld_filter));
	f->self = source;
	f->settings = bzalloc(sizeof(ld_settings));
	pthread_mutex_init(&f->lock, NULL);
	filter_update(f, settings);
	if (pthread_create(&f->thread, NULL, worker_main, f) == 0)
		f->thread_started = true;
	else
		blog(LOG_ERROR, "[livediffusion] could not start the worker thread");
	return f;
}

static void filter_destroy(void *data)
{
	struct ld_filter *f = data;
	unregister_hotkeys(f);
	os_atomic_set_bool(&f->stop, true);
	if (f->thread_started)
		pthread_join(f->thread, NULL);
	obs_enter_graphics();
	gs_texrender_destroy(f->render);
	gs_stagesurface_destroy(f->stage[0]);
	gs_stagesurface_destroy(f->stage[1]);
	gs_texture_destroy(f->out_tex);
	obs_leave_graphics();
	pthread_mutex_destroy(&f->lock);
	bfree(f->in.p);
	bfree(f->out.p);
	bfree(f->grab.p);
	bfree(f->shown.p);
	for (int i = 0; i < MAX_ENGINES; i++)
		bfree(f->schemas[i].buf);
	bfree(f->settings);
	bfree(f);
}

static void write_status(struct ld_filter *f)
{
	char status[512];
	pthread_mutex_lock(&f->lock);
	snprintf(status, sizeof(status), "%s", f->status);
	long long latency = (long long)(f->latency_ms + 0.5);
	pthread_mutex_unlock(&f->lock);
	if (strcmp(status, f->status_written) == 0)
		return;
	snprintf(f->status_written, sizeof(f->status_written), "%s", status);
	/* Kept in the settings: the properties show it, obs-websocket's GetSourceFilter reads it.
	 * Other threads may read the settings meanwhile (obs_data has no lock): padded to one
	 * length, the string is rewritten in place and never reallocated under a reader. */
	char padded[STATUS_LEN + 1];
	snprintf(padded, sizeof(padded), "%-*.*s", STATUS_LEN, STATUS_LEN, status);
	obs_data_t *settings = obs_source_get_settings(f->self);
	obs_data_set_string(settings, "status", padded);
	obs_data_set_int(settings, "latency_ms", latency); /* for livediffusion obs sync */
	obs_data_release(settings);
}

/* One log line per engine parameter property the filter shows (what the schema became). */
static void log_properties(struct ld_filter *f, const char *engine)
{
	obs_properties_t *props = obs_source_properties(f->self);
	if (!props)
		return;
	obs_property_t *p = obs_properties_first(props);
	for (; p; obs_property_next(&p)) {
		const char *name = obs_property_name(p);
		const char *tip = obs_property_long_description(p);
		if (strncmp(name, "p_", 2) != 0)
			continue;
		switch (obs_property_get_type(p)) {
		case OBS_PROPERTY_FLOAT:
			blog(LOG_INFO, "[livediffusion] %s property %s: float %g..%g step %g | %s",
			     engine, name, obs_property_float_min(p), obs_property_float_max(p),
			     obs_property_float_step(p), tip ? tip : "");
			break;
		case OBS_PROPERTY_INT:
			blog(LOG_INFO, "[livediffusion] %s property %s: int %d..%d | %s", engine, name,
			     obs_property_int_min(p), obs_property_int_max(p), tip ? tip : "");
			break;
		default:
			blog(LOG_INFO, "[livediffusion] %s property %s: type %d | %s", engine, name,
			     (int)obs_property_get_type(p), tip ? tip : "");
		}
	}
	obs_properties_destroy(props);
}

static void filter_tick(void *data, float seconds)
{
	UNUSED_PARAMETER(seconds);
	struct ld_filter *f = data;
	f->captured_this_tick = false;

	char name[200];
	stream_name_for(f, name, sizeof(name));
	if (strcmp(name, f->stream_name) != 0) { /* added to a source, or renamed */
		pthread_mutex_lock(&f->lock); /* filter_update reads it on the UI thread */
		snprintf(f->stream_name, sizeof(f->stream_name), "%s", name);
		pthread_mutex_unlock(&f->lock);
		obs_data_t *settings = obs_source_get_settings(f->self);
		filter_update(f, settings);
		obs_data_release(settings);
	}
	uint64_t now = os_gettime_ns();
	if (now - f->status_written_ns >= STATUS_EVERY_NS) {
		f->status_written_ns = now;
		write_status(f);
	}

	/* a new schema, engine or preset list: properties, parameters and hotkeys follow */
	char engine[64], *names = NULL;
	obs_source_t *parent = obs_filter_get_parent(f->self);
	bool moved = parent != f->hotkey_parent;
	if (moved) { /* added to a source, or to another one */
		unregister_hotkeys(f);
		f->hotkey_parent = parent;
	}
	pthread_mutex_lock(&f->lock);
	unsigned schema_gen = f->schema_gen, presets_gen = f->presets_gen;
	snprintf(engine, sizeof(engine), "%s", f->engine_now);
	if ((presets_gen != f->presets_seen || moved) && parent)
		names = bmemdup(f->presets, PRESETS_LEN);
	pthread_mutex_unlock(&f->lock);
	bool schema_new = schema_gen != f->schema_seen || strcmp(engine, f->engine_seen) != 0;
	if (schema_new) {
		f->schema_seen = schema_gen;
		snprintf(f->engine_seen, sizeof(f->engine_seen), "%s", engine);
		obs_data_t *settings = obs_source_get_settings(f->self);
		filter_update(f, settings); /* typed (and aliases moved) by the schema now */
		obs_data_release(settings);
		if (engine[0])
			log_properties(f, engine);
	}
	if (names) {
		int count = 0;
		for (const char *p = names; (p = strchr(p, '\n')) != NULL; p++)
			count++;
		blog(LOG_INFO, "[livediffusion] '%s': %d preset(s) in the daemon",
		     obs_source_get_name(f->self), count);
		f->presets_seen = presets_gen;
		sync_hotkeys(f, names);
		bfree(names);
	}
	if (schema_new || names)
		obs_source_update_properties(f->self);
}

/* ---- rendering --------------------------------------------------------------------------------- */

/* Renders the target at pw x ph and passes the previous frame's pixels to the worker
 * (two staging surfaces, so that mapping never waits for this frame's copy). */
static void capture(struct ld_filter *f, obs_source_t *target, obs_source_t *parent,
		    uint32_t sw, uint32_t sh, uint32_t pw, uint32_t ph)
{
	uint32_t flags = obs_source_get_output_flags(target);
	/* A source with filters renders with whatever effect is active when its filter chain
	 * asks for it; a plain (not custom-draw, not async) parent needs the default one. */
	bool default_effect = target == parent && !(flags & OBS_SOURCE_CUSTOM_DRAW) &&
			      !(flags & OBS_SOURCE_ASYNC);
	if (!f->render)
		f->render = gs_texrender_create(GS_BGRA, GS_ZS_NONE);
	gs_texrender_reset(f->render);
	if (!gs_texrender_begin(f->render, pw, ph))
		return;
	struct vec4 clear;
	vec4_zero(&clear);
	gs_clear(GS_CLEAR_COLOR, &clear, 0.0f, 0);
	gs_ortho(0.0f, (float)sw, 0.0f, (float)sh, -100.0f, 100.0f);
	gs_blend_state_push();
	gs_blend_function(GS_BLEND_ONE, GS_BLEND_ZERO);
	if (default_effect) {
		obs_source_default_render(target);
	} else {
		obs_source_video_render(target);
	}
	gs_blend_state_pop();
	gs_texrender_end(f->render);

	if (f->stage_w != pw || f->stage_h != ph) {
		for (int i = 0; i < 2; i++) {
			gs_stagesurface_destroy(f->stage[i]);
			f->stage[i] = gs_stagesurface_create(pw, ph, GS_BGRA);
			f->staged[i] = false;
		}
		f->stage_w = pw;
		f->stage_h = ph;
	}
	int cur = f->stage_next, prev = cur ^ 1;
	f->stage_next = prev;
	gs_stage_texture(f->stage[cur], gs_texrender_get_texture(f->render));
	f->staged[cur] = true;
	int take = f->staged[prev] ? prev : cur;

	uint8_t *data;
	uint32_t linesize;
	if (!gs_stagesurface_map(f->stage[take], &data, &linesize))
		return;
	if (pixbuf_fit(&f->grab, pw, ph)) {
		for (uint32_t y = 0; y < ph; y++)
			memcpy(f->grab.p + (size_t)y * pw * 4, data + (size_t)y * linesize,
			       (size_t)pw * 4);
		pthread_mutex_lock(&f->lock);
		struct pixbuf t = f->in;
		f->in = f->grab;
		f->grab = t;
		f->in_new = true;
		pthread_mutex_unlock(&f->lock);
	}
	gs_stagesurface_unmap(f->stage[take]);
}

static void upload_output(struct ld_filter *f)
{
	bool fresh = false;
	pthread_mutex_lock(&f->lock);
	if (f->out_new) {
		struct pixbuf t = f->shown;
		f->shown = f->out;
		f->out = t;
		f->out_new = false;
		fresh = true;
	}
	pthread_mutex_unlock(&f->lock);
	if (!fresh)
		return;
	if (!f->out_tex || f->tex_w != f->shown.w || f->tex_h != f->shown.h) {
		gs_texture_destroy(f->out_tex);
		f->out_tex = gs_texture_create(f->shown.w, f->shown.h, GS_BGRA, 1, NULL, GS_DYNAMIC);
		f->tex_w = f->shown.w;
		f->tex_h = f->shown.h;
	}
	if (f->out_tex) {
		gs_texture_set_image(f->out_tex, f->shown.p, f->shown.w * 4, false);
		f->out_time_ns = os_gettime_ns();
	}
}

static void filter_render(void *data, gs_effect_t *effect)
{
	UNUSED_PARAMETER(effect);
	struct ld_filter *f = data;
	obs_source_t *target = obs_filter_get_target(f->self);
	obs_source_t *parent = obs_filter_get_parent(f->self);
	uint32_t w = target ? obs_source_get_base_width(target) : 0;
	uint32_t h = target ? obs_source_get_base_height(target) : 0;

	pthread_mutex_lock(&f->lock);
	bool bypass = f->bypass, show_last = f->show_last, streaming = f->streaming;
	uint32_t pw = f->proc_w, ph = f->proc_h;
	f->src_w = w;
	f->src_h = h;
	pthread_mutex_unlock(&f->lock);

	if (!target || !parent || !w || !h || bypass) {
		obs_source_skip_video_filter(f->self);
		return;
	}
	if (!f->captured_this_tick) {
		f->captured_this_tick = true;
		if (streaming && pw && ph)
			capture(f, target, parent, w, h, pw, ph);
		upload_output(f);
	}
	bool fresh = f->out_tex && os_gettime_ns() - f->out_time_ns < STALE_NS;
	if (!f->out_tex || !((streaming && fresh) || show_last)) {
		obs_source_skip_video_filter(f->self); /* the source, unchanged */
		return;
	}
	gs_effect_t *eff = obs_get_base_effect(OBS_EFFECT_DEFAULT);
	gs_eparam_t *image = gs_effect_get_param_by_name(eff, "image");
	gs_effect_set_texture(image, f->out_tex);
	while (gs_effect_loop(eff, "Draw"))
		gs_draw_sprite(f->out_tex, 0, w, h);
}

static struct obs_source_info livediffusion_filter = {
	.id = "livediffusion_filter",
	.type = OBS_SOURCE_TYPE_FILTER,
	.output_flags = OBS_SOURCE_VIDEO,
	.get_name = filter_name,
	.create = filter_create,
	.destroy = filter_destroy,
	.update = filter_update,
	.get_defaults = filter_defaults,
	.get_properties = filter_properties,
	.video_tick = filter_tick,
	.video_render = filter_render,
};

bool obs_module_load(void)
{
	obs_register_source(&livediffusion_filter);
	blog(LOG_INFO, "[livediffusion] filter loaded (protocol 1)");
	return true;
}
