/* SPDX-License-Identifier: MIT */
/* What every example does the same way: its name in messages and a checked
 * stdout at exit.  Not part of the library; examples include it. */
#ifndef DF_EXAMPLE_UTIL_H
#define DF_EXAMPLE_UTIL_H

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The program's name for messages: the last component of argv[0], without
 * the "lt-" prefix of the copy libtool runs from .libs/ before install.
 * Returns a pointer into argv0 (or a fallback), so the caller may store it
 * in argv[0] for getopt's own messages. */
static inline char *example_name(char *argv0, char *fallback)
{
    if (argv0 == NULL || argv0[0] == '\0')
        return fallback;
    char *slash = strrchr(argv0, '/');
    char *name = slash != NULL ? slash + 1 : argv0;
    if (strncmp(name, "lt-", 3) == 0 && name[3] != '\0')
        name += 3;
    return name[0] != '\0' ? name : fallback;
}

/* Opens /dev/null on any of descriptors 0, 1 and 2 that is closed, so
 * that no descriptor a library opens later lands there (libuv asserts
 * that its own descriptors are above 2, and output to a closed stdout
 * must fail, not reach one of them).  Returns 0, or -1 if one could not
 * be opened. */
static inline int example_keep_stdio(void)
{
    for (int fd = 0; fd <= 2; fd++) {
        if (fcntl(fd, F_GETFD) != -1)
            continue;
        int n = open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY);
        if (n < 0)
            return -1;
        if (n != fd) { /* a lower one was closed too and is taken now */
            close(n);
            return -1;
        }
    }
    return 0;
}

/* Flushes and closes stdout, so that output that could not be written (a
 * full disk, a closed pipe, >/dev/full) is an error, not silence.  Returns
 * `status`, or EXIT_FAILURE after a message if the output was lost. */
static inline int example_close_stdout(const char *name, int status)
{
    errno = 0;
    int bad = fflush(stdout) != 0 || ferror(stdout);
    int err = errno;
    if (fclose(stdout) != 0 && !bad) {
        bad = 1;
        err = errno;
    }
    if (bad) {
        fprintf(stderr, "%s: writing output: %s\n", name,
                err != 0 ? strerror(err) : "error");
        return EXIT_FAILURE;
    }
    return status;
}

#endif /* DF_EXAMPLE_UTIL_H */
