/*
 * plugstack.conf arguments:  helper=PATH  config=PATH  timeout=SECONDS
 * Anything else is refused, so that a typo is found when the plugin is loaded, not when a
 * job needs it.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#define HS_DEFAULT_TIMEOUT 3600U
#define HS_MAX_TIMEOUT (7U * 24U * 3600U)

static int set_path(char *dst, const char *key, const char *value)
{
	if (value[0] != '/') {
		hs_error("plugstack.conf argument %s=%s: the path must be absolute", key, value);
		return -1;
	}
	if (strlen(value) >= HS_MAX_PATH) {
		hs_error("plugstack.conf argument %s=: the path is too long", key);
		return -1;
	}
	strcpy(dst, value);
	return 0;
}

static int set_timeout(unsigned int *dst, const char *value)
{
	char *end = NULL;
	unsigned long seconds;

	if (value[0] < '0' || value[0] > '9')
		goto fail;
	seconds = strtoul(value, &end, 10);
	if (*end != '\0' || seconds == 0 || seconds > HS_MAX_TIMEOUT)
		goto fail;
	*dst = (unsigned int)seconds;
	return 0;
fail:
	hs_error("plugstack.conf argument timeout=%s: expected seconds, 1 to %u", value,
		 HS_MAX_TIMEOUT);
	return -1;
}

static int parse_one(const char *arg, struct hs_args *args)
{
	if (strncmp(arg, "helper=", 7) == 0)
		return set_path(args->helper, "helper", arg + 7);
	if (strncmp(arg, "config=", 7) == 0)
		return set_path(args->config, "config", arg + 7);
	if (strncmp(arg, "timeout=", 8) == 0)
		return set_timeout(&args->timeout, arg + 8);
	hs_error("unknown plugstack.conf argument \"%s\" (known: helper=, config=, timeout=)", arg);
	return -1;
}

int hs_args_parse(int ac, char **av, struct hs_args *args)
{
	memset(args, 0, sizeof(*args));
	args->timeout = HS_DEFAULT_TIMEOUT;
	for (int i = 0; i < ac; i++)
		if (parse_one(av[i], args) < 0)
			return -1;
	return 0;
}
