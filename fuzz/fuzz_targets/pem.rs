//! libFuzzer target: `stella_fuzz::pem`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stella_fuzz::pem(data));
