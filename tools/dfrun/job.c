/* SPDX-License-Identifier: MIT */
/* dfrun: building a job's command line, running it and capturing output. */
#include "dfrun.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

/* Output beyond this many bytes goes to an unlinked temporary file, so
 * that the jobs held back by --keep-order cost little memory. */
#define DFR_SPILL_BYTES (1u << 20)

/* -------------------------------------------------------------- strings */

int dfr_str_add(struct dfr_str *s, const char *p, size_t n)
{
    if (s->len + n + 1 > s->cap) {
        size_t cap = s->cap ? s->cap : 64;
        while (cap < s->len + n + 1)
            cap *= 2;
        char *np = realloc(s->p, cap);
        if (np == NULL)
            return -ENOMEM;
        s->p = np;
        s->cap = cap;
    }
    memcpy(s->p + s->len, p, n);
    s->len += n;
    s->p[s->len] = '\0';
    return 0;
}

/* Characters that mean nothing to the shell anywhere in a word. */
static bool plain_char(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c >= '0' && c <= '9') || strchr("_./,:@%+-", c) != NULL;
}

/* Plain words stay as they are; anything else goes in single quotes, each
 * ' written as '\'' (the one character single quotes cannot hold). */
int dfr_str_add_quoted(struct dfr_str *s, const char *p, size_t n)
{
    bool plain = n > 0;
    for (size_t i = 0; i < n && plain; i++)
        plain = plain_char((unsigned char)p[i]);
    if (plain)
        return dfr_str_add(s, p, n);
    if (dfr_str_add(s, "'", 1) != 0)
        return -ENOMEM;
    for (size_t i = 0; i < n; i++) {
        int rc = p[i] == '\'' ? dfr_str_add(s, "'\\''", 4)
                              : dfr_str_add(s, p + i, 1);
        if (rc != 0)
            return rc;
    }
    return dfr_str_add(s, "'", 1);
}

/* The replacement strings, GNU parallel's spelling.  {} whole input, {/}
 * basename, {//} dirname, {.} without extension, {/.} basename without
 * extension, {#} the job's sequence number. */
enum repl { R_NONE, R_WHOLE, R_BASE, R_DIR, R_NOEXT, R_BASE_NOEXT, R_SEQ };

static enum repl match_repl(const char *p, size_t *len)
{
    static const struct { const char *s; enum repl r; } tab[] = {
        {"{}", R_WHOLE}, {"{/}", R_BASE}, {"{//}", R_DIR},
        {"{.}", R_NOEXT}, {"{/.}", R_BASE_NOEXT}, {"{#}", R_SEQ}};
    for (size_t i = 0; i < sizeof tab / sizeof tab[0]; i++) {
        size_t n = strlen(tab[i].s);
        if (strncmp(p, tab[i].s, n) == 0) {
            *len = n;
            return tab[i].r;
        }
    }
    return R_NONE;
}

bool dfr_has_repl(const char *templ)
{
    size_t n;
    for (const char *p = strchr(templ, '{'); p; p = strchr(p + 1, '{'))
        if (match_repl(p, &n) != R_NONE)
            return true;
    return false;
}

/* The part of `in` a replacement string stands for, as [*b, *b + *n). */
static void repl_span(enum repl r, const char *in, const char **b, size_t *n)
{
    size_t len = strlen(in);
    const char *slash = strrchr(in, '/');
    const char *base = slash ? slash + 1 : in;
    switch (r) {
    case R_BASE:
        *b = base;
        *n = len - (size_t)(base - in);
        return;
    case R_DIR:
        if (slash == NULL) {
            *b = ".";
            *n = 1;
        } else if (slash == in) {
            *b = "/";
            *n = 1;
        } else {
            *b = in;
            *n = (size_t)(slash - in);
        }
        return;
    case R_NOEXT:
    case R_BASE_NOEXT: {
        /* The extension is the last dot of the basename and what follows,
         * unless that dot starts the basename (".profile"). */
        const char *dot = strrchr(base, '.');
        const char *stop = dot && dot != base ? dot : in + len;
        *b = r == R_NOEXT ? in : base;
        *n = (size_t)(stop - *b);
        return;
    }
    default:
        *b = in;
        *n = len;
        return;
    }
}

