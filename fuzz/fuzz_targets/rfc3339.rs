//! libFuzzer target: `stella_fuzz::rfc3339`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stella_fuzz::rfc3339(data));
