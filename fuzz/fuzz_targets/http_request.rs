//! libFuzzer target: `stella_fuzz::http_request`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stella_fuzz::http_request(data));