char *dfr_build_command(const struct dfr_shared *sh, const char *input,
                        uint64_t seq)
{
    struct dfr_str s = {NULL, 0, 0};
    int rc = 0;
    if (sh->templ == NULL) {
        /* No command: the input is itself the command line. */
        rc = dfr_str_add(&s, input, strlen(input));
    } else if (!sh->templ_has_repl) {
        rc = dfr_str_add(&s, sh->templ, strlen(sh->templ));
        if (rc == 0)
            rc = dfr_str_add(&s, " ", 1);
        if (rc == 0)
            rc = dfr_str_add_quoted(&s, input, strlen(input));
    } else {
        const char *p = sh->templ;
        while (rc == 0 && *p) {
            size_t n;
            enum repl r = *p == '{' ? match_repl(p, &n) : R_NONE;
            if (r == R_NONE) {
                const char *q = strchr(p + 1, '{');
                size_t k = q ? (size_t)(q - p) : strlen(p);
                rc = dfr_str_add(&s, p, k);
                p += k;
                continue;
            }
            p += n;
            if (r == R_SEQ) {
                char num[24];
                int k = snprintf(num, sizeof num, "%" PRIu64, seq);
                rc = dfr_str_add(&s, num, (size_t)k);
            } else {
                const char *b;
                size_t k;
                repl_span(r, input, &b, &k);
                rc = dfr_str_add_quoted(&s, b, k);
            }
        }
    }
    if (rc == 0 && s.p == NULL)
        rc = dfr_str_add(&s, "", 0);
    if (rc != 0) {
        free(s.p);
        return NULL;
    }
    return s.p;
}

/* -------------------------------------------------------- direct exec */

/* A command line of plain words only, whose first word is no shell
 * builtin or keyword, means the same to /bin/sh -c as to exec: run it
 * directly and save the shell's start-up (this is what keeps dfrun's
 * per-job cost near xargs).  Fills argv (pointing into the copy `buf`)
 * and returns true; false means: use the shell. */
static bool split_plain(char *buf, char **argv, size_t max)
{
    static const char *const shell_words[] = {
        ".", ":", "alias", "bg", "break", "case", "cd", "command",
        "continue", "do", "done", "echo", "elif", "else", "esac", "eval",
        "exec", "exit", "export", "fc", "fg", "fi", "for", "getopts", "hash",
        "if", "in", "jobs", "kill", "local", "printf", "pwd", "read",
        "readonly", "return", "set", "shift", "test", "then", "times",
        "trap", "type", "ulimit", "umask", "unalias", "unset", "until",
        "wait", "while"};
    for (const char *p = buf; *p; p++)
        if (*p != ' ' && !plain_char((unsigned char)*p))
            return false;
    size_t n = 0;
    char *save = NULL;
    /* strtok_r: several workers split commands at once. */
    for (char *p = strtok_r(buf, " ", &save); p;
         p = strtok_r(NULL, " ", &save)) {
        if (n + 1 >= max)
            return false;
        argv[n++] = p;
    }
    argv[n] = NULL;
    if (n == 0)
        return false;
    for (size_t i = 0; i < sizeof shell_words / sizeof shell_words[0]; i++)
        if (strcmp(argv[0], shell_words[i]) == 0)
            return false;
    return true;
}

/* ------------------------------------------------------------- running */

uint64_t dfr_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

double dfr_wall(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Appends output; beyond DFR_SPILL_BYTES it all moves to a temporary
 * file.  0 or -errno (then the output is cut and says so). */
static int out_add(struct dfr_job *j, const char *p, size_t n)
{
    if (j->spill_fd < 0 && j->out_len + n > DFR_SPILL_BYTES) {
        const char *dir = getenv("TMPDIR");
        char path[4096];
        snprintf(path, sizeof path, "%s/dfrun.XXXXXX",
                 dir && *dir ? dir : "/tmp");
        int fd = mkostemp(path, O_CLOEXEC);
        if (fd >= 0) {
            unlink(path);
            j->spill_fd = fd;
            size_t done = 0;
            while (done < j->out_len) {
                ssize_t w = write(fd, j->out + done, j->out_len - done);
                if (w < 0 && errno == EINTR)
                    continue;
                if (w <= 0)
                    return -errno;
                done += (size_t)w;
            }
            free(j->out);
            j->out = NULL;
            j->out_cap = 0;
        }
        /* Without a temporary file, keep growing the buffer. */
    }
    if (j->spill_fd >= 0) {
        while (n > 0) {
            ssize_t w = write(j->spill_fd, p, n);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0)
                return w < 0 ? -errno : -EIO;
            p += w;
            n -= (size_t)w;
            j->out_len += (size_t)w;
        }
        return 0;
    }
    if (j->out_len + n > j->out_cap) {
        size_t cap = j->out_cap ? j->out_cap : 4096;
        while (cap < j->out_len + n)
            cap *= 2;
        char *np = realloc(j->out, cap);
        if (np == NULL)
            return -ENOMEM;
        j->out = np;
        j->out_cap = cap;
    }
    memcpy(j->out + j->out_len, p, n);
    j->out_len += n;
    return 0;
}

