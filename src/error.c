/* SPDX-License-Identifier: MIT */
/* Error names and descriptions, generated from the DF_ERRNO_MAP table. */
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "deferred-internal.h"

/* Room for "DF_UNKNOWN(-2147483648)" and its terminator, with margin. */
#define DF__ERR_BUF 32

/* The text of a code outside the table and unknown to the C library is
 * written here: one buffer per thread and per function, so that concurrent
 * callers never share one (the header says how long it stays valid). */
static _Thread_local char strerror_buf[DF__ERR_BUF];
static _Thread_local char name_buf[DF__ERR_BUF];

/* The C library's errno value for `code` of either sign, or 0 if `code`
 * cannot be one (INT_MIN has no positive counterpart). */
static int errno_value(int code)
{
    if (code == INT_MIN)
        return 0;
    return code < 0 ? -code : code;
}

const char *df_strerror(int code)
{
    switch (code) {
#define DF__ERR_TEXT(name, value, text)                                        \
    case (value):                                                              \
        return text;
        DF_ERRNO_MAP(DF__ERR_TEXT)
#undef DF__ERR_TEXT
    case 0:
        return "success";
    default:
        break;
    }
    /* Any other errno value, either sign, gets the C library's static text
     * (strerrordesc_np, unlike strerror, never writes a shared buffer). */
    int e = errno_value(code);
    const char *text = e != 0 ? strerrordesc_np(e) : NULL;
    if (text != NULL)
        return text;
    /* An application's own code: its number. */
    snprintf(strerror_buf, sizeof strerror_buf, "error %d", code);
    return strerror_buf;
}

const char *df_err_name(int code)
{
    switch (code) {
#define DF__ERR_NAME(name, value, text)                                        \
    case (value):                                                              \
        return "DF_" #name;
        DF_ERRNO_MAP(DF__ERR_NAME)
#undef DF__ERR_NAME
    case 0:
        return "DF_OK";
    default:
        break;
    }
    /* errno values outside the table: the C library's static name. */
    int e = errno_value(code);
    const char *name = e != 0 ? strerrorname_np(e) : NULL;
    if (name != NULL)
        return name;
    snprintf(name_buf, sizeof name_buf, "DF_UNKNOWN(%d)", code);
    return name_buf;
}
