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

/* Does [p, end) start with include= or exclude=? */
static int filter_item_at(const char *p, const char *end)
{
	size_t n = (size_t)(end - p);

	return (n >= 8 && (strncmp(p, "include=", 8) == 0 || strncmp(p, "exclude=", 8) == 0));
}

/* The first ':' in [p, end) that starts FILTERS (":include=" or ":exclude="), or NULL. */
static const char *filters_start(const char *p, const char *end)
{
	for (; p < end; p++)
		if (*p == ':' && filter_item_at(p + 1, end))
			return p;
	return NULL;
}

/* One glob [p, end): not empty, relative, '[' closed, '**' only as a whole component. */
static const char *check_glob(const char *p, const char *end)
{
	const char *part = p;

	if (p == end)
		return "an include=/exclude= glob is empty";
	if (*p == '/')
		return "an include=/exclude= glob starts with '/' (it is relative to the prefix)";
	for (const char *q = p; q < end; q++) {
		if (*q == '[') {
			const char *close = q + 1;
			if (close < end && (*close == '!' || *close == '^'))
				close++;
			if (close < end && *close == ']')
				close++; /* a ']' first in the class is literal */
			while (close < end && *close != ']')
				close++;
			if (close == end)
				return "an include=/exclude= glob has a '[' without its ']'";
			q = close;
		} else if (*q == '*' && q + 1 < end && q[1] == '*') {
			const char *after = q + 2;
			if (q != part || (after < end && *after != '/'))
				return "'**' in an include=/exclude= glob must be a whole path component";
			q++;
		} else if (*q == '/') {
			part = q + 1;
		}
	}
	return NULL;
}

/* FILTERS [p, end): include=GLOB / exclude=GLOB items split at a ',' before the next one. */
static const char *check_filters(const char *p, const char *end)
{
	while (p < end) {
		const char *glob = p + 8, *q = glob;
		while (q < end && !(*q == ',' && filter_item_at(q + 1, end)))
			q++;
		const char *why = check_glob(glob, q);
		if (why != NULL)
			return why;
		p = q < end ? q + 1 : end;
	}
	return NULL;
}

/* DEST[:FILTERS] after the SRC's ':' (an empty DEST before FILTERS keeps the default). */
static const char *check_dest_filters(const char *dest, const char *end)
{
	if (filter_item_at(dest, end))
		return "DEST starts with include=/exclude=: write SRC::include=GLOB for the default DEST";
	const char *filters = filters_start(dest, end);
	if (filters == NULL)
		return check_relative(dest, end, 0);
	if (filters != dest) {
		const char *why = check_relative(dest, filters, 0);
		if (why != NULL)
			return why;
	}
	return check_filters(filters + 1, end);
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
		why = check_dest_filters(colon + 1, end);
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
