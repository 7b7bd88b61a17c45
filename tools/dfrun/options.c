/* SPDX-License-Identifier: MIT */
/* dfrun: command-line parsing into struct dfr_options. */
#include "dfrun.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <deferred.h>

void dfr_usage(FILE *to)
{
    fprintf(to,
        "usage: %s [options] [command [arg...]] [::: input...]\n"
        "Runs command once per input (standard input lines, or the inputs\n"
        "after :::), several at once, each job's output printed whole.\n"
        "  -j, --jobs N        at most N jobs at once (default: online CPUs)\n"
        "  -0, --null          inputs on standard input end with NUL\n"
        "  -k, --keep-order    print outputs in input order\n"
        "      --window N      with -k: most finished jobs held back\n"
        "      --stdin         read standard input after the ::: inputs\n"
        "      --halt WHEN     never (default), soon or now [,fail=N]\n"
        "      --timeout SECS  terminate a job running longer than SECS\n"
        "      --grace SECS    SIGTERM to SIGKILL delay (default 2)\n"
        "      --retries N     run a failed job up to N more times\n"
        "      --joblog FILE   one line per finished job\n"
        "      --resume        skip jobs the joblog records as successful\n"
        "      --progress      progress line on stderr even if not a tty\n"
        "      --no-progress   no progress line\n"
        "  -v, --verbose       print each command on stderr as it starts\n"
        "  -h, --help          this text\n"
        "      --version       the version\n"
        "Replacement strings: {} {/} {.} {/.} {//} {#}; without one the\n"
        "input is appended.  Commands run with /bin/sh -c.  See dfrun(1).\n",
        dfr_progname);
}

static int bad(const char *fmt, const char *arg)
{
    fprintf(stderr, "%s: ", dfr_progname);
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\nTry '%s --help' for more information.\n",
            dfr_progname);
    return -1;
}

/* A whole decimal number in [min, max]. */
static int parse_uint(const char *s, unsigned long min, unsigned long max,
                      unsigned long *out)
{
    char *end;
    if (*s < '0' || *s > '9')
        return -1;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno != 0 || *end != '\0' || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

/* Seconds as a non-negative decimal, into nanoseconds. */
static int parse_secs(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno != 0 || end == s || *end != '\0' || !(v >= 0) || v > 1e9)
        return -1;
    *out = (uint64_t)llround(v * 1e9);
    return 0;
}

static int parse_halt(const char *s, struct dfr_options *o)
{
    const char *comma = strchr(s, ',');
    size_t n = comma ? (size_t)(comma - s) : strlen(s);
    if (n == 5 && strncmp(s, "never", 5) == 0)
        o->halt = DFR_HALT_NEVER;
    else if (n == 4 && strncmp(s, "soon", 4) == 0)
        o->halt = DFR_HALT_SOON;
    else if (n == 3 && strncmp(s, "now", 3) == 0)
        o->halt = DFR_HALT_NOW;
    else
        return -1;
    o->halt_fail = 1;
    if (comma) {
        unsigned long v;
        if (strncmp(comma + 1, "fail=", 5) != 0 ||
            parse_uint(comma + 6, 1, 1000000000, &v) != 0)
            return -1;
        o->halt_fail = (unsigned)v;
    }
    return 0;
}

enum {
    OPT_WINDOW = 256, OPT_STDIN, OPT_HALT, OPT_TIMEOUT, OPT_GRACE,
    OPT_RETRIES, OPT_JOBLOG, OPT_RESUME, OPT_PROGRESS, OPT_NO_PROGRESS,
    OPT_VERSION
};

