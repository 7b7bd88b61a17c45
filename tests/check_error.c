/* SPDX-License-Identifier: MIT */
/* Error texts and names for codes outside the table, and df_version(),
 * checked against the shared library a program links (public API only). */
#include <check.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <deferred.h>

/* An application's own code prints with its number, as text and as name. */
START_TEST(test_error_application_code)
{
    ck_assert_str_eq(df_strerror(1042), "error 1042");
    ck_assert_str_eq(df_strerror(-1042), "error -1042");
    ck_assert_str_eq(df_err_name(1042), "DF_UNKNOWN(1042)");
    ck_assert_str_eq(df_err_name(-1042), "DF_UNKNOWN(-1042)");
    /* A failure made from the code carries the text, copied. */
    df_failure *f = df_failure_new(NULL, 1042, NULL);
    ck_assert_int_eq(df_failure_code(f), 1042);
    df_strerror(7777); /* overwrites this thread's buffer */
    ck_assert_str_eq(df_failure_message(f), "error 1042");
    df_failure_unref(f);
}
END_TEST

/* Table codes, errno values and 0 are unchanged: static strings, the same
 * pointer every time. */
START_TEST(test_error_static_texts)
{
    ck_assert_str_eq(df_strerror(DF_ECANCELLED), "operation cancelled");
    ck_assert_str_eq(df_err_name(DF_ECANCELLED), "DF_ECANCELLED");
    ck_assert_ptr_eq(df_strerror(DF_ESTATE), df_strerror(DF_ESTATE));
    ck_assert_str_eq(df_strerror(0), "success");
    ck_assert_str_eq(df_err_name(0), "DF_OK");
    ck_assert_str_eq(df_err_name(-EPIPE), "EPIPE");
    ck_assert_str_eq(df_strerror(-EPIPE), strerror(EPIPE));
}
END_TEST

/* The numbered texts live in a buffer per thread: another thread's calls
 * never change what this thread got. */
typedef struct {
    pthread_barrier_t *bar;
    int code;
    int mismatches;
} racer;

static void *race(void *arg)
{
    racer *r = arg;
    char want_text[64], want_name[64];
    snprintf(want_text, sizeof want_text, "error %d", r->code);
    snprintf(want_name, sizeof want_name, "DF_UNKNOWN(%d)", r->code);
    pthread_barrier_wait(r->bar);
    for (int i = 0; i < 20000; i++) {
        const char *t = df_strerror(r->code);
        const char *n = df_err_name(r->code);
        if (strcmp(t, want_text) != 0 || strcmp(n, want_name) != 0)
            r->mismatches++;
    }
    return NULL;
}

START_TEST(test_error_thread_local)
{
    enum { N = 4 };
    pthread_barrier_t bar;
    pthread_t t[N];
    racer r[N];
    ck_assert_int_eq(pthread_barrier_init(&bar, NULL, N), 0);
    for (int i = 0; i < N; i++) {
        r[i] = (racer){&bar, 5000 + i * 1111, 0};
        ck_assert_int_eq(pthread_create(&t[i], NULL, race, &r[i]), 0);
    }
    for (int i = 0; i < N; i++) {
        pthread_join(t[i], NULL);
        ck_assert_int_eq(r[i].mismatches, 0);
    }
    pthread_barrier_destroy(&bar);
}
END_TEST

/* The library linked reports the version of the header it was built
 * with. */
START_TEST(test_error_version)
{
    char want[64];
    snprintf(want, sizeof want, "%d.%d.%d", DF_VERSION_MAJOR,
             DF_VERSION_MINOR, DF_VERSION_PATCH);
    ck_assert_str_eq(DF_VERSION_STRING, want);
    ck_assert_str_eq(df_version(), DF_VERSION_STRING);
    ck_assert_uint_eq(df_version_number(), (unsigned long)DF_VERSION_HEX);
    ck_assert_uint_eq(df_version_number(),
                      ((unsigned long)DF_VERSION_MAJOR << 16) |
                          ((unsigned long)DF_VERSION_MINOR << 8) |
                          (unsigned long)DF_VERSION_PATCH);
}
END_TEST

static Suite *error_suite(void)
{
    Suite *s = suite_create("error");
    TCase *tc = tcase_create("error");
    tcase_add_test(tc, test_error_application_code);
    tcase_add_test(tc, test_error_static_texts);
    tcase_add_test(tc, test_error_thread_local);
    tcase_add_test(tc, test_error_version);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(error_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
