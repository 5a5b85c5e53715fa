/*
 * --stage-in / --stage-out: registered from slurm_spank_init so that sbatch accepts them on
 * its command line and in #SBATCH lines. Both are repeatable: every value is kept (Slurm
 * calls the callback once per occurrence), in order, without exact duplicates.
 */
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "validate.h"

struct value_list {
	char **items;
	size_t count;
};

static struct value_list values[2];
static int seen_remote;

static const char *option_name(enum hs_kind kind)
{
	return kind == HS_STAGE_IN ? "stage-in" : "stage-out";
}

static int keep(enum hs_kind kind, const char *value)
{
	struct value_list *list = &values[kind];
	char **grown;

	for (size_t i = 0; i < list->count; i++)
		if (strcmp(list->items[i], value) == 0)
			return 0;
	if (values[0].count + values[1].count >= HS_MAX_DIRECTIVES) {
		hs_error("more than %d --stage-in/--stage-out values in one job", HS_MAX_DIRECTIVES);
		return -1;
	}
	grown = realloc(list->items, (list->count + 1) * sizeof(*grown));
	if (grown == NULL)
		goto fail;
	list->items = grown;
	list->items[list->count] = strdup(value);
	if (list->items[list->count] == NULL)
		goto fail;
	list->count++;
	return 0;
fail:
	hs_error("out of memory");
	return -1;
}

static int on_option(enum hs_kind kind, const char *optarg, int remote)
{
	const char *why;

	if (remote) {
		/* slurmstepd: only whether the job used the option matters here. */
		seen_remote = 1;
		return 0;
	}
	if (optarg == NULL) {
		hs_error("--%s needs a value", option_name(kind));
		return -1;
	}
	why = kind == HS_STAGE_IN ? hs_check_stage_in(optarg) : hs_check_stage_out(optarg);
	if (why != NULL) {
		hs_error("invalid --%s=%s: %s", option_name(kind), optarg, why);
		return -1;
	}
	return keep(kind, optarg);
}

static int on_stage_in(int val, const char *optarg, int remote)
{
	(void)val;
	return on_option(HS_STAGE_IN, optarg, remote);
}

static int on_stage_out(int val, const char *optarg, int remote)
{
	(void)val;
	return on_option(HS_STAGE_OUT, optarg, remote);
}

static struct spank_option stage_in_option = {
	"stage-in", "SRC[:DEST]",
	"Stage SRC (s3://BUCKET/KEY, s3://BUCKET/PREFIX/ or an absolute path) into "
	"$HPCSTAGE_DIR/DEST before the job starts (hpcstage; repeatable).",
	1, 0, on_stage_in
};

static struct spank_option stage_out_option = {
	"stage-out", "SRC:DEST[:FLAGS]",
	"Copy $HPCSTAGE_DIR/SRC to DEST (s3://BUCKET/PREFIX/) after the job; FLAGS: "
	"on=always|success|failure, optional, pack (hpcstage; repeatable).",
	1, 1, on_stage_out
};

int hs_options_register(spank_t sp)
{
	spank_err_t rc = spank_option_register(sp, &stage_in_option);

	if (rc == ESPANK_SUCCESS)
		rc = spank_option_register(sp, &stage_out_option);
	if (rc != ESPANK_SUCCESS) {
		hs_error("cannot register --stage-in/--stage-out: %s", spank_strerror(rc));
		return -1;
	}
	return 0;
}

size_t hs_options_count(enum hs_kind kind)
{
	return values[kind].count;
}

const char *hs_options_value(enum hs_kind kind, size_t index)
{
	return index < values[kind].count ? values[kind].items[index] : NULL;
}

int hs_options_seen_remote(void)
{
	return seen_remote;
}

void hs_options_free(void)
{
	for (int k = 0; k < 2; k++) {
		for (size_t i = 0; i < values[k].count; i++)
			free(values[k].items[i]);
		free(values[k].items);
		values[k].items = NULL;
		values[k].count = 0;
	}
}
