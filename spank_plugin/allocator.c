/*
 * Allocator context (sbatch, salloc) and local context (srun): after option parsing, hand every value to Slurm as job-control environment
 * HPCSTAGE_STAGE_IN_<n> / HPCSTAGE_STAGE_OUT_<n>. slurmctld keeps them in the job's
 * spank_job_env, where job_submit.lua copies them into admin_comment for the daemon.
 * srun inside an allocation cannot change its job: there a failure is only logged.
 */
#include <stdio.h>

#include "common.h"

static int export_kind(spank_t sp, enum hs_kind kind, const char *prefix, int strict)
{
	char name[64];
	size_t count = hs_options_count(kind);

	for (size_t i = 0; i < count; i++) {
		spank_err_t rc;

		snprintf(name, sizeof(name), "%s%zu", prefix, i);
		rc = spank_job_control_setenv(sp, name, hs_options_value(kind, i), 1);
		if (rc != ESPANK_SUCCESS && !strict) {
			hs_debug("%s not passed (srun in an existing allocation?): %s", name,
				 spank_strerror(rc));
			return 0;
		}
		if (rc != ESPANK_SUCCESS) {
			hs_error("cannot pass %s to Slurm: %s", name, spank_strerror(rc));
			return -1;
		}
	}
	return 0;
}

int hs_allocator_post_opt(spank_t sp, int strict)
{
	if (hs_options_count(HS_STAGE_IN) + hs_options_count(HS_STAGE_OUT) == 0)
		return 0;
	if (export_kind(sp, HS_STAGE_IN, HS_ENV_IN, strict) < 0)
		return -1;
	if (export_kind(sp, HS_STAGE_OUT, HS_ENV_OUT, strict) < 0)
		return -1;
	hs_verbose("%zu --stage-in and %zu --stage-out value(s) passed to Slurm",
		   hs_options_count(HS_STAGE_IN), hs_options_count(HS_STAGE_OUT));
	return 0;
}
