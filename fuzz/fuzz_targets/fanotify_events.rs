//! cargo-fuzz target: `check_fanotify` (see tests/fuzz_checks/mod.rs for what is checked).
#![no_main]

#[path = "../../tests/fuzz_checks/mod.rs"]
mod fuzz_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_checks::check_fanotify(data));
