/*
 * Remote context (slurmstepd on the node). For the batch step of a job that used
 * --stage-in/--stage-out:
 *   user_init  runs `HELPER env --job ID --node NAME --timeout T [--config FILE]` as the
 *              job's user and waits for it (the helper asks the daemon to fetch what is
 *              missing on this node and waits until it is there). On success it sets
 *              HPCSTAGE_DIR in the job's environment from the helper's
 *              `export HPCSTAGE_DIR=...` line.
 *   task_init  runs in the task, whose stderr is the job's error file: if the helper
 *              failed, write its message there and fail the task, so the job ends FAILED
 *              before its first line.
 * Other steps (srun inside the job, the extern step) and jobs without the options are left
 * alone.
 */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common.h"
#include "run.h"

#define HS_ENV_VALUE 4096
#define HS_GRACE 15 /* seconds after --timeout before the helper is killed */

static char failure[HS_MSG_LEN]; /* set by user_init, reported by task_init */

/* Where sbatch leaves our options' values in the job's environment. */
static const char *const option_env[] = {
	"_SLURM_SPANK_OPTION_hpcstage_stage_in",
	"_SLURM_SPANK_OPTION_hpcstage_stage_out",
	"SLURM_SPANK__SLURM_SPANK_OPTION_hpcstage_stage_in",
	"SLURM_SPANK__SLURM_SPANK_OPTION_hpcstage_stage_out",
	NULL
};

struct job_facts {
	uint32_t job_id;
	uint32_t step_id;
	uid_t uid;
	gid_t gid;
	gid_t *groups;
	int ngroups;
	const char *node;
};

/* Record why the job cannot start (task_init prints it to the job's stderr) and log it. */
__attribute__((format(printf, 1, 2)))
static void set_failure(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(failure, sizeof(failure), fmt, ap);
	va_end(ap);
	/* Info, not error: slurmstepd copies errors into the job's stderr, and task_init
	 * writes the message there already. */
	slurm_info("%s", failure);
}

