//! The agent's steady heartbeat path does not allocate: encoding a
//! heartbeat into a reused buffer and reading a plain acknowledgement into a
//! reused answer, counted by a global allocator in this test binary alone.

// A global allocator is unsafe to implement; it only forwards to System.
#![allow(unsafe_code)]
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use stella_proto::api::{DoctorSummary, HeartbeatRequest, HeartbeatResponse, UpdateReport};

/// Counts the allocations of the current thread (the test harness runs
/// other tests on other threads).
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is passed on to the system allocator unchanged; the
// counter is a const-initialised thread-local, which does not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

fn allocations_in(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

fn beat(seq: u64) -> HeartbeatRequest {
    HeartbeatRequest {
        seq,
        version: "0.1.0".into(),
        uptime_s: 12,
        config_hash: "3f".repeat(32),
        config_drift: false,
        config_error: None,
        doctor: DoctorSummary {
            pass: 10,
            warn: 1,
            fail: 0,
            skip: 0,
            failing: Vec::new(),
        },
        update: UpdateReport {
            state: stella_proto::states::UpdatePhase::Idle,
            version: String::new(),
            error: None,
            bytes: None,
            total: None,
        },
        capabilities: vec!["systemd".into(), "docker".into()],
        doctor_report: None,
        update_failure: None,
    }
}

#[test]
fn a_steady_heartbeat_encodes_and_decodes_without_allocating() {
    let mut beat = beat(1);
    let mut body = String::new();
    let mut answer = HeartbeatResponse::default();
    let ack = |ms: u64| {
        format!(
            r#"{{"interval_ms":{ms},"server_time":"2026-11-30T04:00:00Z","renew":false,"config_hash":"{}","config":null,"update":null}}"#,
            "3f".repeat(32)
        )
    };
    let (first, second) = (ack(30_000), ack(29_000));
    // The counter sees allocations at all.
    assert_eq!(
        allocations_in(|| drop(std::hint::black_box(String::with_capacity(8)))),
        1
    );
    // The first beat sizes the buffers.
    beat.write_json(&mut body);
    assert!(answer.read_plain_ack(&first));

    beat.seq += 1;
    beat.uptime_s += 30;
    let n = allocations_in(|| beat.write_json(&mut body));
    assert_eq!(n, 0, "encoding the heartbeat allocated {n} times");
    assert_eq!(body, miniserde::json::to_string(&beat));

    let n = allocations_in(|| assert!(answer.read_plain_ack(&second)));
    assert_eq!(n, 0, "reading the acknowledgement allocated {n} times");
    assert_eq!(answer.interval_ms, 29_000);
}
