//! A fixed team of threads for the CPU kernels: [`Team::run`] runs one part per thread, the
//! calling thread part 0, and the team's threads, which poll for work between products instead of
//! sleeping, the others; [`Team::share`] on top of it hands out runs of work to whichever thread
//! is free.
//!
//! A decode token makes ~60 products of a few milliseconds' total; a thread woken from sleep for
//! each one (rayon's pool, before) started tens of microseconds late, and the caller waited for
//! it every time. Workers poll for [`POLL_BEFORE_SLEEP`], yielding the core at every poll so that
//! libtorch's own threads still get it, then sleep until the next product.

use std::{
    cell::UnsafeCell,
    ops::Range,
    panic::{catch_unwind, resume_unwind, AssertUnwindSafe},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Condvar, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// How long an idle worker polls for the next product before it sleeps.
const POLL_BEFORE_SLEEP: Duration = Duration::from_micros(500);

/// The work of one product: part `t` of `threads`.
type Job<'a> = dyn Fn(usize) + Sync + 'a;

pub struct Team {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
    /// One product at a time; a second caller meanwhile runs every part itself.
    caller: Mutex<()>,
}

struct Shared {
    /// Bumped once per product (and once to stop); a worker runs each epoch's job once.
    epoch: AtomicU64,
    /// The current product, valid while `remaining > 0` (see [`Team::run`]).
    job: UnsafeCell<Option<&'static Job<'static>>>,
    /// Workers yet to finish the current product.
    remaining: AtomicUsize,
    panicked: AtomicBool,
    stop: AtomicBool,
    sleepers: AtomicUsize,
    bell: (Mutex<()>, Condvar),
}

// SAFETY: `job` is written only by the caller holding `Team::caller`, before the epoch's release
// increment, and read by workers after their acquire load of that epoch and before they
// decrement `remaining`; the caller clears it only once `remaining` is zero.
unsafe impl Sync for Shared {}

impl Team {
    /// A team of `threads` in all: the caller plus `threads - 1` spawned threads.
    pub fn new(threads: usize) -> std::io::Result<Team> {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            remaining: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            bell: (Mutex::new(()), Condvar::new()),
        });
        let mut team = Team {
            shared,
            handles: Vec::new(),
            caller: Mutex::new(()),
        };
        for part in 1..threads.max(1) {
            let shared = team.shared.clone();
            // On an error, dropping `team` stops and joins the threads spawned so far.
            team.handles.push(
                std::thread::Builder::new()
                    .name(format!("caravan-cpu-{part}"))
                    .spawn(move || shared.work(part))?,
            );
        }
        Ok(team)
    }

    /// Threads in the team, the caller included.
    pub fn threads(&self) -> usize {
        self.handles.len() + 1
    }

    /// Runs `job(t)` for every `t` in `0..threads()`, part 0 on this thread, and returns when all
    /// have finished. A panic in any part is resumed here, after every part has finished.
    pub fn run(&self, job: &Job<'_>) {
        let _one_at_a_time = match self.caller.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return (0..self.threads()).for_each(job);
            }
        };
        let shared = &self.shared;
        // SAFETY: the reference outlives its use: this function does not return (or unwind)
        // before `remaining` is zero, i.e. before every worker is done with it.
        let erased: &'static Job<'static> =
            unsafe { std::mem::transmute::<&Job<'_>, &'static Job<'static>>(job) };
        // SAFETY: workers read `job` only after the epoch increment below (see `Shared`).
        unsafe { *shared.job.get() = Some(erased) };
        shared
            .remaining
            .store(self.handles.len(), Ordering::Relaxed);
        // SeqCst, as the sleeper's side: either we see it announced, or it sees this epoch.
        shared.epoch.fetch_add(1, Ordering::SeqCst);
        if shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _bell = shared.bell.0.lock().unwrap_or_else(|e| e.into_inner());
            shared.bell.1.notify_all();
        }
        let ours = catch_unwind(AssertUnwindSafe(|| job(0)));
        let mut polls = 0u32;
        while shared.remaining.load(Ordering::Acquire) > 0 {
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(64) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        // SAFETY: no worker reads `job` once `remaining` is zero.
        unsafe { *shared.job.get() = None };
        // Cleared whatever happens, so the next product does not report this one's panic.
        let theirs = shared.panicked.swap(false, Ordering::AcqRel);
        if let Err(panic) = ours {
            resume_unwind(panic);
        }
        if theirs {
            panic!("a CPU kernel part panicked on a team thread");
        }
    }

    /// Runs `work` over `0..items` in ranges of `grain` (the last may be shorter), each range
    /// once, claimed in order by whichever thread of the team is free: a thread that the system
    /// delays (another process on its core) takes fewer ranges, and the rest are not left
    /// waiting for its share (the call still returns only once every thread has checked in).
    /// Returns when every range is done; panics as [`Team::run`].
    pub fn share(&self, items: usize, grain: usize, work: &(dyn Fn(Range<usize>) + Sync)) {
        let grain = grain.clamp(1, items.max(1));
        let next = AtomicUsize::new(0);
        self.run(&|_| loop {
            let start = next.fetch_add(grain, Ordering::Relaxed);
            if start >= items {
                return;
            }
            work(start..(start + grain).min(items));
        });
    }
}

