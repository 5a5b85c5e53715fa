/*
 * Run the node-side helper: fork, switch to the job's user, exec with a fixed environment,
 * capture stdout and the last line of stderr, kill the whole process group at the deadline.
 * No Slurm dependency.
 */
#ifndef HPCSTAGE_SPANK_RUN_H
#define HPCSTAGE_SPANK_RUN_H

#include <stddef.h>
#include <sys/types.h>

#define HS_OUT_LEN 8192
#define HS_LINE_LEN 2048

struct hs_cmd {
	char *const *argv;      /* argv[0]: absolute path */
	char *const *envp;
	uid_t uid;              /* switched to in the child when it runs as root */
	gid_t gid;
	const gid_t *groups;
	size_t ngroups;
	unsigned int timeout;   /* seconds, then SIGKILL to the process group */
};

struct hs_result {
	int status;             /* waitpid() status */
	int timed_out;
	char out[HS_OUT_LEN];   /* stdout, NUL-terminated, truncated */
	char last_err[HS_LINE_LEN]; /* last non-empty line of stderr */
};

/* 0 when the helper ran (see res->status), -1 when it could not be started (errno). */
int hs_run(const struct hs_cmd *cmd, struct hs_result *res);

/* Value of the line `export NAME=VALUE` in `out`, shell-unquoted into buf; 0 or -1. */
int hs_find_export(const char *out, const char *name, char *buf, size_t len);

#endif
