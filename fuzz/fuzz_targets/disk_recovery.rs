#![no_main]
//! Any damage to a disk store's segment (flipped bits, torn pages, a cut tail, garbage appended),
//! then open it: it always opens, answers each key its damage did not touch with its record and a
//! damaged one with its record or `Corrupt` (losing it only when nothing names it, or the tail was
//! cut inside it), takes a new key, opens again the same way, and never panics. Property:
//! `idemproxy_fuzz::check_disk_recovery` (fuzz/src/lib.rs; docs/behaviour.md §11.4).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    idemproxy_fuzz::check_disk_recovery(data);
});
