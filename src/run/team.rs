//! A team of spinning threads for the parallel sections of decoding.
//!
//! A decoded token runs about eight parallel sections per block (the projections, attention)
//! of a few tens of microseconds each, with a few microseconds of one-thread work between
//! them. Rayon's idle workers give up after a few dozen `sched_yield` rounds and sleep on a
//! futex; on the two-vCPU VM measured that happens about once per block, and a sleeping
//! worker took so long to wake that the section ran mostly on the calling thread (attention
//! 1.78 ms a token on two threads at best, 2.25 ms when the sections before it ended
//! differently). The team's helpers instead spin on a job counter between sections (for up to
//! [`SPIN`], yielding the CPU every few rounds), so a section starts on every thread within
//! a cache-line transfer, then park until the next job.
//!
//! [`for_each`] runs `f(i)` for `i in 0..count`, each index exactly once, on the caller and
//! the team's helpers: `rayon::current_num_threads() - 1` of them, so the team is as large as
//! the pool the caller runs in (`--threads`). Each thread starts on its own contiguous block
//! of the indices, claimed one at a time, then takes what is left of the others' blocks, so
//! a helper that starts late takes fewer. When the team is in use (another caller
//! or a nested call), the work runs on rayon instead: the results are the same either way,
//! since each index's work does not depend on the thread that runs it.

use std::any::Any;
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long an idle helper spins before it parks: longer than any gap between the sections
/// of a decoded token, short enough that a finished run gives the cores back at once.
const SPIN: Duration = Duration::from_millis(2);

/// Runs `f(i)` for every `i` in `0..count`: on the team when it is free, else on rayon.
pub fn for_each(count: usize, f: impl Fn(usize) + Sync) {
    let threads = rayon::current_num_threads();
    if count <= 1 || threads <= 1 {
        (0..count).for_each(f);
        return;
    }
    match Team::claim(threads) {
        Some(team) => team.run(count, &f),
        None => (0..count).into_par_iter().for_each(&f),
    }
}

/// [`for_each`] over the items of `items`, each given to `f` with its index, by `&mut`.
pub fn for_each_mut<T: Send>(items: &mut [T], f: impl Fn(usize, &mut T) + Sync) {
    let base = SharedPtr(items.as_mut_ptr());
    let len = items.len();
    for_each(len, |i| {
        assert!(i < len);
        // SAFETY: `for_each` gives each index in `0..len` to exactly one call, so this is
        // the only reference to item `i` while `items` is borrowed mutably by this function.
        let item = unsafe { &mut *base.get().add(i) };
        f(i, item)
    });
}

/// A raw pointer that may cross threads (see the SAFETY notes of its uses).
struct SharedPtr<T>(*mut T);
// SAFETY: only used to hand disjoint items to threads, as [`for_each_mut`] says.
unsafe impl<T: Send> Send for SharedPtr<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SharedPtr<T> {}
impl<T> SharedPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

/// The job of the current section: `f`, its lifetime erased (the indices are in `blocks`).
/// Written by the caller while no helper is inside a job, read by helpers that joined it while
/// it was open (see `Shared::active`).
struct Job {
    f: *const (dyn Fn(usize) + Sync),
}

struct Shared {
    /// Bumped once per job; helpers run each generation exactly once.
    generation: AtomicUsize,
    job: UnsafeCell<Job>,
    /// One block of the current job's indices per thread (the caller's first): each thread
    /// runs its own block from the front, then helps with the others'. Neighbouring indices
    /// (rows of a matrix, heads of a kv head) stay on one thread, and a claim is an add on a
    /// cache line that only its owner uses until the end of the job.
    blocks: Vec<Block>,
    /// The generation of the job helpers may still join, 0 once its caller has closed it.
    open: AtomicUsize,
    /// Helpers inside a job (joined and not finished). A helper joins by counting itself
    /// here, then checking `open`; the caller closes the job, then waits for this to reach
    /// 0. So a helper that has not started (descheduled on a busy machine) never holds the
    /// caller up, and one that joins late finds the job closed and leaves without touching it.
    active: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Helpers parked on `wake`, and the lock that orders parking with new jobs.
    parked: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the caller holding the team (`Team::busy`) while no helper
// is inside a job, and read by helpers only inside one (counted in `active`, the job found
// open), which the caller waits out before it writes again.
unsafe impl Sync for Shared {}
// SAFETY: as above; the closure behind `job.f` is `Sync`.
unsafe impl Send for Shared {}

struct Team {
    shared: Arc<Shared>,
    helpers: usize,
    busy: AtomicBool,
}

/// The team, one per thread count in use (one in practice).
static TEAMS: Mutex<Vec<Arc<Team>>> = Mutex::new(Vec::new());

/// A claimed team, released on drop.
struct Claimed(Arc<Team>);

impl Drop for Claimed {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
    }
}

