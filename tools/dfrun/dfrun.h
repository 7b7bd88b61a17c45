/* SPDX-License-Identifier: MIT */
/* dfrun: declarations shared by the files of the batch runner. */
#ifndef DFRUN_H
#define DFRUN_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <spawn.h>
#include <stdio.h>
#include <sys/types.h>

/* Exit status for usage and setup errors (bad flags, unreadable joblog,
 * output that cannot be written).  Same as GNU parallel. */
#define DFR_EXIT_ERROR 255
/* Exit status for "this many jobs failed" is capped here. */
#define DFR_EXIT_MAX_FAILED 101

enum dfr_halt { DFR_HALT_NEVER, DFR_HALT_SOON, DFR_HALT_NOW };

/* What the command line asked for.  Filled by dfr_parse_options on the main
 * thread before any other thread exists; read-only afterwards. */
struct dfr_options {
    unsigned jobs;          /* most jobs at once                          */
    bool null_sep;          /* -0: inputs on stdin end with NUL           */
    bool keep_order;        /* -k: print in input order                   */
    size_t window;          /* -k: most finished jobs held back           */
    enum dfr_halt halt;     /* --halt                                     */
    unsigned halt_fail;     /* failures that trigger the halt             */
    uint64_t timeout_ns;    /* --timeout, 0: none                         */
    uint64_t grace_ns;      /* SIGTERM to SIGKILL delay                   */
    unsigned retries;       /* --retries: extra attempts of a failed job  */
    const char *joblog;     /* --joblog FILE or NULL                      */
    bool resume;            /* --resume                                   */
    int progress;           /* -1: if stderr is a terminal; 0 off; 1 on   */
    bool read_stdin;        /* read inputs from standard input            */
    bool verbose;           /* -v: print each command on stderr           */
    char **cmd;             /* command words (borrowed from argv)         */
    int ncmd;               /* 0: each input is itself the command        */
    char **args;            /* inputs after ::: (borrowed from argv)      */
    int nargs;
};

/* Parses argv.  Returns 0 to run, 1 when --help or --version printed what
 * they print (exit 0), -1 after a message on stderr (exit DFR_EXIT_ERROR). */
int dfr_parse_options(int argc, char **argv, struct dfr_options *o);
void dfr_usage(FILE *to);

/* State shared by the main thread, the pool threads and the signal thread.
 * The pipes are written, never read: once a byte is in one, its read end
 * stays readable, which every thread polling it sees (a broadcast). */
struct dfr_shared {
    const struct dfr_options *opt;
    char *templ;            /* the command words joined by spaces, or NULL */
    bool templ_has_repl;    /* templ holds a replacement string            */
    int devnull;            /* open on /dev/null: every child's stdin      */
    posix_spawnattr_t spawn_attr; /* every job's, see dfr_slots_init     */
    int stop_pipe[2];       /* readable: launch no more jobs               */
    int kill_pipe[2];       /* readable: terminate running jobs            */
    int done_pipe[2];       /* non-blocking; a byte per job finished
                               while the input reader waits in poll        */
    atomic_uint_fast64_t finished; /* jobs the workers are done with       */
    atomic_uint_fast64_t running;  /* jobs being run by workers now        */
    atomic_bool reader_waiting;    /* the reader is (about to be) in poll,
                                      wanting a byte in done_pipe          */
    uint64_t delivered;     /* of which delivered (main thread only)       */
    atomic_bool stop;       /* same as stop_pipe, cheaper to test          */
    atomic_bool kill;       /* same as kill_pipe                           */
    atomic_uint failures;   /* jobs that failed for good (workers count)  */
    atomic_int signo;       /* the signal that stopped the run, or 0      */
};

/* Asks every thread to stop launching (and, with kill, to terminate the
 * running jobs).  Async-signal-safe and thread-safe; idempotent. */
void dfr_request_stop(struct dfr_shared *sh, bool kill);

/* One input and, once it ran, its outcome.  Made by the input reader on
 * the main thread, filled by one pool thread while the job runs, read and
 * freed on the main thread once the map delivers it (the map's completion
 * orders these accesses). */
