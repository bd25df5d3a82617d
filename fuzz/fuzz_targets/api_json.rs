//! libFuzzer target: `stella_fuzz::api_json`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stella_fuzz::api_json(data));
