/* SPDX-License-Identifier: MIT */
/* libdeferred-mpi: errors, buffers, the context and the table of names. */
#include "mpi-internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- errors */

const char *df_mpi_strerror(int code)
{
    switch (code) {
#define DF_MPI__ERR_TEXT(name, value, text)                                    \
    case (value):                                                              \
        return text;
        DF_MPI_ERRNO_MAP(DF_MPI__ERR_TEXT)
#undef DF_MPI__ERR_TEXT
    default:
        return df_strerror(code);
    }
}

const char *df_mpi_err_name(int code)
{
    switch (code) {
#define DF_MPI__ERR_NAME(name, value, text)                                    \
    case (value):                                                              \
        return "DF_MPI_" #name;
        DF_MPI_ERRNO_MAP(DF_MPI__ERR_NAME)
#undef DF_MPI__ERR_NAME
    default:
        return df_err_name(code);
    }
}

/* --------------------------------------------------------------- buffers */

/* The header and the bytes share one allocation, so df_mpi_buf_free is
 * free() and a received message can become a result without a copy. */
df_mpi_buf *df_mpi__buf_alloc(size_t len)
{
    if (len > DF_MPI__HARD_MAX + 4096)
        return NULL;
    df_mpi_buf *b = malloc(sizeof *b + (len ? len : 1));
    if (b == NULL)
        return NULL;
    b->len = len;
    b->data = (unsigned char *)(b + 1);
    return b;
}

df_mpi_buf *df_mpi_buf_new(const void *data, size_t len)
{
    if (len > DF_MPI__HARD_MAX)
        return NULL;
    df_mpi_buf *b = df_mpi__buf_alloc(len);
    if (b == NULL)
        return NULL;
    if (data != NULL)
        memcpy(b->data, data, len);
    else
        memset(b->data, 0, len);
    return b;
}

void df_mpi_buf_free(void *buf)
{
    free(buf);
}

static void put_le64(unsigned char *p, uint64_t x)
{
    for (int k = 0; k < 8; k++)
        p[k] = (unsigned char)(x >> (8 * k));
}

static uint64_t get_le64(const unsigned char *p)
{
    uint64_t x = 0;
    for (int k = 0; k < 8; k++)
        x |= (uint64_t)p[k] << (8 * k);
    return x;
}

void df_mpi_encode_i64(const int64_t *v, size_t n, void *out)
{
    for (size_t i = 0; i < n; i++)
        put_le64((unsigned char *)out + 8 * i, (uint64_t)v[i]);
}

void df_mpi_encode_f64(const double *v, size_t n, void *out)
{
    for (size_t i = 0; i < n; i++) {
        uint64_t bits;
        memcpy(&bits, &v[i], 8);
        put_le64((unsigned char *)out + 8 * i, bits);
    }
}

df_mpi_buf *df_mpi_buf_from_i64(const int64_t *v, size_t n)
{
    if (n > DF_MPI__HARD_MAX / 8 || (n > 0 && v == NULL))
        return NULL;
    df_mpi_buf *b = df_mpi__buf_alloc(8 * n);
    if (b != NULL)
        df_mpi_encode_i64(v, n, b->data);
    return b;
}

df_mpi_buf *df_mpi_buf_from_f64(const double *v, size_t n)
{
    if (n > DF_MPI__HARD_MAX / 8 || (n > 0 && v == NULL))
        return NULL;
    df_mpi_buf *b = df_mpi__buf_alloc(8 * n);
    if (b != NULL)
        df_mpi_encode_f64(v, n, b->data);
    return b;
}

long df_mpi_decode_i64(const void *data, size_t len, int64_t *v, size_t max)
{
    if (len % 8 != 0)
        return DF_MPI_EPROTO;
    if (len / 8 > max || (len > 0 && (data == NULL || v == NULL)))
        return DF_EINVAL;
    for (size_t i = 0; i < len / 8; i++)
        v[i] = (int64_t)get_le64((const unsigned char *)data + 8 * i);
    return (long)(len / 8);
}

long df_mpi_decode_f64(const void *data, size_t len, double *v, size_t max)
{
    if (len % 8 != 0)
        return DF_MPI_EPROTO;
    if (len / 8 > max || (len > 0 && (data == NULL || v == NULL)))
        return DF_EINVAL;
    for (size_t i = 0; i < len / 8; i++) {
        uint64_t bits = get_le64((const unsigned char *)data + 8 * i);
        memcpy(&v[i], &bits, 8);
    }
    return (long)(len / 8);
}

/* ---------------------------------------------------------------- context */