impl Team {
    /// The team of `threads` threads (the caller and `threads - 1` helpers), if no one else
    /// is using it; started on first use.
    fn claim(threads: usize) -> Option<Claimed> {
        let team = {
            let mut teams = TEAMS.lock().unwrap_or_else(|e| e.into_inner());
            match teams.iter().find(|t| t.helpers + 1 == threads) {
                Some(t) => t.clone(),
                None => {
                    let t = Arc::new(Team::start(threads - 1).ok()?);
                    teams.push(t.clone());
                    t
                }
            }
        };
        team.busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        Some(Claimed(team))
    }

    fn start(helpers: usize) -> std::io::Result<Team> {
        let shared = Arc::new(Shared {
            generation: AtomicUsize::new(0),
            job: UnsafeCell::new(Job {
                f: &nothing as &(dyn Fn(usize) + Sync),
            }),
            blocks: (0..=helpers).map(|_| Block::default()).collect(),
            open: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            panic: Mutex::new(None),
            parked: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        for h in 0..helpers {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("bitnet-pack team {}", h + 1))
                .spawn(move || helper(&s, h + 1))?;
        }
        Ok(Team {
            shared,
            helpers,
            busy: AtomicBool::new(false),
        })
    }
}

impl Claimed {
    fn run(&self, count: usize, f: &(dyn Fn(usize) + Sync)) {
        let s = &*self.0.shared;
        // SAFETY: no helper is inside a job (`active` reached 0 after the last job closed) and
        // none can join one before `open` names the next, so none reads `job` now. The
        // lifetime of `f` is erased: `run` closes the job and waits below, also when `f`
        // panics on this thread, until no helper can call it.
        unsafe {
            let f: *const (dyn Fn(usize) + Sync + '_) = f;
            *s.job.get() = Job {
                f: std::mem::transmute::<
                    *const (dyn Fn(usize) + Sync + '_),
                    *const (dyn Fn(usize) + Sync + 'static),
                >(f),
            };
        }
        let threads = s.blocks.len();
        for (j, b) in s.blocks.iter().enumerate() {
            b.next.store(j * count / threads, Ordering::Relaxed);
            b.end.store((j + 1) * count / threads, Ordering::Relaxed);
        }
        // A helper's panic left over from a job whose caller panicked too.
        s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        let generation = s.generation.load(Ordering::Relaxed) + 1;
        s.open.store(generation, Ordering::SeqCst);
        s.generation.store(generation, Ordering::SeqCst);
        if s.parked.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        /// Closes the job and waits for the helpers inside it when dropped, so that `f`
        /// outlives their calls even if this thread's share panics.
        struct Wait<'a>(&'a Shared);
        impl Drop for Wait<'_> {
            fn drop(&mut self) {
                self.0.open.store(0, Ordering::SeqCst);
                let mut spins = 0u32;
                while self.0.active.load(Ordering::SeqCst) > 0 {
                    if pause(&mut spins) {
                        std::thread::yield_now();
                    }
                }
            }
        }
        let wait = Wait(s);
        claim_all(s, f, 0);
        drop(wait);
        let panic = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(p) = panic {
            std::panic::resume_unwind(p);
        }
    }
}

/// The job before the first.
fn nothing(_: usize) {}

/// One thread's block of a job's indices: `next..end` are left to claim.
#[derive(Default)]
#[repr(align(128))]
struct Block {
    next: AtomicUsize,
    end: AtomicUsize,
}

/// Claims and runs indices of the current job until none is left: those of block `own`
/// first, then those left in the others.
fn claim_all(s: &Shared, f: &(dyn Fn(usize) + Sync), own: usize) {
    let n = s.blocks.len();
    for b in (0..n).map(|j| &s.blocks[(own + j) % n]) {
        let end = b.end.load(Ordering::Relaxed);
        loop {
            let i = b.next.fetch_add(1, Ordering::Relaxed);
            if i >= end {
                break;
            }
            f(i);
        }
    }
}

/// A helper's loop: joins each job it sees open, from generation 1 on (the team starts at 0,
/// and the first job may be published before this thread runs).
fn helper(s: &Shared, own: usize) {
    let mut seen = 0;
    loop {
        let since = Instant::now();
        let mut spins = 0u32;
        loop {
            if s.generation.load(Ordering::Acquire) != seen {
                break;
            }
            if pause(&mut spins) {
                if since.elapsed() > SPIN {
                    park(s, seen);
                } else {
                    std::thread::yield_now();
                }
            }
        }
        seen = s.generation.load(Ordering::SeqCst);
        s.active.fetch_add(1, Ordering::SeqCst);
        if s.open.load(Ordering::SeqCst) == seen {
            // SAFETY: the caller wrote `job` before opening this generation, and keeps it (and
            // the closure behind it) until this thread leaves `active` below: it closes the
            // job before it reads `active`, and this thread counted itself before it found
            // the job open.
            let f = unsafe { &*(*s.job.get()).f };
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| claim_all(s, f, own)));
            if let Err(p) = result {
                // The other threads stop claiming; the caller re-raises the panic.
                for b in &s.blocks {
                    b.next.store(usize::MAX / 2, Ordering::Relaxed);
                }
                *s.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
            }
        }
        s.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One round of a busy wait: a CPU pause hint, except every 64th round, for which it returns
/// true and the caller gives the core away (`yield_now`) or parks, so that more spinning
/// threads than cores still let the working ones run.
fn pause(spins: &mut u32) -> bool {
    *spins = spins.wrapping_add(1);
    if *spins % 64 == 0 {
        return true;
    }
    std::hint::spin_loop();
    false
}

/// Sleeps until the generation moves past `seen`.
fn park(s: &Shared, seen: usize) {
    let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
    s.parked.fetch_add(1, Ordering::SeqCst);
    while s.generation.load(Ordering::SeqCst) == seen {
        g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
    }
    s.parked.fetch_sub(1, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(f)
    }

    #[test]
    fn every_index_runs_once() {
        for threads in [1, 2, 3] {
            in_pool(threads, || {
                for count in [0, 1, 2, 7, 100, 1000] {
                    let hits: Vec<AtomicUsize> = (0..count).map(|_| AtomicUsize::new(0)).collect();
                    for_each(count, |i| {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    });
                    assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                }
            });
        }
    }

    #[test]
    fn items_by_mut_and_after_a_pause() {
        in_pool(2, || {
            let mut v: Vec<u64> = (0..500).collect();
            for round in 0..3u64 {
                for_each_mut(&mut v, |i, x| *x += i as u64 * round);
                // Longer than SPIN: the helper parks and must be woken for the next job.
                std::thread::sleep(SPIN * 2);
            }
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64 * 4));
        });
    }

