//! Fuzzes `caravan_worker::fuzz::step_plan` (what it checks is documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    caravan_worker::fuzz::step_plan(data);
});
