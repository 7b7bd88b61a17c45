/* SPDX-License-Identifier: MIT */
/* libFuzzer harness: input bytes decoded into operation sequences. */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "model.h"

/* The interpreter (tests/model.c) does the decoding and the checking; a
 * failed check is a crash for libFuzzer, which saves the input. */
#define MAX_OPS 256

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    md_src src = {0};
    md_result res;

    src.data = data;
    src.len = size;
    if (md_run(&src, MAX_OPS, getenv("DF_MODEL_TRACE") != NULL, &res) != 0) {
        fprintf(stderr, "fuzz-ops: check failed after %lu operations: %s\n",
                res.ops, res.msg);
        abort();
    }
    return 0;
}

#ifdef DF_FUZZ_REPLAY
/*
 * Without libFuzzer: runs each file named on the command line, or each
 * file of each directory named, once, as a regression test.  With no
 * arguments it runs $srcdir/tests/fuzz/corpus (srcdir defaults to ".").
 * make check runs it so that the corpus is a regression suite everywhere.
 */
static unsigned long files, ops_total;

static int run_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        perror(path);
        return -1;
    }
    uint8_t *buf = NULL;
    size_t len = 0, cap = 0, n;
    do {
        if (len == cap) {
            cap = cap ? cap * 2 : 4096;
            uint8_t *p = realloc(buf, cap);
            if (p == NULL)
                abort();
            buf = p;
        }
        n = fread(buf + len, 1, cap - len, f);
        len += n;
    } while (n > 0);
    fclose(f);

    md_src src = {0};
    md_result res;
    src.data = buf;
    src.len = len;
    int rc = md_run(&src, MAX_OPS, getenv("DF_MODEL_TRACE") != NULL, &res);
    free(buf);
    if (rc != 0) {
        printf("fuzz-replay: FAILED %s: %s\n", path, res.msg);
        return -1;
    }
    files++;
    ops_total += res.ops;
    return 0;
}

static int cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Runs the files of a directory in name order, so runs are repeatable. */
static int run_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (d == NULL) {
        perror(dir);
        return -1;
    }
    char **names = NULL;
    size_t n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.' || strcmp(e->d_name, "README") == 0)
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            char **p = realloc(names, cap * sizeof *p);
            if (p == NULL)
                abort();
            names = p;
        }
        names[n++] = strdup(e->d_name);
    }
    closedir(d);
    qsort(names, n, sizeof *names, cmp);
    int rc = 0;
    for (size_t i = 0; i < n; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        if (run_file(path) != 0)
            rc = -1;
        free(names[i]);
    }
    free(names);
    return rc;
}

static int run_path(const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        perror(path);
        return -1;
    }
    return S_ISDIR(st.st_mode) ? run_dir(path) : run_file(path);
}

int main(int argc, char **argv)
{
    int rc = 0;
    if (argc < 2) {
        const char *srcdir = getenv("srcdir");
        char dir[4096];
        snprintf(dir, sizeof dir, "%s/tests/fuzz/corpus",
                 srcdir != NULL ? srcdir : ".");
        rc = run_path(dir);
    }
    for (int i = 1; i < argc; i++) {
        if (run_path(argv[i]) != 0)
            rc = -1;
    }
    printf("fuzz-replay: %lu inputs, %lu operations\n", files, ops_total);
    if (files == 0)
        rc = -1;
    return rc == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
#endif /* DF_FUZZ_REPLAY */
