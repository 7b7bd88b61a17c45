/* SPDX-License-Identifier: MIT */
/* The version of the library actually linked, as opposed to the header's. */
#include "deferred-internal.h"

const char *df_version(void)
{
    return DF_VERSION_STRING;
}

unsigned long df_version_number(void)
{
    return DF_VERSION_HEX;
}
