#![no_main]
//! A JSON pointer (first line) and a JSON body (the rest), to pointer parsing, the `json:` key
//! source and the fingerprint's left-out values. Property: `idemproxy_fuzz::check_pointer`
//! (fuzz/src/lib.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    idemproxy_fuzz::check_pointer(data);
});
