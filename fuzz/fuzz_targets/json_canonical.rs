#![no_main]
//! Any bytes as a JSON request body, to the canonicaliser of `fingerprint_body = "json"`
//! (`idempotency::canonical::canonical_json`). Property: `idemproxy_fuzz::check_canonical`
//! (fuzz/src/lib.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    idemproxy_fuzz::check_canonical(data);
});