impl Shared {
    fn work(&self, part: usize) {
        let mut seen = 0;
        loop {
            seen = self.wait_for_epoch_after(seen);
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            // SAFETY: see `Shared`: set before the epoch we just acquired, cleared only after
            // `remaining` (decremented below) reaches zero.
            if let Some(job) = unsafe { *self.job.get() } {
                if catch_unwind(AssertUnwindSafe(|| job(part))).is_err() {
                    self.panicked.store(true, Ordering::Release);
                }
            }
            self.remaining.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Polls, then sleeps, until the epoch differs from `seen`; returns the new epoch.
    fn wait_for_epoch_after(&self, seen: u64) -> u64 {
        let started = Instant::now();
        loop {
            let epoch = self.epoch.load(Ordering::Acquire);
            if epoch != seen {
                return epoch;
            }
            if started.elapsed() < POLL_BEFORE_SLEEP {
                std::thread::yield_now();
                continue;
            }
            let guard = self.bell.0.lock().unwrap_or_else(|e| e.into_inner());
            self.sleepers.fetch_add(1, Ordering::SeqCst);
            // Checked again under the lock, after announcing ourselves: a product posted since
            // either shows in the epoch here or rings the bell once we wait.
            let _guard = self
                .bell
                .1
                .wait_while(guard, |_| self.epoch.load(Ordering::SeqCst) == seen)
                .unwrap_or_else(|e| e.into_inner());
            self.sleepers.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        {
            let _bell = self.shared.bell.0.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.bell.1.notify_all();
        }
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every part runs exactly once per product, over many products, including after the
    /// workers have gone to sleep.
    #[test]
    fn runs_every_part_once() {
        let team = Team::new(3).unwrap();
        let counts: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
        for round in 0..2000 {
            if round == 1000 {
                std::thread::sleep(POLL_BEFORE_SLEEP * 4); // the workers sleep now
            }
            team.run(&|t| {
                counts[t].fetch_add(1, Ordering::Relaxed);
            });
        }
        for c in &counts {
            assert_eq!(c.load(Ordering::Relaxed), 2000);
        }
    }

    /// `share` covers every item exactly once, whatever the grain (ragged last range included),
    /// and a thread held up in one range leaves the other ranges to the rest of the team.
    #[test]
    fn share_covers_every_item_once_and_routes_around_a_slow_thread() {
        let team = Team::new(3).unwrap();
        for (items, grain) in [(0, 4), (1, 4), (10, 3), (64, 8), (7, 100), (5, 0)] {
            let counts: Vec<AtomicUsize> = (0..items).map(|_| AtomicUsize::new(0)).collect();
            team.share(items, grain, &|range| {
                assert!(
                    range.end <= items && range.start < range.end,
                    "{range:?} of {items}"
                );
                range.for_each(|i| {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                });
            });
            assert!(
                counts.iter().all(|c| c.load(Ordering::Relaxed) == 1),
                "{items} items in ranges of {grain}"
            );
        }
        // Range 0 does not finish until every other range has been done by someone else (or a
        // deadline passes, so that a regression fails instead of hanging).
        let (items, done) = (12, AtomicUsize::new(0));
        let deadline = Instant::now() + Duration::from_secs(10);
        team.share(items, 1, &|range| {
            if range.start == 0 {
                while done.load(Ordering::Acquire) < items - 1 && Instant::now() < deadline {
                    std::thread::yield_now();
                }
            } else {
                done.fetch_add(1, Ordering::Release);
            }
        });
        assert_eq!(done.load(Ordering::Relaxed), items - 1);
    }

    /// A part that panics (on a worker, on the caller, or both) surfaces in the caller, and the
    /// next product runs cleanly.
    #[test]
    fn a_panicking_part_is_reported_and_the_team_survives() {
        let team = Team::new(2).unwrap();
        for failing in [vec![1], vec![0], vec![0, 1]] {
            let caught = catch_unwind(AssertUnwindSafe(|| {
                team.run(&|t| {
                    if failing.contains(&t) {
                        panic!("part {t} fails");
                    }
                })
            }));
            assert!(caught.is_err(), "parts {failing:?} panicked unnoticed");
            let ran = AtomicUsize::new(0);
            team.run(&|_| {
                ran.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(ran.load(Ordering::Relaxed), 2);
        }
    }

    /// Parts other than 0 run on the team's threads, not on the caller.
    #[test]
    fn parts_run_on_the_team_threads() {
        let team = Team::new(3).unwrap();
        let caller = std::thread::current().id();
        let names: Vec<Mutex<Option<(std::thread::ThreadId, String)>>> =
            (0..3).map(|_| Mutex::new(None)).collect();
        team.run(&|t| {
            let me = std::thread::current();
            *names[t].lock().unwrap() = Some((me.id(), me.name().unwrap_or("").to_string()));
        });
        let ids: Vec<_> = names
            .iter()
            .map(|n| n.lock().unwrap().clone().unwrap())
            .collect();
        assert_eq!(ids[0].0, caller);
        for (t, (id, name)) in ids.iter().enumerate().skip(1) {
            assert_ne!(*id, caller, "part {t} ran on the caller");
            assert_eq!(name, &format!("caravan-cpu-{t}"));
        }
    }

    /// Two threads calling at once both get every part run (the second runs them itself).
    #[test]
    fn concurrent_callers_each_get_all_parts() {
        let team = Team::new(2).unwrap();
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..500 {
                        let ran = AtomicUsize::new(0);
                        team.run(&|_| {
                            ran.fetch_add(1, Ordering::Relaxed);
                        });
                        assert_eq!(ran.load(Ordering::Relaxed), 2);
                    }
                });
            }
        });
    }

    /// Two threads sharing work at once (one of them then runs every range itself): each call
    /// still covers its items exactly once.
    #[test]
    fn concurrent_shares_each_cover_their_items() {
        let team = Team::new(2).unwrap();
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..500 {
                        let counts: Vec<AtomicUsize> =
                            (0..9).map(|_| AtomicUsize::new(0)).collect();
                        team.share(9, 2, &|range| {
                            range.for_each(|i| {
                                counts[i].fetch_add(1, Ordering::Relaxed);
                            });
                        });
                        assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
                    }
                });
            }
        });
    }
}
