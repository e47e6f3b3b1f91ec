//! An order-preserving parallel map with a bounded look-ahead, for the decode side of the tokenize pipeline.
//!
//! Every thread of the current rayon pool takes the next item as soon as it is free (no barrier per batch, so one
//! large photograph in a batch does not leave the other threads idle), results are handed to the consumer in
//! input order and in groups of a fixed size (so the model sees the same batches whatever the thread count),
//! and no thread starts an item more than `window` items ahead of what the consumer has taken (bounded memory,
//! backpressure when the model is the slower side).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::channel;
use std::sync::{Condvar, Mutex, PoisonError};

/// How far the producers may run ahead, shared with the consumer.
struct Gate {
    state: Mutex<GateState>,
    moved: Condvar,
}

struct GateState {
    /// Items with an index below this may be started.
    allowed: usize,
    /// The consumer has stopped (finished or failed): producers leave.
    stopped: bool,
}

impl Gate {
    fn new(allowed: usize) -> Gate {
        Gate {
            state: Mutex::new(GateState {
                allowed,
                stopped: false,
            }),
            moved: Condvar::new(),
        }
    }

    /// Blocks until item `i` may start; false when the consumer has stopped.
    fn enter(&self, i: usize) -> bool {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while i >= s.allowed && !s.stopped {
            s = self.moved.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        !s.stopped
    }

    fn allow(&self, allowed: usize) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).allowed = allowed;
        self.moved.notify_all();
    }

    fn stop(&self) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).stopped = true;
        self.moved.notify_all();
    }
}

/// Stops the gate when dropped: on the consumer's return, and also when it panics, so that no producer is left
/// waiting at the gate (the scope would then never join).
struct StopOnDrop<'a>(&'a Gate);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// Maps `items` with `map` on the current rayon pool (`init` makes each thread's scratch state) and passes the
/// results to `consume`, in input order, in groups of `group` (the last one shorter). At most `window` items
/// (at least `group`) are prepared ahead of the consumer. An error from `consume` stops the producers and is
/// returned.
pub(crate) fn ordered_map<T, S, R, E>(
    items: &[T],
    group: usize,
    window: usize,
    init: impl Fn() -> S + Sync,
    map: impl Fn(&mut S, usize, &T) -> R + Sync,
    mut consume: impl FnMut(Vec<R>) -> Result<(), E>,
) -> Result<(), E>
where
    T: Sync,
    R: Send,
{
    let n = items.len();
    let group = group.max(1);
    let window = window.max(group);
    let gate = Gate::new(window);
    let next = AtomicUsize::new(0);
    let (tx, rx) = channel::<(usize, R)>();
    std::thread::scope(|scope| {
        let (gate, next, init, map) = (&gate, &next, &init, &map);
        scope.spawn(move || {
            rayon::scope(|rs| {
                for _ in 0..rayon::current_num_threads() {
                    let tx = tx.clone();
                    rs.spawn(move |_| {
                        let mut state = init();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= n || !gate.enter(i) {
                                break;
                            }
                            if tx.send((i, map(&mut state, i, &items[i]))).is_err() {
                                break;
                            }
                        }
                    });
                }
                // The producers hold the only senders now: the channel closes when the last one leaves.
                drop(tx);
            });
        });

        let stop = StopOnDrop(gate);
        let mut run = || -> Result<(), E> {
            let mut pending = BTreeMap::new();
            let mut batch = Vec::with_capacity(group);
            let mut taken = 0usize;
            for (i, r) in rx.iter() {
                pending.insert(i, r);
                let before = taken;
                while let Some(r) = pending.remove(&taken) {
                    batch.push(r);
                    taken += 1;
                }
                if taken != before {
                    gate.allow(taken + window);
                }
                while batch.len() >= group || (taken == n && !batch.is_empty()) {
                    let rest = batch.split_off(group.min(batch.len()));
                    consume(std::mem::replace(&mut batch, rest))?;
                }
            }
            Ok(())
        };
        let result = run();
        // Finished or failed: release any producer waiting at the gate; dropping the receiver makes the others'
        // next send fail.
        drop(stop);
        drop(rx);
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(items: &[u64], group: usize, window: usize, threads: usize) -> Vec<Vec<u64>> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        pool.install(|| {
            let mut out = Vec::new();
            ordered_map(
                items,
                group,
                window,
                || 0u64,
                |calls, i, x| {
                    *calls += 1;
                    // Uneven work: some items take much longer than their neighbours.
                    if x % 7 == 0 {
                        std::thread::sleep(std::time::Duration::from_millis(3));
                    }
                    (i as u64) * 1000 + x
                },
                |g| -> Result<(), ()> {
                    out.push(g);
                    Ok(())
                },
            )
            .expect("no error");
            out
        })
    }

    #[test]
    fn results_come_in_order_and_in_fixed_groups_whatever_the_threads() {
        let items: Vec<u64> = (0..103).map(|i| (i * 37) % 101).collect();
        let expected: Vec<Vec<u64>> = items
            .iter()
            .enumerate()
            .map(|(i, x)| i as u64 * 1000 + x)
            .collect::<Vec<_>>()
            .chunks(16)
            .map(<[u64]>::to_vec)
            .collect();
        for threads in [1, 2, 4] {
            for window in [1, 16, 40] {
                assert_eq!(
                    run(&items, 16, window, threads),
                    expected,
                    "threads {threads} window {window}"
                );
            }
        }
        assert!(run(&[], 16, 32, 2).is_empty());
    }

    #[test]
    fn a_consumer_error_stops_the_producers() {
        let items: Vec<u64> = (0..10_000).collect();
        let started = AtomicUsize::new(0);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().expect("pool");
        let mut groups = 0;
        let result = pool.install(|| {
            ordered_map(
                &items,
                4,
                8,
                || (),
                |_, _, x| {
                    started.fetch_add(1, Ordering::Relaxed);
                    *x
                },
                |_| {
                    groups += 1;
                    if groups == 3 {
                        Err("stop")
                    } else {
                        Ok(())
                    }
                },
            )
        });
        assert_eq!(result, Err("stop"));
        // Nothing beyond the window was prepared: before the delivery that completes group 3, at most 11 items had
        // been taken in order (2 groups consumed, 3 waiting); that delivery can complete at most a window (8) of
        // items prepared out of order, and the gate then lets producers start at most a window beyond those. A
        // map call only starts below the gate's limit, so 11 + 8 + 8 bounds it whatever the interleaving (a
        // bound of 12 + 8 + 3 was once seen exceeded, with 25, when items arrived out of order).
        let started = started.load(Ordering::Relaxed);
        assert!(started <= 11 + 8 + 8, "{started} items prepared");
    }

    #[test]
    fn a_panicking_consumer_panics_the_caller_instead_of_hanging() {
        let items: Vec<u64> = (0..1000).collect();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("pool");
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.install(|| {
                let mut groups = 0;
                ordered_map(
                    &items,
                    4,
                    8,
                    || (),
                    |_, _, x| *x,
                    |_| -> Result<(), ()> {
                        groups += 1;
                        assert!(groups < 3, "consumer fails");
                        Ok(())
                    },
                )
            })
        }));
        assert!(outcome.is_err());
    }
}
