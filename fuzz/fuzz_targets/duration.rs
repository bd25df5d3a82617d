//! libFuzzer target: `stella_fuzz::duration`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stella_fuzz::duration(data));
