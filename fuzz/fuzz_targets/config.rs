//! libFuzzer target: `stella_fuzz::config`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stella_fuzz::config(data));