#define fail_job(job_id, fmt, ...) \
	set_failure(HS_PREFIX "job %u cannot start: " fmt, job_id, ##__VA_ARGS__)

/*
 * Did the job use our options? slurmstepd replays them from the job's environment
 * (_SLURM_SPANK_OPTION_hpcstage_*, written by sbatch). With --export=NONE only the copy that
 * Slurm makes of the job's spank_job_env is there (SLURM_SPANK__SLURM_SPANK_OPTION_...).
 * SLURM_SPANK_HPCSTAGE_STAGE_* is no sign: a job submitted from inside another inherits it.
 */
static int job_wants_staging(spank_t sp)
{
	char value[8];

	if (hs_options_seen_remote())
		return 1;
	for (int i = 0; i < 2; i++) {
		spank_err_t rc = spank_getenv(sp, option_env[2 + i], value, sizeof(value));
		if (rc == ESPANK_SUCCESS || rc == ESPANK_NOSPACE)
			return 1;
	}
	return 0;
}

/*
 * sbatch put the options' last values in the job's environment, where an sbatch or salloc
 * run inside the job would take them as its own: a follow-up job must not inherit them.
 */
static void forget_options(spank_t sp)
{
	for (int i = 0; option_env[i] != NULL; i++)
		spank_unsetenv(sp, option_env[i]);
}

static int get_facts(spank_t sp, struct job_facts *f)
{
	memset(f, 0, sizeof(*f));
	if (spank_get_item(sp, S_JOB_ID, &f->job_id) != ESPANK_SUCCESS ||
	    spank_get_item(sp, S_JOB_STEPID, &f->step_id) != ESPANK_SUCCESS ||
	    spank_get_item(sp, S_JOB_UID, &f->uid) != ESPANK_SUCCESS ||
	    spank_get_item(sp, S_JOB_GID, &f->gid) != ESPANK_SUCCESS) {
		hs_error("cannot read the job's id, step, uid or gid from Slurm");
		return -1;
	}
	if (spank_get_item(sp, S_JOB_SUPPLEMENTARY_GIDS, &f->groups, &f->ngroups) !=
	    ESPANK_SUCCESS) {
		f->groups = NULL;
		f->ngroups = 0;
	}
	f->node = getenv("SLURMD_NODENAME"); /* slurmstepd sets it in its own environment */
	return 0;
}

/* "NAME=value" from the job's environment, into slot; NULL when unset. */
static char *job_env(spank_t sp, const char *name, char *slot, size_t len)
{
	size_t n = (size_t)snprintf(slot, len, "%s=", name);

	if (n >= len || spank_getenv(sp, name, slot + n, (int)(len - n)) != ESPANK_SUCCESS)
		return NULL;
	return slot;
}

struct helper_call {
	char *argv[12];
	char *envp[12];
	char job[16], timeout[16];
	char env_slots[8][HS_ENV_VALUE]; /* one per name in build_call's passed[] */
	char node_env[HS_MAX_PATH], job_env_var[32];
};

static void build_call(spank_t sp, const struct hs_args *args, const struct job_facts *f,
		       struct helper_call *c)
{
	/* SLURM_RESTART_COUNT: a re-run of a requeued job waits until the daemon has seen it. */
	static const char *const passed[] = {
		"HOME", "USER", "LOGNAME", "LANG", "HPCSTAGE_CONFIG", "HPCSTAGE_API", "SLURM_CONF",
		"SLURM_RESTART_COUNT", NULL
	};
	int a = 0, e = 0;

	snprintf(c->job, sizeof(c->job), "%u", f->job_id);
	snprintf(c->timeout, sizeof(c->timeout), "%u", args->timeout);
	c->argv[a++] = (char *)args->helper;
	c->argv[a++] = "env";
	c->argv[a++] = "--job";
	c->argv[a++] = c->job;
	c->argv[a++] = "--node";
	c->argv[a++] = (char *)f->node;
	c->argv[a++] = "--timeout";
	c->argv[a++] = c->timeout;
	if (args->config[0] != '\0') {
		c->argv[a++] = "--config";
		c->argv[a++] = (char *)args->config;
	}
	c->argv[a] = NULL;
	/* A fixed environment: the job's PATH, PYTHONPATH etc. must not steer the helper. */
	c->envp[e++] = "PATH=/usr/local/bin:/usr/bin:/bin";
	for (int i = 0; passed[i] != NULL; i++)
		if (job_env(sp, passed[i], c->env_slots[i], sizeof(c->env_slots[i])) != NULL)
			c->envp[e++] = c->env_slots[i];
	snprintf(c->job_env_var, sizeof(c->job_env_var), "SLURM_JOB_ID=%u", f->job_id);
	snprintf(c->node_env, sizeof(c->node_env), "SLURMD_NODENAME=%s", f->node);
	c->envp[e++] = c->job_env_var;
	c->envp[e++] = c->node_env;
	c->envp[e] = NULL;
}

static void report(const struct job_facts *f, const struct hs_args *args,
		   const struct hs_result *res)
{
	if (res->timed_out)
		fail_job(f->job_id, "inputs not ready on %s after %us (the helper was stopped)",
			 f->node, args->timeout + HS_GRACE);
	else if (strncmp(res->last_err, HS_PREFIX, strlen(HS_PREFIX)) == 0)
		set_failure("%s", res->last_err); /* the helper's message names the job already */
	else if (res->last_err[0] != '\0')
		fail_job(f->job_id, "the helper %s failed: %s", args->helper, res->last_err);
	else
		fail_job(f->job_id, "the helper %s exited with status %d and no message",
			 args->helper, WIFEXITED(res->status) ? WEXITSTATUS(res->status) : -1);
}

static int stage(spank_t sp, const struct hs_args *args, const struct job_facts *f)
{
	struct helper_call *c = calloc(1, sizeof(*c));
	struct hs_result *res = calloc(1, sizeof(*res));
	char dir[HS_MAX_PATH];
	char mounts[2 * HS_MAX_PATH + 2];
	int rc = -1;

	if (c == NULL || res == NULL) {
		fail_job(f->job_id, "out of memory");
		goto done;
	}
	build_call(sp, args, f, c);
	struct hs_cmd cmd = { c->argv, c->envp, f->uid, f->gid, f->groups,
			      (size_t)(f->ngroups > 0 ? f->ngroups : 0), args->timeout + HS_GRACE };
	hs_verbose("job %u: waiting for inputs on %s (%s env, timeout %us)", f->job_id, f->node,
		   args->helper, args->timeout);
	if (hs_run(&cmd, res) < 0) {
		fail_job(f->job_id, "cannot run the helper %s", args->helper);
		goto done;
	}
	if (res->timed_out || !WIFEXITED(res->status) || WEXITSTATUS(res->status) != 0) {
		report(f, args, res);
		goto done;
	}
	if (hs_find_export(res->out, "HPCSTAGE_DIR", dir, sizeof(dir)) < 0) {
		fail_job(f->job_id, "the helper %s printed no `export HPCSTAGE_DIR=...` line",
			 args->helper);
		goto done;
	}
	if (spank_setenv(sp, "HPCSTAGE_DIR", dir, 1) != ESPANK_SUCCESS) {
		fail_job(f->job_id, "cannot set HPCSTAGE_DIR=%s in the job's environment", dir);
		goto done;
	}
	/* What a container must bind to read the inputs (docs/containers.md); optional: a
	 * helper of an older release prints none. */
	if (hs_find_export(res->out, "HPCSTAGE_MOUNTS", mounts, sizeof(mounts)) == 0 &&
	    spank_setenv(sp, "HPCSTAGE_MOUNTS", mounts, 1) != ESPANK_SUCCESS)
		hs_info("job %u: cannot set HPCSTAGE_MOUNTS in the job's environment", f->job_id);
	hs_info("job %u: inputs ready on %s, HPCSTAGE_DIR=%s", f->job_id, f->node, dir);
	rc = 0;
done:
	free(c);
	free(res);
	return rc;
}

int hs_remote_user_init(spank_t sp, const struct hs_args *args)
{
	struct job_facts f;

	if (!job_wants_staging(sp))
		return 0;
	if (get_facts(sp, &f) < 0)
		return -1;
	if (f.step_id != HS_BATCH_STEP)
		return 0;
	if (f.node == NULL || f.node[0] == '\0') {
		fail_job(f.job_id, "slurmstepd did not say which node this is (SLURMD_NODENAME)");
		return 0;
	}
	if (args->helper[0] == '\0') {
		fail_job(f.job_id, "the plugstack.conf line of the hpcstage plugin has no helper=");
		return 0;
	}
	/* A failure is reported by task_init, in the job's own stderr. */
	stage(sp, args, &f);
	forget_options(sp);
	return 0;
}

int hs_remote_task_init(spank_t sp)
{
	(void)sp;
	if (failure[0] == '\0')
		return 0;
	fprintf(stderr, "%s\n", failure);
	fflush(stderr);
	return -1;
}
