//! libFuzzer target: `stella_fuzz::statement`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stella_fuzz::statement(data));
