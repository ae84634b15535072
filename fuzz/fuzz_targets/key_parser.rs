#![no_main]
//! Any bytes as an `Idempotency-Key` field value, to `idempotency::key::parse`.
//! Property: `idemproxy_fuzz::check_key` (fuzz/src/lib.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    idemproxy_fuzz::check_key(data);
});