static void out_reset(struct dfr_job *j)
{
    if (j->spill_fd >= 0)
        close(j->spill_fd);
    j->spill_fd = -1;
    j->out_len = 0;
}

static void out_note(struct dfr_job *j, const char *fmt, const char *a,
                     const char *b)
{
    char msg[512];
    int n = snprintf(msg, sizeof msg, fmt, dfr_progname, a, b);
    if (n > 0)
        out_add(j, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
}

static int pidfd_open_(pid_t pid)
{
#ifdef SYS_pidfd_open
    return (int)syscall(SYS_pidfd_open, pid, 0);
#else
    (void)pid;
    errno = ENOSYS;
    return -1;
#endif
}

/* What a worker thread keeps from one job to the next: the spawn file
 * actions (stdin from /dev/null, stdout and stderr to out_fd), built once,
 * since glibc checks each fd of adddup2 against the fd limit with a system
 * call, and the fd number they name.  Each job's pipe write end is put on
 * out_fd with dup3 before the spawn, and /dev/null after it, so that the
 * pipe still reaches end of file once the job and its children are gone.
 * Made on first use by each pool thread, freed by slot_free when that
 * thread exits (dfr_slots_init's key). */
struct dfr_slot {
    int out_fd;
    posix_spawn_file_actions_t fa;
};

static pthread_key_t slot_key;

static void slot_free(void *p)
{
    struct dfr_slot *sl = p;
    posix_spawn_file_actions_destroy(&sl->fa);
    close(sl->out_fd);
    free(sl);
}

int dfr_slots_init(struct dfr_shared *sh)
{
    int rc = pthread_key_create(&slot_key, slot_free);
    if (rc != 0)
        return -rc;
    sigset_t none, dfl;
    sigemptyset(&none);
    sigemptyset(&dfl);
    int sigs[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE, SIGUSR1,
                  SIGUSR2, SIGCHLD};
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
        sigaddset(&dfl, sigs[i]);
    /* Its own process group, so that a kill reaches the job's children
     * too and the terminal's Ctrl-C reaches only dfrun. */
    posix_spawnattr_init(&sh->spawn_attr);
    posix_spawnattr_setpgroup(&sh->spawn_attr, 0);
    posix_spawnattr_setsigmask(&sh->spawn_attr, &none);
    posix_spawnattr_setsigdefault(&sh->spawn_attr, &dfl);
    posix_spawnattr_setflags(&sh->spawn_attr, POSIX_SPAWN_SETPGROUP |
                                                  POSIX_SPAWN_SETSIGMASK |
                                                  POSIX_SPAWN_SETSIGDEF);
    return 0;
}

void dfr_slots_fini(struct dfr_shared *sh)
{
    posix_spawnattr_destroy(&sh->spawn_attr);
    pthread_key_delete(slot_key);
}

/* This thread's slot, made on first use; NULL when out of fds or memory. */
static struct dfr_slot *slot_get(const struct dfr_shared *sh)
{
    struct dfr_slot *sl = pthread_getspecific(slot_key);
    if (sl != NULL)
        return sl;
    sl = malloc(sizeof *sl);
    if (sl == NULL)
        return NULL;
    sl->out_fd = fcntl(sh->devnull, F_DUPFD_CLOEXEC, 3);
    if (sl->out_fd < 0) {
        free(sl);
        return NULL;
    }
    posix_spawn_file_actions_init(&sl->fa);
    if (posix_spawn_file_actions_adddup2(&sl->fa, sh->devnull, 0) != 0 ||
        posix_spawn_file_actions_adddup2(&sl->fa, sl->out_fd, 1) != 0 ||
        posix_spawn_file_actions_adddup2(&sl->fa, sl->out_fd, 2) != 0 ||
        pthread_setspecific(slot_key, sl) != 0) {
        slot_free(sl);
        return NULL;
    }
    return sl;
}

/* Spawns the job with its output on the slot's out_fd. */
static int spawn(struct dfr_job *j, const struct dfr_slot *sl, pid_t *pid)
{
    const struct dfr_shared *sh = j->sh;
    const posix_spawn_file_actions_t *fa = &sl->fa;
    const posix_spawnattr_t *at = &sh->spawn_attr;
    int rc;

    char *argv[64];
    char *copy = strdup(j->cmd);
    if (copy != NULL && split_plain(copy, argv, 64)) {
        rc = posix_spawnp(pid, argv[0], fa, at, argv, environ);
        if (rc == ENOENT)
            out_note(j, "%s: %s: command not found%s\n", argv[0], "");
        else if (rc != 0)
            out_note(j, "%s: %s: %s\n", argv[0], strerror(rc));
        if (rc != 0)
            rc = rc == ENOENT ? 127 : 126;
    } else {
        char *sh_argv[] = {"sh", "-c", j->cmd, NULL};
        rc = posix_spawn(pid, "/bin/sh", fa, at, sh_argv, environ);
        if (rc != 0) {
            out_note(j, "%s: cannot start /bin/sh: %s%s\n", strerror(rc), "");
            rc = 127;
        }
    }
    free(copy);
    return rc;
}

static int ms_until(uint64_t deadline, uint64_t now)
{
    if (deadline <= now)
        return 0;
    uint64_t ms = (deadline - now + 999999) / 1000000;
    return ms > 60000 ? 60000 : (int)ms;
}

/* One attempt: spawn, capture until the child is gone and its output
 * closed, apply --timeout and the kill requests.  Sets exitval/sig. */
static void run_once(struct dfr_job *j)
{
    struct dfr_shared *sh = j->sh;
    const struct dfr_options *o = sh->opt;
    int p[2];
    pid_t pid;

    j->timed_out = false;
    j->sig = 0;
    j->start = dfr_wall();
    uint64_t t0 = dfr_now_ns();
    struct dfr_slot *sl = slot_get(sh);
    if (sl == NULL || pipe2(p, O_CLOEXEC) != 0) {
        out_note(j, "%s: pipe: %s%s\n", strerror(errno), "");
        j->exitval = 127;
        j->duration = 0;
        return;
    }
    int rc;
    if (dup3(p[1], sl->out_fd, O_CLOEXEC) < 0) {
        out_note(j, "%s: dup3: %s%s\n", strerror(errno), "");
        rc = 127;
    } else {
        rc = spawn(j, sl, &pid);
        /* Our copies of the write end go, so that the pipe ends when the
         * job's last process closes it. */
        dup3(sh->devnull, sl->out_fd, O_CLOEXEC);
    }
    close(p[1]);
    if (rc != 0) {
        close(p[0]);
        j->exitval = rc;
        j->duration = (double)(dfr_now_ns() - t0) / 1e9;
        return;
    }

    int pidfd = pidfd_open_(pid);
    int out = p[0];
    bool exited = false;       /* pidfd said the child has ended      */
    bool killing = false;      /* SIGTERM sent                        */
    bool killed_hard = false;  /* SIGKILL sent                        */
    uint64_t deadline = o->timeout_ns ? t0 + o->timeout_ns : 0;
    uint64_t kill_at = 0;      /* when SIGKILL follows the SIGTERM    */
    char buf[65536];

    /* Without a pidfd (old kernels) the loop ends at end of output and a
     * blocking waitpid follows. */
    while (out >= 0 || (pidfd >= 0 && !exited)) {
        struct pollfd fds[3];
        int nf = 0, i_out = -1, i_pid = -1, i_kill = -1;
        if (out >= 0) {
            fds[nf] = (struct pollfd){out, POLLIN, 0};
            i_out = nf++;
        }
        if (pidfd >= 0 && !exited) {
            fds[nf] = (struct pollfd){pidfd, POLLIN, 0};
            i_pid = nf++;
        }
        if (!killing) {
            fds[nf] = (struct pollfd){sh->kill_pipe[0], POLLIN, 0};
            i_kill = nf++;
        }
        if (pidfd < 0 && out < 0)
            break;
        uint64_t now = dfr_now_ns();
        int tmo = -1;
        if (deadline && !killing)
            tmo = ms_until(deadline, now);
        if (killing && !killed_hard)
            tmo = ms_until(kill_at, now);
        int n = poll(fds, (nfds_t)nf, tmo);
        if (n < 0 && errno != EINTR)
            break;
        now = dfr_now_ns();
        if (!killing && ((i_kill >= 0 && n > 0 && fds[i_kill].revents) ||
                         (deadline && now >= deadline))) {
            if (!(i_kill >= 0 && n > 0 && fds[i_kill].revents))
                j->timed_out = true;
            killing = true;
            kill_at = now + o->grace_ns;
            killpg(pid, o->grace_ns ? SIGTERM : SIGKILL);
            killed_hard = o->grace_ns == 0;
        } else if (killing && !killed_hard && now >= kill_at) {
            killpg(pid, SIGKILL);
            killed_hard = true;
        }
        if (n <= 0)
            continue;
        if (i_out >= 0 && fds[i_out].revents) {
            /* POLLHUP without POLLIN: no writer and nothing left to read,
             * so end of file without a read. */
            ssize_t r = fds[i_out].revents & POLLIN
                            ? read(out, buf, sizeof buf) : 0;
            if (r > 0) {
                out_add(j, buf, (size_t)r);
            } else if (r == 0 || (errno != EINTR && errno != EAGAIN)) {
                close(out);
                out = -1;
            }
        }
        if (i_pid >= 0 && fds[i_pid].revents) {
            exited = true;
            /* The child is gone; what it wrote is in the pipe.  Take what
             * is there without waiting for processes it left behind,
             * which may keep the pipe open. */
            if (out >= 0) {
                fcntl(out, F_SETFL, O_NONBLOCK);
                ssize_t r;
                while ((r = read(out, buf, sizeof buf)) > 0 ||
                       (r < 0 && errno == EINTR))
                    if (r > 0)
                        out_add(j, buf, (size_t)r);
                close(out);
                out = -1;
            }
        }
    }
    if (out >= 0)
        close(out);
    if (pidfd >= 0)
        close(pidfd);

    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    /* Processes the job left in its group die with it on a kill. */
    if (killing)
        killpg(pid, SIGKILL);
    j->duration = (double)(dfr_now_ns() - t0) / 1e9;
    if (WIFSIGNALED(status)) {
        j->exitval = -1;
        j->sig = WTERMSIG(status);
    } else {
        j->exitval = WEXITSTATUS(status);
    }
    if (j->timed_out) {
        char secs[32];
        snprintf(secs, sizeof secs, "%.3g", (double)o->timeout_ns / 1e9);
        out_note(j, "%s: timed out after %s s: %s\n", secs, j->cmd);
    }
}

void dfr_job_run(struct dfr_job *j)
{
    struct dfr_shared *sh = j->sh;
    const struct dfr_options *o = sh->opt;

    j->ran = true;
    j->cmd = dfr_build_command(sh, j->input, j->seq);
    if (j->cmd == NULL) {
        out_note(j, "%s: out of memory%s%s\n", "", "");
        j->exitval = 127;
        j->attempts = 0;
        j->start = dfr_wall();
    } else {
        if (o->verbose) {
            /* One write, so that lines from several workers stay whole. */
            struct dfr_str s = {NULL, 0, 0};
            if (dfr_str_add(&s, j->cmd, strlen(j->cmd)) == 0 &&
                dfr_str_add(&s, "\n", 1) == 0)
                (void)!write(2, s.p, s.len);
            free(s.p);
        }
        for (unsigned a = 0; a <= o->retries; a++) {
            if (a > 0) {
                if (atomic_load(&sh->stop))
                    break;
                out_reset(j);
            }
            j->attempts = a + 1;
            run_once(j);
            if (dfr_job_ok(j))
                break;
        }
    }
    if (!dfr_job_ok(j) && o->halt != DFR_HALT_NEVER) {
        unsigned n = atomic_fetch_add(&sh->failures, 1) + 1;
        if (n >= o->halt_fail)
            dfr_request_stop(sh, o->halt == DFR_HALT_NOW);
    }
}

int dfr_job_write_output(const struct dfr_job *j)
{
    if (j->spill_fd < 0) {
        size_t done = 0;
        while (done < j->out_len) {
            ssize_t w = write(1, j->out + done, j->out_len - done);
            if (w < 0 && errno == EINTR)
                continue;
            if (w < 0)
                return -errno;
            done += (size_t)w;
        }
        return 0;
    }
    char buf[65536];
    off_t off = 0;
    for (;;) {
        ssize_t r = pread(j->spill_fd, buf, sizeof buf, off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -errno;
        if (r == 0)
            return 0;
        off += r;
        ssize_t done = 0;
        while (done < r) {
            ssize_t w = write(1, buf + done, (size_t)(r - done));
            if (w < 0 && errno == EINTR)
                continue;
            if (w < 0)
                return -errno;
            done += w;
        }
    }
}

void dfr_job_free(void *p)
{
    struct dfr_job *j = p;
    if (j == NULL)
        return;
    if (j->spill_fd >= 0)
        close(j->spill_fd);
    free(j->input);
    free(j->cmd);
    free(j->out);
    free(j);
}