    #[test]
    fn nested_and_concurrent_calls_fall_back_to_rayon() {
        in_pool(2, || {
            let total = AtomicUsize::new(0);
            for_each(8, |_| {
                for_each(10, |_| {
                    total.fetch_add(1, Ordering::Relaxed);
                });
            });
            assert_eq!(total.load(Ordering::Relaxed), 80);
        });
        let total = AtomicUsize::new(0);
        std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    in_pool(2, || {
                        for _ in 0..50 {
                            for_each(16, |_| {
                                total.fetch_add(1, Ordering::Relaxed);
                            });
                        }
                    })
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 50 * 16);
    }

    /// Many more threads than cores, each helper spinning: every job still completes, and a
    /// helper descheduled past a job's end leaves it alone.
    #[test]
    fn oversubscribed_teams_finish_every_job() {
        in_pool(16, || {
            let total = AtomicUsize::new(0);
            for _ in 0..300 {
                for_each(40, |_| {
                    total.fetch_add(1, Ordering::Relaxed);
                });
            }
            assert_eq!(total.load(Ordering::Relaxed), 300 * 40);
        });
    }

    #[test]
    fn a_panic_reaches_the_caller_and_the_team_goes_on() {
        in_pool(2, || {
            let r = std::panic::catch_unwind(|| {
                for_each(64, |i| {
                    if i == 40 {
                        panic!("index 40");
                    }
                })
            });
            assert!(r.is_err());
            let n = AtomicUsize::new(0);
            for_each(64, |_| {
                n.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(n.load(Ordering::Relaxed), 64);
        });
    }
}
