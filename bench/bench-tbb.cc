// SPDX-License-Identifier: MIT
// Peer: oneTBB parallel_pipeline, a serial input, a parallel work stage and a serial output.

/*
 * The closest oneTBB idiom to df_map: tbb::parallel_pipeline with LIMIT
 * live tokens over three filters,
 *
 *   serial_in_order input   hands out the next index i (df_map's `next`),
 *   parallel                runs item i's work (bench_tbb_item),
 *   serial_out_of_order     records the value as items complete.
 *
 * The tokens bound the items in flight, as the map's limit does.  The
 * pipeline runs in a task_arena of THREADS slots, none reserved for an
 * application thread, and is enqueued into it: the main thread only waits
 * for its end (as the loop thread of the other programs waits for
 * completions), so THREADS worker threads do all of it, serial stages
 * included.  oneTBB has no loop thread: its serial stages run on whichever
 * worker holds the token.  A global_control raises oneTBB's limit on
 * worker threads to THREADS (its default is the number of CPUs, one of
 * them kept for the application thread).  The workers are started by a
 * warm-up before timing.  oneTBB allocates a small task per stage per
 * item from its own per-thread caches; the items carry no allocation of
 * ours.
 */

#include "bench-tbb.h"

#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/parallel_pipeline.h>
#include <oneapi/tbb/task_arena.h>

#include <condition_variable>
#include <cstdio>
#include <exception>
#include <mutex>
#include <new>

struct bench_tbb {
    bench_tbb(unsigned threads)
        : control(tbb::global_control::max_allowed_parallelism,
                  static_cast<std::size_t>(threads) + 1),
          arena(static_cast<int>(threads), 0)
    {
    }
    tbb::global_control control;
    tbb::task_arena arena;
    unsigned threads = 0;

    // Completion of an enqueued function; the main thread waits on it.
    std::mutex lock;
    std::condition_variable cond;
    bool done = false;
    bool failed = false;

    // Enqueues f into the arena and waits until it has run.
    template <typename F> bool run_in_arena(F f)
    {
        {
            std::lock_guard<std::mutex> g(lock);
            done = false;
            failed = false;
        }
        arena.enqueue([this, f] {
            bool bad = false;
            try {
                f();
            } catch (const std::exception &e) {
                std::fprintf(stderr, "bench-tbb: %s\n", e.what());
                bad = true;
            } catch (...) {
                std::fprintf(stderr, "bench-tbb: unknown exception\n");
                bad = true;
            }
            std::lock_guard<std::mutex> g(lock);
            done = true;
            failed = bad;
            cond.notify_one();
        });
        std::unique_lock<std::mutex> g(lock);
        cond.wait(g, [this] { return done; });
        return !failed;
    }
};

struct bench_tbb_item_value {
    std::uint64_t index;
    std::uint64_t value;
};

extern "C" struct bench_tbb *bench_tbb_new(unsigned threads)
{
    bench_tbb *t = nullptr;
    try {
        t = new bench_tbb(threads);
        t->threads = threads;
        t->arena.initialize();
        // Warm-up: enough small tasks that every worker wakes up once.
        unsigned n = threads * 64;
        bool ok = t->run_in_arena([n] {
            tbb::parallel_for(0u, n, [](unsigned) {
                volatile unsigned spin = 0;
                for (unsigned k = 0; k < 10000; k++)
                    spin = spin + k;
            });
        });
        if (!ok) {
            delete t;
            return nullptr;
        }
        return t;
    } catch (const std::exception &e) {
        std::fprintf(stderr, "bench-tbb: setup: %s\n", e.what());
        delete t;
        return nullptr;
    }
}

extern "C" int bench_tbb_run(struct bench_tbb *t, std::uint64_t n,
                             unsigned limit)
{
    std::uint64_t next = 0;
    bool ok = t->run_in_arena([n, limit, &next] {
        tbb::parallel_pipeline(
            limit,
            tbb::make_filter<void, std::uint64_t>(
                tbb::filter_mode::serial_in_order,
                [n, &next](tbb::flow_control &fc) -> std::uint64_t {
                    if (next == n) {
                        fc.stop();
                        return 0;
                    }
                    return next++;
                }) &
                tbb::make_filter<std::uint64_t, bench_tbb_item_value>(
                    tbb::filter_mode::parallel,
                    [](std::uint64_t i) {
                        return bench_tbb_item_value{i, bench_tbb_item(i)};
                    }) &
                tbb::make_filter<bench_tbb_item_value, void>(
                    tbb::filter_mode::serial_out_of_order,
                    [](bench_tbb_item_value r) {
                        bench_tbb_record(r.index, r.value);
                    }));
    });
    return ok ? 0 : -1;
}

extern "C" void bench_tbb_free(struct bench_tbb *t)
{
    if (t == nullptr)
        return;
    t->arena.terminate();
    delete t;
}
