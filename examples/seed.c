/* SPDX-License-Identifier: MIT */
/* The seed program: a semaphore of two tokens runs print over 1..6 and a
 * DeferredList gathers the results, as this Twisted program does:
 *
 *     sem = defer.DeferredSemaphore(2)
 *     dl = defer.DeferredList([sem.run(print, i) for i in range(1, 7)])
 *     dl.addCallback(print)
 */
#include <deferred.h>
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "example-util.h"

#define ITEMS 6

/* Twisted's print(i): prints the item and returns None (NULL here). */
static df_result print_item(void *arg)
{
    printf("%ld\n", (long)(intptr_t)arg);
    return df_ok(NULL, NULL);
}

/* Prints the list result the way Python prints a list of (bool, value)
 * tuples: a NULL value is None, a failure shows its message. */
static df_result print_list(df_result r, void *arg)
{
    (void)arg;
    const df_list_result *lr = r.value;
    printf("[");
    for (size_t i = 0; i < df_list_result_count(lr); i++) {
        bool ok = df_list_result_ok(lr, i);
        printf("%s(%s, ", i ? ", " : "", ok ? "True" : "False");
        if (!ok)
            printf("<Failure %s>",
                   df_failure_message(df_list_result_failure(lr, i)));
        else if (df_list_result_value(lr, i) == NULL)
            printf("None");
        else
            printf("%p", df_list_result_value(lr, i));
        printf(")");
    }
    printf("]\n");
    return r;
}

static const char *prog = "seed";

static int fail(const char *what, int rc)
{
    fprintf(stderr, "%s: %s: %s\n", prog, what, df_strerror(rc));
    return EXIT_FAILURE;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: %s [-h]\n"
            "Runs print over 1..6 through a semaphore of two tokens, gathers "
            "the results\n"
            "with a deferred list and prints them as Twisted does.\n"
            "  -h, --help  this help\n",
            prog);
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {{"help", no_argument, NULL, 'h'},
                                             {NULL, 0, NULL, 0}};
    df_loop *loop;
    df_sem *sem;
    df_deferred *runs[ITEMS], *list;
    int rc, c;

    prog = argv[0] = example_name(argv[0], "seed");
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        if (c == 'h') {
            usage(stdout);
            return example_close_stdout(prog, EXIT_SUCCESS);
        }
        usage(stderr); /* getopt_long has named the problem */
        return 2;
    }
    if (optind != argc) {
        fprintf(stderr, "%s: unexpected argument '%s'\n", prog, argv[optind]);
        usage(stderr);
        return 2;
    }

    if ((rc = df_loop_new(NULL, &loop)) != 0)
        return fail("df_loop_new", rc);
    if ((rc = df_sem_new(loop, 2, &sem)) != 0)
        return fail("df_sem_new", rc);
    for (long i = 0; i < ITEMS; i++) {
        rc = df_sem_run(sem, print_item, (void *)(intptr_t)(i + 1), &runs[i]);
        if (rc != 0)
            return fail("df_sem_run", rc);
    }
    /* The list takes over our reference to each run. */
    if ((rc = df_list_new(loop, runs, ITEMS, DF_LIST_TAKE_REFS, &list)) != 0)
        return fail("df_list_new", rc);
    if ((rc = df_deferred_add_callback(list, print_list, NULL)) != 0)
        return fail("df_deferred_add_callback", rc);

    /* Everything here completes synchronously; run the loop anyway, as a
     * program with real asynchronous work would. */
    if ((rc = df_loop_run_until(loop, list)) != 0)
        return fail("df_loop_run_until", rc);

    df_deferred_unref(list);
    if ((rc = df_sem_free(sem)) != 0)
        return fail("df_sem_free", rc);
    if ((rc = df_loop_free(loop)) != 0)
        return fail("df_loop_free", rc);
    return example_close_stdout(prog, EXIT_SUCCESS);
}
