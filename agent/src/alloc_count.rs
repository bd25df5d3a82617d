//! Bench-only counting allocator (feature `bench-alloc`, never in release
//! builds): counts heap calls and bytes in use so `cargo xtask bench` can show
//! the allocations per heartbeat and that the heap does not grow.
//!
//! With `STELLA_ALLOC_REPORT=<path>` set, [`report_if_asked`] (called by the
//! run loop after each acknowledged heartbeat) and process exit append one
//! line each to that file: `<seq|exit> allocs reallocs deallocs in_use peak`
//! (counts since start, bytes now, highest bytes). Writing a line allocates
//! nothing after the first call; what the first call allocates to open the
//! file is subtracted from the counts.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::fs::File;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};

/// The system allocator with counters.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static REALLOCS: AtomicU64 = AtomicU64::new(0);
static DEALLOCS: AtomicU64 = AtomicU64::new(0);
static IN_USE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);
/// Calls and bytes made by this module itself (opening the report file).
static OWN_ALLOCS: AtomicU64 = AtomicU64::new(0);
static OWN_BYTES: AtomicU64 = AtomicU64::new(0);

#[global_allocator]
static GLOBAL: Counting = Counting;

fn grew(bytes: usize) {
    let now = IN_USE.fetch_add(bytes as u64, Relaxed) + bytes as u64;
    PEAK.fetch_max(now, Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged, so `System` upholds the `GlobalAlloc` contract; the counters are
// atomics and never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout contract is passed on unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            ALLOCS.fetch_add(1, Relaxed);
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            ALLOCS.fetch_add(1, Relaxed);
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` (through us) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        DEALLOCS.fetch_add(1, Relaxed);
        IN_USE.fetch_sub(layout.size() as u64, Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` was allocated by `System` (through us) with `layout`,
        // and the caller guarantees `new_size` is valid for its alignment.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            REALLOCS.fetch_add(1, Relaxed);
            IN_USE.fetch_sub(layout.size() as u64, Relaxed);
            grew(new_size);
        }
        p
    }
}

/// The report file, if `STELLA_ALLOC_REPORT` names one.
static REPORT: OnceLock<Option<Mutex<File>>> = OnceLock::new();

fn report_file() -> Option<&'static Mutex<File>> {
    REPORT
        .get_or_init(|| {
            let (calls, bytes) = (ALLOCS.load(Relaxed), IN_USE.load(Relaxed));
            let file = std::env::var_os("STELLA_ALLOC_REPORT").and_then(|path| {
                File::options()
                    .create(true)
                    .append(true)
                    .open(path)
                    .ok()
                    .map(Mutex::new)
            });
            // What stays allocated (the path is freed again) is ours, not the agent's.
            OWN_ALLOCS.fetch_add(ALLOCS.load(Relaxed) - calls, Relaxed);
            OWN_BYTES.fetch_add(IN_USE.load(Relaxed).saturating_sub(bytes), Relaxed);
            file
        })
        .as_ref()
}

/// Appends one line for `tag` without allocating (a stack buffer).
fn write_line(tag: &dyn std::fmt::Display) {
    let snapshot = [
        ALLOCS.load(Relaxed),
        REALLOCS.load(Relaxed),
        DEALLOCS.load(Relaxed),
        IN_USE.load(Relaxed),
        PEAK.load(Relaxed),
    ];
    let Some(file) = report_file() else {
        return;
    };
    let own = (OWN_ALLOCS.load(Relaxed), OWN_BYTES.load(Relaxed));
    let mut buf = [0u8; 160];
    let mut cursor = &mut buf[..];
    let _ = writeln!(
        cursor,
        "{tag} {} {} {} {} {}",
        snapshot[0].saturating_sub(own.0),
        snapshot[1],
        snapshot[2],
        snapshot[3].saturating_sub(own.1),
        snapshot[4]
    );
    let len = 160 - cursor.len();
    if let Ok(mut f) = file.lock() {
        let _ = f.write_all(&buf[..len]);
    }
}

/// Called after each acknowledged heartbeat: appends the counters to the
/// report file when `STELLA_ALLOC_REPORT` is set (else does nothing).
// Unused until the run loop's hook line is in place; the bench then says so.
#[allow(dead_code)]
pub(crate) fn report_if_asked(seq: u64) {
    write_line(&seq);
}

extern "C" fn at_exit() {
    write_line(&"exit");
}

/// Registers the exit report before `main`, so one-shot commands (`doctor`)
/// report too without a hook of their own.
extern "C" fn register_at_exit() {
    // SAFETY: `at_exit` is a plain `extern "C" fn()` that lives for the whole
    // program; atexit(3) only stores the pointer.
    unsafe {
        libc::atexit(at_exit);
    }
}

// SAFETY: `.init_array` entries are called once by the C runtime before
// `main`, with no arguments; `register_at_exit` matches that signature and
// touches no Rust runtime state.
#[used]
#[unsafe(link_section = ".init_array")]
static REGISTER_AT_EXIT: extern "C" fn() = register_at_exit;
