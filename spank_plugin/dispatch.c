/*
 * Entry points Slurm calls. Each one only chooses the context's handler; nothing else
 * happens here.
 */
#include "common.h"

SPANK_PLUGIN(hpcstage, 1);

static struct hs_args args;

int slurm_spank_init(spank_t sp, int ac, char **av)
{
	/* Every context refuses a bad plugstack.conf line: a typo shows up at once. */
	if (hs_args_parse(ac, av, &args) < 0)
		return -1;
	switch (spank_context()) {
	case S_CTX_ALLOCATOR:
	case S_CTX_LOCAL:
	case S_CTX_REMOTE:
		return hs_options_register(sp);
	default:
		return 0; /* slurmd, prolog/epilog: nothing to do */
	}
}

int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
	(void)ac;
	(void)av;
	switch (spank_context()) {
	case S_CTX_ALLOCATOR:
		return hs_allocator_post_opt(sp, 1);
	case S_CTX_LOCAL:
		return hs_allocator_post_opt(sp, 0);
	default:
		return 0;
	}
}

int slurm_spank_user_init(spank_t sp, int ac, char **av)
{
	(void)ac;
	(void)av;
	if (spank_context() != S_CTX_REMOTE)
		return 0;
	return hs_remote_user_init(sp, &args);
}

int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
	(void)ac;
	(void)av;
	if (spank_context() != S_CTX_REMOTE)
		return 0;
	return hs_remote_task_init(sp);
}

int slurm_spank_exit(spank_t sp, int ac, char **av)
{
	(void)sp;
	(void)ac;
	(void)av;
	hs_options_free();
	return 0;
}