int df_mpi_init(int *argc, char ***argv, df_mpi **out)
{
    if (out == NULL)
        return DF_EINVAL;
    *out = NULL;
    int inited = 0, finalized = 0, provided = MPI_THREAD_SINGLE;
    MPI_Initialized(&inited);
    MPI_Finalized(&finalized);
    if (finalized) {
        fprintf(stderr, "df_mpi_init: MPI has been finalized already\n");
        return DF_MPI_EMPI;
    }
    bool we_init = false;
    if (!inited) {
        if (MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided) !=
            MPI_SUCCESS) {
            fprintf(stderr, "df_mpi_init: MPI_Init_thread failed\n");
            return DF_MPI_EMPI;
        }
        we_init = true;
    } else if (MPI_Query_thread(&provided) != MPI_SUCCESS) {
        return DF_MPI_EMPI;
    }
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (provided < MPI_THREAD_SERIALIZED) {
        fprintf(stderr,
                "df_mpi_init: rank %d: MPI provides thread level %d, "
                "libdeferred-mpi needs MPI_THREAD_SERIALIZED (%d) or "
                "better%s\n",
                rank, provided, MPI_THREAD_SERIALIZED,
                we_init ? "" : " (MPI was initialised by the application: "
                               "use MPI_Init_thread)");
        if (we_init)
            MPI_Finalize();
        return DF_MPI_ETHREAD_LEVEL;
    }
    df_mpi *ctx = calloc(1, sizeof *ctx);
    if (ctx == NULL) {
        if (we_init)
            MPI_Finalize();
        return DF_ENOMEM;
    }
    ctx->we_init = we_init;
    if (MPI_Comm_dup(MPI_COMM_WORLD, &ctx->comm) != MPI_SUCCESS) {
        free(ctx);
        if (we_init)
            MPI_Finalize();
        return DF_MPI_EMPI;
    }
    /* Errors on our communicator come back as codes; the library turns
     * the ones it cannot recover from into MPI_Abort itself. */
    MPI_Comm_set_errhandler(ctx->comm, MPI_ERRORS_RETURN);
    MPI_Comm_rank(ctx->comm, &ctx->rank);
    MPI_Comm_size(ctx->comm, &ctx->size);
    *out = ctx;
    return 0;
}

int df_mpi_finalize(df_mpi *ctx)
{
    if (ctx == NULL)
        return DF_EINVAL;
    /* While df_mpi_worker_run runs, only a work function can call this:
     * on the MPI thread itself in the inline mode, where freeing the
     * context and finalizing MPI would pull them from under the sentry
     * and the reply. */
    if (ctx->pools > 0 || ctx->working)
        return DF_EBUSY;
    if (!ctx->started && ctx->size > 1) {
        /* This rank never joined the start-up exchange; others may be
         * waiting in it (a worker in df_mpi_worker_run, the master in
         * df_mpi_pool_new).  Join it, saying that this rank is leaving,
         * so that they return an error instead of hanging.  Every rank
         * that finalizes without starting does the same, so a program
         * that never makes a pool still matches up. */
        uint64_t row[DF_MPI__ROW_N] = {0};
        row[DF_MPI__ROW_STATUS] = (uint64_t)(int64_t)DF_MPI__LEAVING;
        uint64_t *rows = NULL;
        df_mpi__start(ctx, row, &rows);
        free(rows);
    }
    MPI_Comm_free(&ctx->comm);
    for (size_t i = 0; i < ctx->n; i++)
        free(ctx->tab[i].name);
    free(ctx->tab);
    bool we_init = ctx->we_init;
    free(ctx);
    if (we_init)
        MPI_Finalize();
    return 0;
}

int df_mpi_rank(const df_mpi *ctx)
{
    return ctx != NULL ? ctx->rank : -1;
}

int df_mpi_size(const df_mpi *ctx)
{
    return ctx != NULL ? ctx->size : -1;
}

bool df_mpi_is_master(const df_mpi *ctx)
{
    return ctx != NULL && ctx->rank == 0;
}

/* ------------------------------------------------------------------ names */

int df_mpi_register(df_mpi *ctx, const char *name, df_mpi_fn fn, void *arg)
{
    if (ctx == NULL || name == NULL || fn == NULL)
        return DF_EINVAL;
    size_t len = strlen(name);
    if (len == 0 || len > DF_MPI__MAX_NAME)
        return DF_EINVAL;
    if (ctx->started)
        return DF_ESTATE;
    for (size_t i = 0; i < ctx->n; i++)
        if (strcmp(ctx->tab[i].name, name) == 0)
            return DF_EBUSY;
    if (ctx->n == ctx->cap) {
        size_t cap = ctx->cap ? 2 * ctx->cap : 8;
        df_mpi__entry *t = realloc(ctx->tab, cap * sizeof *t);
        if (t == NULL)
            return DF_ENOMEM;
        ctx->tab = t;
        ctx->cap = cap;
    }
    char *copy = malloc(len + 1);
    if (copy == NULL)
        return DF_ENOMEM;
    memcpy(copy, name, len + 1);
    ctx->tab[ctx->n++] = (df_mpi__entry){copy, len, fn, arg};
    return 0;
}

