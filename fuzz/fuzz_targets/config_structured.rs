#![no_main]
//! TOML assembled from the real config keys and edge values (`idemproxy_fuzz::structured_toml`), to
//! `Config::from_toml`. Property: `idemproxy_fuzz::check_config_structured` (fuzz/src/lib.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    idemproxy_fuzz::check_config_structured(data);
});
