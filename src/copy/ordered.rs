//! The ordered parallel pipeline under every copy, with no barrier in it.
//!
//! A *source* thread finds the work in address order (a planner walking a disk's map, or
//! a pipe's reader) and hands each item to [`Spawner::push`]: items worth a worker (a
//! read) are made on the pool, the others (holes) are made right there. The calling
//! thread only sinks: it takes every product in the order the items were pushed, as soon
//! as it and all before it are made. Nothing waits at a window's end, and the calling
//! thread waits on one channel, so a source blocked on a slow pipe never keeps made
//! products from the sink.
//!
//! Memory: at most `ahead` pooled items are held at once (being made, or made and
//! waiting for an earlier one); `push` blocks the source until the sink frees one.
//! Errors: after the first (the source's, a product's or the sink's) nothing more is
//! started or sunk, what is in flight is let finish, and that first error is returned.
//! A panic in a product or in the source is raised again on the calling thread.

use std::sync::mpsc;
use std::sync::{Condvar, Mutex};

use crate::error::{Error, Result};

/// A product, or the panic that stopped its making.
type Made<O> = std::thread::Result<Result<O>>;

enum Event<O> {
    /// Item `seq` is made (`pooled`: it held one of the `ahead` places).
    Made {
        seq: usize,
        pooled: bool,
        made: Made<O>,
    },
    /// The source is done after pushing `pushed` items, and how it ended.
    End {
        pushed: usize,
        how: std::thread::Result<Result<()>>,
    },
}

/// The places for pooled items: the source takes one per item, the sink gives it back.
struct Places {
    state: Mutex<(usize, bool)>,
    freed: Condvar,
}

impl Places {
    fn take(&self) -> Result<()> {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while g.0 == 0 && !g.1 {
            g = self.freed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        if g.1 {
            return Err(Error::InvalidInput("the copy stopped".into()));
        }
        g.0 -= 1;
        Ok(())
    }

    fn give(&self) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        g.0 += 1;
        self.freed.notify_one();
    }

    /// The sink stopped: a waiting or later `take` fails.
    fn close(&self) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        g.1 = true;
        self.freed.notify_all();
    }
}

/// Hands items to the pipeline, in order, from the source thread.
pub struct Spawner<'s, 'a, T, O> {
    scope: &'s rayon::Scope<'a>,
    make: &'a (dyn Fn(T) -> Result<O> + Sync),
    events: mpsc::Sender<Event<O>>,
    places: &'a Places,
    pushed: usize,
}

impl<'a, T: Send + 'a, O: Send + 'a> Spawner<'_, 'a, T, O> {
    /// The next item; `pooled` makes it on the pool (waiting for a place first),
    /// otherwise it is made here. Fails once the pipeline has stopped.
    pub fn push(&mut self, item: T, pooled: bool) -> Result<()> {
        let seq = self.pushed;
        if pooled {
            self.places.take()?;
            let (tx, make) = (self.events.clone(), self.make);
            self.scope.spawn(move |_| {
                let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| make(item)));
                let _ = tx.send(Event::Made {
                    seq,
                    pooled: true,
                    made,
                });
            });
        } else {
            let made = Ok((self.make)(item));
            self.events
                .send(Event::Made {
                    seq,
                    pooled: false,
                    made,
                })
                .map_err(|_| Error::InvalidInput("the copy stopped".into()))?;
        }
        self.pushed += 1;
        Ok(())
    }
}

/// Run `source` on a thread of its own, pushing items; make them (see [`Spawner::push`])
/// and hand the products to `sink` on this thread, in push order.
pub fn ordered<T, O>(
    pool: &rayon::ThreadPool,
    ahead: usize,
    source: &mut (dyn FnMut(&mut Spawner<'_, '_, T, O>) -> Result<()> + Send),
    make: &(dyn Fn(T) -> Result<O> + Sync),
    sink: &mut dyn FnMut(O) -> Result<()>,
) -> Result<()>
where
    T: Send,
    O: Send,
{
    let places = Places {
        state: Mutex::new((ahead.max(1), false)),
        freed: Condvar::new(),
    };
    let (tx, rx) = mpsc::channel::<Event<O>>();
    pool.in_place_scope(|scope| {
        std::thread::scope(|threads| {
            let places = &places;
            threads.spawn(move || {
                let mut sp = Spawner {
                    scope,
                    make,
                    events: tx.clone(),
                    places,
                    pushed: 0,
                };
                let how =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| source(&mut sp)));
                let _ = tx.send(Event::End {
                    pushed: sp.pushed,
                    how,
                });
            });
            sink_in_order(&rx, places, sink)
        })
    })
}

