/* SPDX-License-Identifier: MIT */
/* Model-based random testing: seeded operation sequences against a model. */
#include <check.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define SANITIZED 1
#endif
#endif
#ifndef SANITIZED
#define SANITIZED 0
#endif

#include "deferred.h"
#include "model.h"
#include "testutil.h"

/*
 * The budget.  make check runs DEFAULT_SEEDS sequences of DEFAULT_OPS
 * operations (some 15 s); under a sanitizer or with DF_TEST_QUICK a tenth
 * of the sequences, under valgrind a hundredth; DF_TEST_LONG=1 ten times
 * more, four times longer.  Environment:
 *   DF_MODEL_SEEDS=N  DF_MODEL_OPS=M  DF_MODEL_BASE=first seed
 *   DF_MODEL_SEED=S   run seed S only (what a failure says to replay)
 *   DF_MODEL_REPEAT=N run each seed N times: loop-side operations replay
 *                     exactly, pool timing does not, so a failure that
 *                     depends on it may need many runs to show again
 *   DF_MODEL_TRACE=1  print each operation
 *   DF_MODEL_DUMP=DIR write the bytes each sequence used to DIR/seed-S
 *                     (how tests/fuzz/corpus was made, see its README)
 */
#define DEFAULT_SEEDS 10000
#define DEFAULT_OPS 150

static bool env_flag(const char *name)
{
    const char *v = getenv(name);
    return v != NULL && *v != '\0' && *v != '0';
}

static unsigned long env_ulong(const char *name, unsigned long dflt)
{
    const char *v = getenv(name);
    if (v == NULL || *v == '\0')
        return dflt;
    char *end;
    errno = 0;
    unsigned long x = strtoul(v, &end, 0);
    ck_assert_msg(errno == 0 && *end == '\0', "%s=%s is not a number", name,
                  v);
    return x;
}

static void dump(const char *dir, uint64_t seed, const md_src *src)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/seed-%" PRIu64, dir, seed);
    FILE *f = fopen(path, "wb");
    ck_assert_msg(f != NULL, "cannot write %s", path);
    ck_assert(fwrite(src->rec, 1, src->rec_len, f) == src->rec_len);
    ck_assert(fclose(f) == 0);
}

/* Runs seed `seed`; on failure prints how to replay it and fails. */
static unsigned long run_seed(uint64_t seed, unsigned ops, bool trace,
                              const char *dump_dir)
{
    md_src src = {0};
    md_result res;
    src.state = seed;
    src.record = dump_dir != NULL;
    int rc = md_run(&src, ops, trace, &res);
    if (rc != 0) {
        printf("model: FAILED seed %" PRIu64 ", %s\n"
               "model: replay with: DF_MODEL_SEED=%" PRIu64
               " DF_MODEL_OPS=%u tests/check_model\n"
               "model: (add DF_MODEL_TRACE=1 to see each operation, "
               "DF_MODEL_REPEAT=100 if it depends on pool timing)\n",
               seed, res.msg, seed, ops);
        fflush(stdout);
        ck_abort_msg("seed %" PRIu64 ": %s", seed, res.msg);
    }
    if (dump_dir != NULL)
        dump(dump_dir, seed, &src);
    free(src.rec);
    return res.ops;
}

START_TEST(test_model_random)
{
    bool quick = SANITIZED || env_flag("DF_TEST_QUICK");
    bool slow = env_flag("DF_TEST_LONG");
    unsigned long seeds = DEFAULT_SEEDS, ops = DEFAULT_OPS;
    if (RUNNING_ON_VALGRIND)
        seeds /= 100;
    else if (quick)
        seeds /= 10;
    if (slow) {
        seeds *= 10;
        ops *= 4;
    }
    seeds = env_ulong("DF_MODEL_SEEDS", seeds);
    ops = env_ulong("DF_MODEL_OPS", ops);
    uint64_t base = env_ulong("DF_MODEL_BASE", 1);
    bool trace = env_flag("DF_MODEL_TRACE");
    const char *dump_dir = getenv("DF_MODEL_DUMP");
    unsigned long repeat = env_ulong("DF_MODEL_REPEAT", 1);
    if (getenv("DF_MODEL_SEED") != NULL) {
        base = env_ulong("DF_MODEL_SEED", 0);
        seeds = 1;
    }

    unsigned long total = 0;
    for (unsigned long i = 0; i < seeds; i++) {
        for (unsigned long r = 0; r < repeat; r++)
            total += run_seed(base + i, (unsigned)ops, trace, dump_dir);
    }
    printf("model: %lu sequences, %lu operations\n", seeds * repeat, total);
}
END_TEST

static Suite *model_suite(void)
{
    Suite *s = suite_create("model");
    TCase *tc = tcase_create("random");
    tcase_set_timeout(tc, 0);
    tcase_add_test(tc, test_model_random);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(model_suite)
