//! Fuzzes `caravan_coordinator::fuzz::request` (what it checks is documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    caravan_coordinator::fuzz::request(data);
});
