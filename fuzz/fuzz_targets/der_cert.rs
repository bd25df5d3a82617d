//! libFuzzer target: `stella_fuzz::der_cert`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stella_fuzz::der_cert(data));