int dfr_parse_options(int argc, char **argv, struct dfr_options *o)
{
    static const struct option longopts[] = {
        {"jobs", required_argument, NULL, 'j'},
        {"null", no_argument, NULL, '0'},
        {"keep-order", no_argument, NULL, 'k'},
        {"window", required_argument, NULL, OPT_WINDOW},
        {"stdin", no_argument, NULL, OPT_STDIN},
        {"halt", required_argument, NULL, OPT_HALT},
        {"timeout", required_argument, NULL, OPT_TIMEOUT},
        {"grace", required_argument, NULL, OPT_GRACE},
        {"retries", required_argument, NULL, OPT_RETRIES},
        {"joblog", required_argument, NULL, OPT_JOBLOG},
        {"resume", no_argument, NULL, OPT_RESUME},
        {"progress", no_argument, NULL, OPT_PROGRESS},
        {"no-progress", no_argument, NULL, OPT_NO_PROGRESS},
        {"verbose", no_argument, NULL, 'v'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, OPT_VERSION},
        {NULL, 0, NULL, 0}};
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    bool force_stdin = false;
    unsigned long v;

    memset(o, 0, sizeof *o);
    o->jobs = cpus >= 1 ? (unsigned)(cpus > 4096 ? 4096 : cpus) : 1;
    o->progress = -1;
    o->grace_ns = 2000000000u;
    o->halt_fail = 1;

    /* '+': stop at the first non-option, the command; ':' first to tell a
     * missing argument from an unknown option. */
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, "+:j:0kvh", longopts, NULL)) != -1) {
        switch (c) {
        case 'j':
            if (parse_uint(optarg, 1, 65536, &v) != 0)
                return bad("-j: '%s' is not a number from 1 to 65536", optarg);
            o->jobs = (unsigned)v;
            break;
        case '0':
            o->null_sep = true;
            break;
        case 'k':
            o->keep_order = true;
            break;
        case OPT_WINDOW:
            if (parse_uint(optarg, 1, 1u << 24, &v) != 0)
                return bad("--window: '%s' is not a number from 1 to 16777216",
                           optarg);
            o->window = v;
            break;
        case OPT_STDIN:
            force_stdin = true;
            break;
        case OPT_HALT:
            if (parse_halt(optarg, o) != 0)
                return bad("--halt: '%s' is not never, soon or now, with an "
                           "optional ,fail=N", optarg);
            break;
        case OPT_TIMEOUT:
            if (parse_secs(optarg, &o->timeout_ns) != 0 || o->timeout_ns == 0)
                return bad("--timeout: '%s' is not a positive number of "
                           "seconds", optarg);
            break;
        case OPT_GRACE:
            if (parse_secs(optarg, &o->grace_ns) != 0)
                return bad("--grace: '%s' is not a number of seconds", optarg);
            break;
        case OPT_RETRIES:
            if (parse_uint(optarg, 0, 1000000, &v) != 0)
                return bad("--retries: '%s' is not a number from 0 to 1000000",
                           optarg);
            o->retries = (unsigned)v;
            break;
        case OPT_JOBLOG:
            if (*optarg == '\0')
                return bad("--joblog: %sempty file name", "");
            o->joblog = optarg;
            break;
        case OPT_RESUME:
            o->resume = true;
            break;
        case OPT_PROGRESS:
            o->progress = 1;
            break;
        case OPT_NO_PROGRESS:
            o->progress = 0;
            break;
        case 'v':
            o->verbose = true;
            break;
        case 'h':
            dfr_usage(stdout);
            return 1;
        case OPT_VERSION:
            printf("%s (libdeferred) %s\n", dfr_progname, DF_VERSION_STRING);
            return 1;
        case ':':
            if (optopt != 0 && optopt < 256)
                return bad("option -%c needs an argument",
                           (char[]){(char)optopt, '\0'});
            return bad("option %s needs an argument", argv[optind - 1]);
        default:
            if (optopt != 0 && optopt < 256)
                return bad("unknown option -%s", (char[]){(char)optopt, '\0'});
            return bad("unknown option %s", argv[optind - 1]);
        }
    }
    if (o->resume && o->joblog == NULL)
        return bad("--resume needs --joblog FILE%s", "");

    /* The command runs up to ":::"; every word after it is an input. */
    o->cmd = argv + optind;
    int i = optind;
    while (i < argc && strcmp(argv[i], ":::") != 0)
        i++;
    o->ncmd = i - optind;
    bool have_sep = i < argc;
    if (have_sep) {
        o->args = argv + i + 1;
        o->nargs = argc - i - 1;
    }
    o->read_stdin = !have_sep || force_stdin;
    if (o->window == 0)
        o->window = o->jobs * 4u < 16 ? 16 : (size_t)o->jobs * 4u;
    return 0;
}
