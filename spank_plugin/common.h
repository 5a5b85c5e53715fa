/*
 * hpcstage SPANK plugin: shared declarations.
 *
 * The plugin is a thin edge. It registers --stage-in/--stage-out, pre-checks their syntax
 * when a job is submitted, hands the values to Slurm (spank_job_control_setenv) and, on the
 * node, runs the hpcstage helper ("hpcstage env") that waits for the job's inputs. All
 * staging logic lives in the daemon and the helper.
 */
#ifndef HPCSTAGE_SPANK_COMMON_H
#define HPCSTAGE_SPANK_COMMON_H

#include <stddef.h>

#include <slurm/spank.h>

/* Every line this plugin logs starts with this prefix, whatever the context. */
#define HS_PREFIX "hpcstage: "
#define hs_error(fmt, ...) slurm_error(HS_PREFIX fmt, ##__VA_ARGS__)
#define hs_info(fmt, ...) slurm_info(HS_PREFIX fmt, ##__VA_ARGS__)
#define hs_verbose(fmt, ...) slurm_verbose(HS_PREFIX fmt, ##__VA_ARGS__)
#define hs_debug(fmt, ...) slurm_debug(HS_PREFIX fmt, ##__VA_ARGS__)

/* Job-control environment names: HPCSTAGE_STAGE_IN_<n>, HPCSTAGE_STAGE_OUT_<n>. */
#define HS_ENV_IN "HPCSTAGE_STAGE_IN_"
#define HS_ENV_OUT "HPCSTAGE_STAGE_OUT_"

/* Slurm's step id of a batch script (slurm.h's SLURM_BATCH_SCRIPT, stable since 20.11). */
#define HS_BATCH_STEP 0xfffffffbU

#define HS_MAX_PATH 4096
#define HS_MSG_LEN 2048

/* Plugstack.conf arguments (args.c). */
struct hs_args {
	char helper[HS_MAX_PATH];  /* hpcstage command run on the node ("" = not given) */
	char config[HS_MAX_PATH];  /* site config for the helper ("" = the job's HPCSTAGE_CONFIG) */
	unsigned int timeout;      /* seconds the helper may wait for the inputs */
};

int hs_args_parse(int ac, char **av, struct hs_args *args);

/* Option values given to sbatch/salloc/srun (options.c). */
enum hs_kind { HS_STAGE_IN = 0, HS_STAGE_OUT = 1 };

int hs_options_register(spank_t sp);
size_t hs_options_count(enum hs_kind kind);
const char *hs_options_value(enum hs_kind kind, size_t index);
int hs_options_seen_remote(void);
void hs_options_free(void);

/* One context each; dispatch.c chooses. */
int hs_allocator_post_opt(spank_t sp, int strict);
int hs_remote_user_init(spank_t sp, const struct hs_args *args);
int hs_remote_task_init(spank_t sp);

#endif