/// The calling thread's part: sink products in order until the source's end and every
/// item it pushed are in.
fn sink_in_order<O>(
    rx: &mpsc::Receiver<Event<O>>,
    places: &Places,
    sink: &mut dyn FnMut(O) -> Result<()>,
) -> Result<()> {
    // However this ends (a panic in `sink` included), a source waiting for a place is
    // let go, so the scopes around can finish.
    struct Release<'p>(&'p Places);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let _release = Release(places);
    // Products from sequence number `first` on, as they arrive (out of order).
    let mut waiting: std::collections::VecDeque<Option<(bool, Made<O>)>> = Default::default();
    let mut first = 0usize;
    let mut end: Option<usize> = None;
    let mut failed: Option<Error> = None;
    let mut panicked = None;
    loop {
        while let Some(Some(_)) = waiting.front() {
            let (pooled, made) = waiting.pop_front().flatten().expect("front");
            first += 1;
            if pooled {
                places.give();
            }
            match made {
                Err(panic) => {
                    panicked.get_or_insert(panic);
                    places.close();
                }
                Ok(made) if failed.is_none() && panicked.is_none() => {
                    if let Err(e) = made.and_then(&mut *sink) {
                        failed = Some(e);
                        places.close();
                    }
                }
                Ok(_) => {}
            }
        }
        if end == Some(first) {
            break;
        }
        match rx.recv().expect("the source's end is sent last") {
            Event::Made { seq, pooled, made } => {
                let at = seq - first;
                if waiting.len() <= at {
                    waiting.resize_with(at + 1, || None);
                }
                waiting[at] = Some((pooled, made));
            }
            Event::End { pushed, how } => {
                end = Some(pushed);
                match how {
                    Err(panic) => {
                        panicked.get_or_insert(panic);
                    }
                    Ok(Err(e)) if failed.is_none() => failed = Some(e),
                    Ok(_) => {}
                }
            }
        }
    }
    if let Some(panic) = panicked {
        std::panic::resume_unwind(panic);
    }
    failed.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Products reach the sink in push order, each once, whatever the making order
        /// and the number of places; a failing item stops the sink at the first failure
        /// in order.
        #[test]
        fn products_arrive_in_order(
            items in proptest::collection::vec((any::<bool>(), 0u8..4, any::<bool>()), 0..200),
            ahead in 1usize..8,
            threads in 1usize..4,
            fail_at in proptest::option::of(0usize..200),
        ) {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut seen = Vec::new();
            let r = ordered(
                &pool,
                ahead,
                &mut |sp| {
                    for (i, &(pooled, _, _)) in items.iter().enumerate() {
                        sp.push(i, pooled)?;
                    }
                    Ok(())
                },
                &|i: usize| {
                    std::thread::sleep(std::time::Duration::from_micros(u64::from(items[i].1) * 50));
                    if Some(i) == fail_at && items[i].2 {
                        return Err(Error::InvalidInput(format!("item {i}")));
                    }
                    Ok(i)
                },
                &mut |i| {
                    seen.push(i);
                    Ok(())
                },
            );
            let stop = fail_at.filter(|&f| f < items.len() && items[f].2);
            match stop {
                Some(f) => {
                    prop_assert!(r.is_err());
                    prop_assert_eq!(seen, (0..f).collect::<Vec<_>>());
                }
                None => {
                    prop_assert!(r.is_ok());
                    prop_assert_eq!(seen, (0..items.len()).collect::<Vec<_>>());
                }
            }
        }
    }

    /// A sink that fails stops the source (its next push fails) and nothing after the
    /// failure is sunk.
    #[test]
    fn a_failing_sink_stops_the_source() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let mut pushed = 0;
        let mut sunk = 0;
        let r = ordered(
            &pool,
            4,
            &mut |sp| {
                for i in 0..100_000usize {
                    sp.push(i, true)?;
                    pushed += 1;
                }
                Ok(())
            },
            &|i: usize| Ok(i),
            &mut |i| {
                sunk += 1;
                if i == 10 {
                    return Err(Error::InvalidInput("full".into()));
                }
                Ok(())
            },
        );
        assert!(matches!(r, Err(Error::InvalidInput(m)) if m == "full"));
        assert_eq!(sunk, 11);
        assert!(pushed < 100, "the source went on: {pushed}");
    }

    /// A panic in the sink reaches the caller (the source, waiting for a place, is let
    /// go instead of holding the scope forever).
    #[test]
    fn a_panicking_sink_does_not_hang() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ordered(
                &pool,
                2,
                &mut |sp| {
                    for i in 0..1000usize {
                        sp.push(i, true)?;
                    }
                    Ok(())
                },
                &|i: usize| Ok(i),
                &mut |i| {
                    assert!(i < 5, "sink bug");
                    Ok(())
                },
            )
        }));
        assert!(r.is_err());
    }
}
