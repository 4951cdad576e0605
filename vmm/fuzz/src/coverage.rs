//! Edge coverage from LLVM's SanitizerCoverage, which stable rustc emits with
//! `-C passes=sancov-module` and inline 8-bit counters: every instrumented module
//! registers its counter array here when the program starts, and an input is
//! "interesting" when it reaches a counter, or a hit-count bucket of one, never seen.
//! Without the instrumentation (a plain build) nothing registers and the runner
//! degrades to seeded random mutation.

use std::sync::Mutex;

/// Counter arrays as (start, end) addresses, in registration order.
static REGIONS: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

/// Called by each instrumented module's constructor with its counters.
#[no_mangle]
pub extern "C" fn __sanitizer_cov_8bit_counters_init(start: *mut u8, stop: *mut u8) {
    if let Ok(mut regions) = REGIONS.lock() {
        regions.push((start as usize, stop as usize));
    }
}

/// The counters of the whole program and the hit-count buckets seen so far.
pub struct Coverage {
    regions: Vec<(usize, usize)>,
    seen: Vec<u8>,
}

/// AFL's hit-count buckets: 1, 2, 3, 4-7, 8-15, 16-31, 32-127, 128+.
fn bucket(count: u8) -> u8 {
    match count {
        0 => 0,
        1 => 1,
        2 => 2,
        3 => 4,
        4..=7 => 8,
        8..=15 => 16,
        16..=31 => 32,
        32..=127 => 64,
        _ => 128,
    }
}

impl Coverage {
    pub fn new() -> Self {
        let regions = REGIONS.lock().map(|r| r.clone()).unwrap_or_default();
        let total = regions.iter().map(|(s, e)| e - s).sum();
        Coverage {
            regions,
            seen: vec![0; total],
        }
    }

    /// Whether the binary was built with the instrumentation.
    pub fn instrumented(&self) -> bool {
        !self.seen.is_empty()
    }

    fn counters(&mut self) -> impl Iterator<Item = &'static mut [u8]> + '_ {
        self.regions.iter().map(|&(start, end)| {
            // SAFETY: LLVM handed us [start, end) as this module's counter array, a static
            // that lives as long as the program; the runner is single-threaded, so nothing
            // else touches it while the slice is in use.
            unsafe { std::slice::from_raw_parts_mut(start as *mut u8, end - start) }
        })
    }

    /// Clears the counters before an execution.
    pub fn reset(&mut self) {
        for c in self.counters() {
            c.fill(0);
        }
    }

    /// Folds the last execution's counters into what was seen; returns how many new
    /// (counter, bucket) pairs it reached.
    pub fn update(&mut self) -> usize {
        let mut new = 0;
        let mut i = 0;
        let regions = self.regions.clone();
        for (start, end) in regions {
            // SAFETY: as in `counters`.
            let c = unsafe { std::slice::from_raw_parts(start as *const u8, end - start) };
            for &count in c {
                let b = bucket(count);
                if b != 0 && self.seen[i] & b == 0 {
                    self.seen[i] |= b;
                    new += 1;
                }
                i += 1;
            }
        }
        new
    }

    /// Counters ever reached.
    pub fn edges(&self) -> usize {
        self.seen.iter().filter(|&&s| s != 0).count()
    }
}
