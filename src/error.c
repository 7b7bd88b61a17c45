/* SPDX-License-Identifier: MIT */
/* Error names and descriptions, generated from the DF_ERRNO_MAP table. */
#include <limits.h>
#include <string.h>

#include "deferred-internal.h"

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
    if (code == INT_MIN)
        return "unknown error";
    const char *text = strerrordesc_np(code < 0 ? -code : code);
    return text != NULL ? text : "unknown error";
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
        return "DF_UNKNOWN";
    }
}
