/*
 * Unit tests of the parts of the plugin that need no Slurm: the option pre-check, the
 * helper runner (output capture, deadline) and the reading of the helper's export line.
 * Run with `make test`; prints "N passed, N failed".
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "run.h"
#include "validate.h"

static int passed, failed;

#define CHECK(cond)                                                          \
	do {                                                                 \
		if (cond) {                                                  \
			passed++;                                            \
		} else {                                                     \
			failed++;                                            \
			fprintf(stderr, "%s:%d: FAILED: %s\n", __FILE__,     \
				__LINE__, #cond);                            \
		}                                                            \
	} while (0)

static void test_stage_in(void)
{
	static const char *const good[] = {
		"s3://datasets/ligands/", "s3://datasets/receptor.pdb:inputs/r.pdb",
		"s3://datasets/", "/shared/refs/hg38", "/shared/refs/:refs/", "s3://b/k:dir/",
		"s3://b/p/:in:include=**/*.nc,exclude=tmp/**", "s3://b/p/::include=*.nc",
		"s3://b/p/:a:b", "s3://b/p/:in:include=a,b:c,exclude=[]x]", "s3://b/p/:in/:exclude=**",
		"s3://b/k?versionId=abc:x", NULL
	};
	static const char *const bad[] = {
		"", "relative/path", "s3://", "s3://bucket", "s3:///key", "s3://b/../etc",
		"s3://b/a//c", "s3://b/./a", "/", "/a/../b", "s3://b/k:/abs", "s3://b/k:a/../b",
		"s3://b/k:", "s3://b/k\n", "s3://b/k\x7f", "http://example/x",
		"s3://b/p/:include=*.nc", "s3://b/p/::include=", "s3://b/p/::include=/a",
		"s3://b/p/::include=a[b", "s3://b/p/::exclude=a**", "s3://b/p/::include=**x/y",
		"s3://b/p/:in:include=ok,exclude=[!", "s3://b/p/:../x:include=a", NULL
	};
	char big[HS_MAX_VALUE + 16];

	for (int i = 0; good[i]; i++)
		CHECK(hs_check_stage_in(good[i]) == NULL);
	for (int i = 0; bad[i]; i++)
		CHECK(hs_check_stage_in(bad[i]) != NULL);
	memset(big, 'a', sizeof(big) - 1);
	big[sizeof(big) - 1] = '\0';
	memcpy(big, "s3://b/", 7);
	CHECK(hs_check_stage_in(big) != NULL);
}

static void test_stage_out(void)
{
	static const char *const good[] = {
		"out:s3://results/%j/", ".:s3://results/run/", "a/b.txt:s3://r/k.txt",
		"out:s3://results/%u/:on=success", "out:s3://r/p/:on=failure,optional",
		"out:s3://r/p/run-%j.hpack/:pack", "out:s3://r/d.hpack/:on=success,pack", NULL
	};
	static const char *const bad[] = {
		"out", "/abs:s3://r/p/", "../x:s3://r/p/", "out:/local/path", "out:s3://r",
		"out:s3://r/../p/", "out:s3://r/p/:on=never", "out:s3://r/p/:", "out:s3://r/p/:x,",
		"out:s3://r/d.hpack/:pack=yes",
		"", NULL
	};

	for (int i = 0; good[i]; i++)
		CHECK(hs_check_stage_out(good[i]) == NULL);
	for (int i = 0; bad[i]; i++)
		CHECK(hs_check_stage_out(bad[i]) != NULL);
}

static void test_find_export(void)
{
	char buf[256];

	CHECK(hs_find_export("export HPCSTAGE_DIR=/c/jobs/7\n", "HPCSTAGE_DIR", buf,
			     sizeof(buf)) == 0 && strcmp(buf, "/c/jobs/7") == 0);
	CHECK(hs_find_export("noise\nexport HPCSTAGE_DIR='/c/my dir/7'\n", "HPCSTAGE_DIR", buf,
			     sizeof(buf)) == 0 && strcmp(buf, "/c/my dir/7") == 0);
	CHECK(hs_find_export("export HPCSTAGE_DIR='/c/it'\"'\"'s'\n", "HPCSTAGE_DIR", buf,
			     sizeof(buf)) == 0 && strcmp(buf, "/c/it's") == 0);
	CHECK(hs_find_export("export HPCSTAGE_DIRX=/a\n", "HPCSTAGE_DIR", buf, sizeof(buf)) < 0);
	CHECK(hs_find_export("export HPCSTAGE_DIR=$(rm -rf x)\n", "HPCSTAGE_DIR", buf,
			     sizeof(buf)) < 0);
	CHECK(hs_find_export("export HPCSTAGE_DIR='unterminated\n", "HPCSTAGE_DIR", buf,
			     sizeof(buf)) < 0);
	CHECK(hs_find_export("", "HPCSTAGE_DIR", buf, sizeof(buf)) < 0);
}

static int run_sh(const char *script, unsigned int timeout, struct hs_result *res)
{
	char *argv[] = { "/bin/sh", "-c", (char *)script, NULL };
	char *envp[] = { "PATH=/usr/bin:/bin", NULL };
	struct hs_cmd cmd = { argv, envp, getuid(), getgid(), NULL, 0, timeout };

	return hs_run(&cmd, res);
}

static void test_run(void)
{
	static struct hs_result res;

	CHECK(run_sh("echo progress >&2; echo 'export HPCSTAGE_DIR=/x'; echo last words >&2", 10,
		     &res) == 0);
	CHECK(!res.timed_out && WIFEXITED(res.status) && WEXITSTATUS(res.status) == 0);
	CHECK(strcmp(res.out, "export HPCSTAGE_DIR=/x\n") == 0);
	CHECK(strcmp(res.last_err, "last words") == 0);

	CHECK(run_sh("echo 'hpcstage: job 1 cannot start: no such object' >&2; exit 1", 10,
		     &res) == 0);
	CHECK(WIFEXITED(res.status) && WEXITSTATUS(res.status) == 1);
	CHECK(strcmp(res.last_err, "hpcstage: job 1 cannot start: no such object") == 0);

	/* The deadline kills the whole process group, grandchildren too. */
	CHECK(run_sh("sleep 30 & sleep 30", 1, &res) == 0);
	CHECK(res.timed_out && WIFSIGNALED(res.status));

	/* Only the environment given: nothing of ours leaks into the helper. */
	setenv("HS_TEST_LEAK", "1", 1);
	CHECK(run_sh("env", 10, &res) == 0);
	CHECK(strstr(res.out, "PATH=/usr/bin:/bin\n") != NULL);
	CHECK(strstr(res.out, "HS_TEST_LEAK") == NULL);
}

int main(void)
{
	test_stage_in();
	test_stage_out();
	test_find_export();
	test_run();
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
