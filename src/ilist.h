/* SPDX-License-Identifier: MIT */
/* The one intrusive list of the library: circular, doubly linked, with a
 * sentinel head (the model is libuv's src/queue.h and nng's nni_list). */
#ifndef DF_ILIST_H
#define DF_ILIST_H

#include <stdbool.h>
#include <stddef.h>

/* A link embedded in the listed object, and also the type of a list's head.
 * A link that is on no list has next == NULL (df__ilink_init, or
 * df__ilist_remove), so membership costs one load to check. */
typedef struct df__ilink {
    struct df__ilink *prev;
    struct df__ilink *next;
} df__ilink;

#define DF__ILIST_ENTRY(l, type, member)                                      \
    ((type *)((char *)(l)-offsetof(type, member)))

static inline void df__ilist_init(df__ilink *head)
{
    head->prev = head;
    head->next = head;
}

static inline void df__ilink_init(df__ilink *l)
{
    l->prev = l->next = NULL;
}

static inline bool df__ilink_linked(const df__ilink *l)
{
    return l->next != NULL;
}

static inline bool df__ilist_empty(const df__ilink *head)
{
    return head->next == head;
}

/* The first link, or NULL if the list is empty. */
static inline df__ilink *df__ilist_first(const df__ilink *head)
{
    return head->next != head ? head->next : NULL;
}

/* The link after l, or NULL at the end of the list. */
static inline df__ilink *df__ilist_next(const df__ilink *head,
                                        const df__ilink *l)
{
    return l->next != head ? l->next : NULL;
}

static inline void df__ilist_append(df__ilink *head, df__ilink *l)
{
    l->prev = head->prev;
    l->next = head;
    head->prev->next = l;
    head->prev = l;
}

static inline void df__ilist_remove(df__ilink *l)
{
    l->prev->next = l->next;
    l->next->prev = l->prev;
    l->prev = l->next = NULL;
}

/* Removes and returns the first link, or NULL. */
static inline df__ilink *df__ilist_pop(df__ilink *head)
{
    df__ilink *l = df__ilist_first(head);
    if (l != NULL)
        df__ilist_remove(l);
    return l;
}

/* Moves every link of `from` to the end of `to`; `from` becomes empty. */
static inline void df__ilist_splice(df__ilink *to, df__ilink *from)
{
    if (df__ilist_empty(from))
        return;
    from->next->prev = to->prev;
    to->prev->next = from->next;
    from->prev->next = to;
    to->prev = from->prev;
    df__ilist_init(from);
}

#endif /* DF_ILIST_H */
