//! libFuzzer target: `stella_fuzz::dsse`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stella_fuzz::dsse(data));
