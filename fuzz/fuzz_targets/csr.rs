//! libFuzzer target: `stella_fuzz::csr`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stella_fuzz::csr(data));
