/* Syntax pre-check of staging option values; see validate.h. */
#include <string.h>

#include "validate.h"

static const char *check_text(const char *value)
{
	size_t len = strnlen(value, HS_MAX_VALUE + 1);

	if (len == 0)
		return "the value is empty";
	if (len > HS_MAX_VALUE)
		return "the value is longer than 4096 characters";
	for (const unsigned char *p = (const unsigned char *)value; *p; p++)
		if (*p < 0x20 || *p == 0x7f)
			return "the value holds a control character";
	return NULL;
}

/* Does the path [start, end) have an empty, "." or ".." component? */
static int bad_components(const char *start, const char *end)
{
	const char *part = start;

	for (const char *p = start; p <= end; p++) {
		if (p < end && *p != '/')
			continue;
		size_t n = (size_t)(p - part);
		if (n == 0 || (n == 1 && part[0] == '.') ||
		    (n == 2 && part[0] == '.' && part[1] == '.'))
			return 1;
		part = p + 1;
	}
	return 0;
}

/* "BUCKET/KEY" after s3:// up to `end`: a bucket, then a key without bad components. */
static const char *check_s3(const char *text, const char *end, const char *what_missing)
{
	const char *slash = memchr(text, '/', (size_t)(end - text));

	if (slash == NULL)
		return what_missing;
	if (slash == text)
		return "s3:// needs a bucket name";
	const char *key = slash + 1;
	const char *key_end = end;
	if (key == key_end)
		return NULL; /* the whole bucket */
	if (key_end[-1] == '/')
		key_end--;   /* a prefix */
	if (bad_components(key, key_end))
		return "the S3 key has an empty, '.' or '..' component";
	return NULL;
}

/* A path relative to $HPCSTAGE_DIR: not absolute, no empty, '.' or '..' component. */
static const char *check_relative(const char *start, const char *end, int allow_dot)
{
	if (start == end)
		return "the path inside $HPCSTAGE_DIR is empty";
	if (*start == '/')
		return "the path inside $HPCSTAGE_DIR must be relative";
	if (allow_dot && end - start == 1 && *start == '.')
		return NULL;
	if (end[-1] == '/' && end - start > 1)
		end--; /* "DIR/" means into DIR */
	if (bad_components(start, end))
		return "the path inside $HPCSTAGE_DIR has an empty, '.' or '..' component";
	return NULL;
}

const char *hs_check_stage_in(const char *value)
{
	const char *why = check_text(value);
	const char *src = value, *end = value + strlen(value);

	if (why != NULL)
		return why;
	if (strncmp(value, "s3://", 5) == 0)
		src = value + 5;
	else if (value[0] != '/')
		return "SRC must be s3://BUCKET/KEY, s3://BUCKET/PREFIX/ or an absolute path";
	const char *colon = strchr(src, ':');
	const char *src_end = colon ? colon : end;
	if (src != value) {
		why = check_s3(src, src_end, "s3://BUCKET needs /KEY or a trailing '/'");
	} else {
		const char *body_end = src_end;
		if (body_end - src > 1 && body_end[-1] == '/')
			body_end--;
		if (body_end - src <= 1)
			return "SRC cannot be the root directory";
		why = bad_components(src + 1, body_end)
			? "the SRC path has an empty, '.' or '..' component" : NULL;
	}
	if (why == NULL && colon != NULL)
		why = check_relative(colon + 1, end, 0);
	return why;
}

static const char *check_flags(const char *flags)
{
	static const char *const known[] = {
		"on=always", "on=success", "on=failure", "optional", "pack", NULL
	};
	const char *p = flags;

	while (1) {
		size_t n = strcspn(p, ",");
		int ok = 0;
		for (const char *const *k = known; *k; k++)
			ok |= (strlen(*k) == n && strncmp(p, *k, n) == 0);
		if (!ok)
			return "unknown stage-out flag (known: on=always|success|failure, optional, pack)";
		if (p[n] == '\0')
			return NULL;
		p += n + 1;
	}
}

const char *hs_check_stage_out(const char *value)
{
	const char *why = check_text(value);

	if (why != NULL)
		return why;
	const char *colon = strchr(value, ':');
	if (colon == NULL)
		return "stage-out needs SRC:DEST (DEST is s3://BUCKET/PREFIX/ or s3://BUCKET/KEY)";
	why = check_relative(value, colon, 1);
	if (why != NULL)
		return why;
	const char *dest = colon + 1;
	if (strncmp(dest, "s3://", 5) != 0)
		return "stage-out DEST must be s3://BUCKET/PREFIX/ or s3://BUCKET/KEY";
	dest += 5;
	const char *flags = strchr(dest, ':');
	const char *dest_end = flags ? flags : dest + strlen(dest);
	why = check_s3(dest, dest_end, "DEST s3://BUCKET needs /KEY or a trailing '/'");
	if (why == NULL && flags != NULL)
		why = check_flags(flags + 1);
	return why;
}