static int entry_cmp(const void *a, const void *b)
{
    return strcmp(((const df_mpi__entry *)a)->name,
                  ((const df_mpi__entry *)b)->name);
}

const df_mpi__entry *df_mpi__lookup(const df_mpi *ctx, const char *name,
                                    size_t len)
{
    size_t lo = 0, hi = ctx->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const df_mpi__entry *e = &ctx->tab[mid];
        size_t m = e->len < len ? e->len : len;
        int c = memcmp(e->name, name, m);
        if (c == 0)
            c = (e->len > len) - (e->len < len);
        if (c == 0)
            return e;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

/* FNV-1a, 64 bits, over the sorted names, each ended by a NUL. */
static uint64_t table_hash(const df_mpi *ctx)
{
    uint64_t h = UINT64_C(0xcbf29ce484222325);
    for (size_t i = 0; i < ctx->n; i++) {
        const unsigned char *s = (const unsigned char *)ctx->tab[i].name;
        for (size_t k = 0; k <= ctx->tab[i].len; k++) {
            h ^= s[k];
            h *= UINT64_C(0x100000001b3);
        }
    }
    return h;
}

int df_mpi__start(df_mpi *ctx, uint64_t mine[DF_MPI__ROW_N], uint64_t **all)
{
    *all = NULL;
    if (!ctx->started) {
        qsort(ctx->tab, ctx->n, sizeof *ctx->tab, entry_cmp);
        ctx->hash = table_hash(ctx);
        ctx->started = true;
    }
    mine[DF_MPI__ROW_HASH] = ctx->hash;
    uint64_t *rows = calloc((size_t)ctx->size * DF_MPI__ROW_N, 8);
    if (rows == NULL) {
        /* Every rank must take part in the exchange or the others hang;
         * without memory for it this one cannot: end the job. */
        fprintf(stderr, "df_mpi: rank %d: out of memory at pool start; "
                        "aborting the job\n", ctx->rank);
        MPI_Abort(ctx->comm, 1);
        return DF_ENOMEM;
    }
    int rc = MPI_Allgather(mine, DF_MPI__ROW_N, MPI_UINT64_T, rows,
                           DF_MPI__ROW_N, MPI_UINT64_T, ctx->comm);
    if (rc != MPI_SUCCESS) {
        free(rows);
        fprintf(stderr, "df_mpi: rank %d: MPI_Allgather failed at pool "
                        "start\n", ctx->rank);
        return DF_MPI_EMPI;
    }
    *all = rows;
    /* Every rank reaches the same verdict from the same rows. */
    const uint64_t *master = rows;
    int my_status = (int)(int64_t)mine[DF_MPI__ROW_STATUS];
    bool someone_failed = false;
    for (int r = 0; r < ctx->size; r++)
        if (rows[r * DF_MPI__ROW_N + DF_MPI__ROW_STATUS] != 0)
            someone_failed = true;
    if (someone_failed) {
        if (my_status == DF_MPI__LEAVING)
            return 0;
        if (my_status != 0)
            return my_status;
        for (int r = 0; r < ctx->size; r++) {
            int st = (int)(int64_t)rows[r * DF_MPI__ROW_N + DF_MPI__ROW_STATUS];
            if (st == DF_MPI__LEAVING)
                fprintf(stderr, "df_mpi: rank %d: the pool did not start: "
                                "rank %d finalized without starting it\n",
                        ctx->rank, r);
            else if (st != 0)
                fprintf(stderr, "df_mpi: rank %d: the pool did not start: "
                                "rank %d failed with %s\n", ctx->rank, r,
                        df_mpi_err_name(st));
        }
        return DF_ESTATE;
    }
    if (master[DF_MPI__ROW_FLAGS] & DF_MPI_NO_TABLE_CHECK)
        return 0;
    bool differ = false;
    for (int r = 1; r < ctx->size; r++)
        if (rows[r * DF_MPI__ROW_N + DF_MPI__ROW_HASH] !=
            master[DF_MPI__ROW_HASH])
            differ = true;
    if (!differ)
        return 0;
    if (ctx->rank == 0) {
        fprintf(stderr, "df_mpi: the registered function names differ "
                        "between ranks; ranks differing from rank 0:");
        for (int r = 1; r < ctx->size; r++)
            if (rows[r * DF_MPI__ROW_N + DF_MPI__ROW_HASH] !=
                master[DF_MPI__ROW_HASH])
                fprintf(stderr, " %d", r);
        fprintf(stderr, "\n");
    } else if (mine[DF_MPI__ROW_HASH] != master[DF_MPI__ROW_HASH]) {
        fprintf(stderr,
                "df_mpi: rank %d: registered function names (%zu of them, "
                "hash %016llx) differ from rank 0's (hash %016llx)\n",
                ctx->rank, ctx->n, (unsigned long long)ctx->hash,
                (unsigned long long)master[DF_MPI__ROW_HASH]);
    }
    return DF_MPI_ETABLE;
}
