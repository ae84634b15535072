#![no_main]
//! Any damage to a disk store's file (flipped bits, torn pages, a cut tail, garbage appended),
//! then open it: it answers each key with its own record or `Corrupt`, or refuses to open naming
//! the file, and never panics. Property: `idemproxy_fuzz::check_disk_recovery` (fuzz/src/lib.rs).
//!
//! redb panics on some damaged pages and the store catches those panics (they become `Corrupt`
//! answers), so this target runs with the default panic hook: libfuzzer-sys's own hook would
//! abort on a panic even when it is caught. A panic the store lets out still fails the run.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static DEFAULT_HOOK: std::sync::Once = std::sync::Once::new();
    DEFAULT_HOOK.call_once(|| drop(std::panic::take_hook()));
    let result = std::panic::catch_unwind(|| idemproxy_fuzz::check_disk_recovery(data));
    if result.is_err() {
        std::process::abort();
    }
});