struct dfr_job {
    uint64_t seq;           /* 1-based input position                      */
    char *input;            /* the input, NUL-terminated                   */
    struct dfr_shared *sh;
    char *cmd;              /* the command line run (worker builds it)     */
    char *out;              /* captured stdout+stderr of the last attempt  */
    size_t out_len, out_cap;
    int spill_fd;           /* -1, or a temporary file holding all output  */
    bool ran;               /* the worker got to it                        */
    bool timed_out;
    bool tick;              /* no input: only lets the loop run (main.c)   */
    int exitval;            /* exit status, -1 when killed by a signal     */
    int sig;                /* the signal that ended it, or 0              */
    unsigned attempts;
    double start;           /* seconds since the epoch                     */
    double duration;        /* seconds                                     */
};

void dfr_job_free(void *job);
/* True when the job ended with status 0 and no signal. */
static inline bool dfr_job_ok(const struct dfr_job *j)
{
    return j->ran && j->exitval == 0 && j->sig == 0;
}

/* Builds the command line for `input` (job.c).  NULL when out of memory. */
char *dfr_build_command(const struct dfr_shared *sh, const char *input,
                        uint64_t seq);
/* True when templ holds a replacement string such as {}. */
bool dfr_has_repl(const char *templ);
/* Appends `s`, shell-quoted when it needs to be, to the string buffer. */
struct dfr_str {
    char *p;
    size_t len, cap;
};
int dfr_str_add(struct dfr_str *s, const char *p, size_t n);
int dfr_str_add_quoted(struct dfr_str *s, const char *p, size_t n);

/* The spawn attributes in sh (own process group, signals reset) and the
 * per-thread spawn state of job.c: init once on the main thread after
 * sh->devnull is open and before any job runs (0 or -errno); fini once
 * the pool threads have exited. */
int dfr_slots_init(struct dfr_shared *sh);
void dfr_slots_fini(struct dfr_shared *sh);
/* Runs the job to completion, with retries (job.c).  Pool thread. */
void dfr_job_run(struct dfr_job *j);
/* Writes the job's captured output to fd 1; 0 or -errno. */
int dfr_job_write_output(const struct dfr_job *j);

/* Input reader (input.c): the ::: arguments, then standard input. */
struct dfr_reader;
int dfr_reader_new(const struct dfr_options *o, struct dfr_shared *sh,
                   struct dfr_reader **out);
/* 1 and *line (malloc'd, the caller frees it) for an input, 0 at the end of
 * the inputs or once a stop was requested, negative errno on a read error;
 * 2 (only after dfr_reader_set_wake) when standard input has nothing yet
 * but the loop has work waiting (call again later). */
int dfr_reader_next(struct dfr_reader *r, char **line);
void dfr_reader_free(struct dfr_reader *r);
/* From now on, while waiting for input, return 2 when `fd` (a non-blocking
 * pipe that workers write to as jobs finish; emptied here) is readable,
 * or after tick_ms milliseconds (-1: never). */
void dfr_reader_set_wake(struct dfr_reader *r, int fd, int tick_ms);

/* Joblog (joblog.c).  A set of sequence numbers that already succeeded. */
struct dfr_seqset {
    uint64_t *v;
    size_t n, cap;
    bool sorted;
};
/* Reads the successful sequence numbers of `path` into `set`.  A missing
 * file is an empty set.  0, or -1 after a message on stderr. */
int dfr_joblog_read(const char *path, struct dfr_seqset *set);
bool dfr_seqset_has(struct dfr_seqset *set, uint64_t seq);
void dfr_seqset_free(struct dfr_seqset *set);
/* Opens the joblog: appends with --resume (the header only when it is
 * empty), else truncates and writes the header.  NULL after a message. */
FILE *dfr_joblog_open(const char *path, bool append);
/* Writes one line for a finished job and flushes it; 0 or -1. */
int dfr_joblog_write(FILE *f, const struct dfr_job *j);

/* Monotonic and wall clocks, in nanoseconds and seconds. */
uint64_t dfr_now_ns(void);
double dfr_wall(void);

extern const char *dfr_progname;

#endif /* DFRUN_H */
