//! libFuzzer target: `stella_fuzz::token`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stella_fuzz::token(data));
