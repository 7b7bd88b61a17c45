/* SPDX-License-Identifier: MIT */
/* spawn-floor: the least a job runner can do per job, for comparing dfrun. */
/*
 * Usage: spawn-floor N JOBS [COMMAND [ARGS...]]
 * Runs COMMAND (default: true) N times with at most JOBS children at once,
 * the job's number (1 to N) appended as its last argument, as xargs -n1
 * and dfrun append their input: posix_spawnp, then wait for any child and
 * spawn the next, on one thread; no output capture, no input reading,
 * nothing else.  What a runner costs per job beyond this program is its
 * own overhead.
 */
#include <errno.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

extern char **environ;

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: spawn-floor N JOBS [COMMAND [ARGS...]]\n");
        return 2;
    }
    long n = strtol(argv[1], NULL, 10);
    long jobs = strtol(argv[2], NULL, 10);
    char *def[] = {"true"};
    char **words = argc > 3 ? argv + 3 : def;
    int nw = argc > 3 ? argc - 3 : 1;
    char **cmd = calloc((size_t)nw + 2, sizeof *cmd);
    char num[24];
    if (cmd == NULL)
        return 1;
    memcpy(cmd, words, (size_t)nw * sizeof *cmd);
    cmd[nw] = num;
    if (n < 0 || jobs < 1) {
        fprintf(stderr, "spawn-floor: bad N or JOBS\n");
        return 2;
    }
    long started = 0, running = 0, failed = 0;
    while (started < n || running > 0) {
        while (started < n && running < jobs) {
            pid_t pid;
            snprintf(num, sizeof num, "%ld", started + 1);
            int rc = posix_spawnp(&pid, cmd[0], NULL, NULL, cmd, environ);
            if (rc != 0) {
                fprintf(stderr, "spawn-floor: %s: %s\n", cmd[0], strerror(rc));
                return 1;
            }
            started++;
            running++;
        }
        int status;
        pid_t pid = wait(&status);
        if (pid < 0) {
            if (errno == EINTR)
                continue;
            perror("spawn-floor: wait");
            return 1;
        }
        running--;
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            failed++;
    }
    free(cmd);
    return failed ? 1 : 0;
}
