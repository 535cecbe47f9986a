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

OBS_DECLARE_MODULE()
OBS_MODULE_USE_DEFAULT_LOCALE("livediffusion", "en-US")

#define T(s) obs_module_text(s)
#define STALE_NS 2000000000ULL /* an output older than this counts as "daemon slow" */
#define STATUS_EVERY_NS 1000000000ULL
#define STATUS_LEN 240 /* characters of the status kept in the settings */

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

	pthread_t thread;
	bool thread_started;
	volatile bool stop;
};

/* ---- the worker thread ------------------------------------------------------------------- */

static void *worker_main(void *data)
{
	struct ld_filter *f = data;
	os_set_thread_name("livediffusion-filter");
	ld_client *client = ld_client_new();
	ld_settings *local = bzalloc(sizeof(ld_settings));
	struct pixbuf frame = {0}, out = {0};
	uint64_t last_status = 0;

	while (!os_atomic_load_bool(&f->stop)) {
		bool dirty = false, have_frame = false;
		pthread_mutex_lock(&f->lock);
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
		ld_client_set_source_size(client, sw, sh);
		if (have_frame)
			ld_client_send_frame(client, frame.p, frame.w * 4, frame.w, frame.h);
		int fresh = ld_client_poll(client, 4);

		uint32_t ow = 0, oh = 0;
		uint64_t seq = 0;
		const uint8_t *px = fresh ? ld_client_output(client, &ow, &oh, &seq) : NULL;
		if (px && pixbuf_fit(&out, ow, oh))
			memcpy(out.p, px, (size_t)ow * oh * 4);

		uint64_t now = os_gettime_ns();
		pthread_mutex_lock(&f->lock);
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
	bfree(frame.p);
	bfree(out.p);
	bfree(local);
	return NULL;
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
	const char *prompt = obs_data_get_string(settings, "prompt");
	if (prompt && *prompt)
		add_param(s, "prompt", LD_P_STR, prompt, 0, 0);
	add_param(s, "negative_prompt", LD_P_STR, obs_data_get_string(settings, "negative_prompt"),
		  0, 0);
	int64_t seed = obs_data_get_int(settings, "seed");
	if (seed >= 0)
		add_param(s, "seed", LD_P_INT, NULL, seed, 0);
	add_param(s, "strength|noise_scale", LD_P_FLOAT, NULL, 0,
		  obs_data_get_double(settings, "strength"));
	int64_t steps = obs_data_get_int(settings, "steps");
	if (steps > 0)
		add_param(s, "steps", LD_P_INT, NULL, steps, 0);
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
	obs_data_set_default_string(settings, "prompt", "");
	obs_data_set_default_string(settings, "negative_prompt", "");
	obs_data_set_default_int(settings, "seed", 42);
	obs_data_set_default_double(settings, "strength", 0.5);
	obs_data_set_default_int(settings, "steps", 0);
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

	obs_properties_add_text(props, "prompt", T("Prompt"), OBS_TEXT_MULTILINE);
	obs_properties_add_text(props, "negative_prompt", T("NegativePrompt"), OBS_TEXT_DEFAULT);
	obs_property_t *seed = obs_properties_add_int(props, "seed", T("Seed"), -1, 2147483647, 1);
	obs_property_set_long_description(seed, T("Seed.Description"));
	obs_properties_add_float_slider(props, "strength", T("Strength"), 0.0, 1.0, 0.01);
	obs_property_t *steps = obs_properties_add_int_slider(props, "steps", T("Steps"), 0, 4, 1);
	obs_property_set_long_description(steps, T("Steps.Description"));

	obs_property_t *res = obs_properties_add_list(props, "resolution", T("Resolution"),
						      OBS_COMBO_TYPE_LIST, OBS_COMBO_FORMAT_STRING);
	obs_property_list_add_string(res, T("Resolution.Follow"), "follow");
	obs_property_list_add_string(res, T("Resolution.Fixed"), "fixed");
	obs_property_set_modified_callback(res, resolution_changed);
	obs_properties_add_int(props, "width", T("Width"), 32, 4096, 8);
	obs_properties_add_int(props, "height", T("Height"), 32, 4096, 8);

	obs_property_t *extra = obs_properties_add_text(props, "extra", T("Extra"), OBS_TEXT_MULTILINE);
	obs_property_set_long_description(extra, T("Extra.Description"));
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
