#![no_main]
//! Any bytes as a stored record, to `Record::decode`; a record that decodes must re-encode to the
//! identical bytes. Property: `idemproxy_fuzz::check_record` (fuzz/src/lib.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    idemproxy_fuzz::check_record(data);
});
