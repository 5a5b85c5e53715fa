/*
 * Cheap syntax pre-check of --stage-in/--stage-out values, run by sbatch at submission so
 * that an obviously malformed value fails there, with a message. The daemon validates
 * everything again (bucket names, patterns, authorization): this is not the full grammar.
 * No Slurm dependency, so it can be unit-tested (make test).
 */
#ifndef HPCSTAGE_SPANK_VALIDATE_H
#define HPCSTAGE_SPANK_VALIDATE_H

#include <stddef.h>

#define HS_MAX_VALUE 4096     /* characters in one value (hpcstage.directives) */
#define HS_MAX_DIRECTIVES 1000 /* values in one job */

/* NULL if `value` passes the pre-check, else why not (a static string). */
const char *hs_check_stage_in(const char *value);
const char *hs_check_stage_out(const char *value);

#endif
